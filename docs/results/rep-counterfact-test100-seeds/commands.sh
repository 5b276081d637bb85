# SmolLM2-135M, ROME, REP-CounterFact test cases 0-99, REP at its defaults (the generalisation
# setting) under three seeds (RepConfig.seed: initialisation, batches, generated forms and pool
# draws; the scramble split stays the suite's). seed0 is the rome-rep-generalise run of
# rep-counterfact-test100-ceiling, which wrote the setting out as --rep-set options; its plain and
# oracle columns equal the others', so the edits are the same.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread each, three jobs on 2 cores.
export REPEDIT_DATA=../shared/data
C="--method rome --rep --data rep-counterfact --n 100 --threads 1 \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling $C --out runs/rome-rep-seed0
repedit analyze ceiling $C --rep-set seed=1 --out runs/rome-rep-seed1
repedit analyze ceiling $C --rep-set seed=2 --out runs/rome-rep-seed2
