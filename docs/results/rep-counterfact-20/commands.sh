# SmolLM2-135M, REP-CounterFact test cases 0-19, single mode, made with repedit 0.1.0 (b110823) on
# 2026-12-06, before near_subject and neighbourhood_plus existed (those rows are empty), 1 thread
# seconds are inflated: the runs shared the 2 cores with up to eight other jobs
export REPEDIT_DATA=../shared/data
C="--data rep-counterfact --n 20 --threads 1 --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit eval --method rome  $C --out runs/rome-cf20
repedit eval --method rome  $C --rep --out runs/rome-rep-cf20
repedit eval --method memit $C --out runs/memit-cf20
repedit eval --method memit $C --rep --out runs/memit-rep-cf20
