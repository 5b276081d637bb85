# SmolLM2-135M, ROME, REP-CounterFact test cases 0-49, REP with its defaults under three seeds
# (RepConfig.seed: initialisation, batches; the scramble split stays the suite's). seed0 is the
# run of rep-counterfact-test50-ceiling (made before value batching streamed by default; its
# plain and oracle columns are identical to the others', so the edits are the same).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread each, shared machine.
export REPEDIT_DATA=../shared/data
C="--method rome --rep --data rep-counterfact --n 50 --threads 1 \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling $C --out runs/rome-rep-seed0
repedit analyze ceiling $C --rep-set seed=1 --out runs/rome-rep-seed1
repedit analyze ceiling $C --rep-set seed=2 --out runs/rome-rep-seed2
