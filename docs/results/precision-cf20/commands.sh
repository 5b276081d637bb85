# SmolLM2-135M, ROME, REP-CounterFact test cases 0-19: float32 against --precision bfloat16
# (key statistics and every scoring and generation forward under bfloat16 autocast; the edit's
# optimisation in float32). Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, shared machine.
export REPEDIT_DATA=../shared/data
C="--method rome --data rep-counterfact --n 20 --threads 1 --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit eval $C --precision model --out runs/rome-float32
repedit eval $C --precision bfloat16 --out runs/rome-bfloat16
