# SmolLM2-135M, ROME, REP-CounterFact test cases 0-24, single mode: efficacy and fluency (ROME's
# n-gram entropy of one 100-token sample per case, generated with the edit applied and, with
# --rep, REP's adapters attached), plain and with REP at its defaults.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread each, three to four jobs on 2 cores.
export REPEDIT_DATA=../shared/data
C="--method rome --data rep-counterfact --n 25 --threads 1 --tests efficacy,fluency \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit eval $C --out runs/a-rome
repedit eval $C --rep --out runs/b-rome-rep
