# SmolLM2-135M, REP-CounterFact test cases 0-19: efficacy and fluency (one sampled text of 100
# tokens per case, ROME's n-gram entropy) of plain MEMIT and MEMIT with the value-side forms
# (three in-domain scrambles and passages of 50 and 300 words as rows of v*'s loss), and the
# seconds per edit. Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, one after the
# other next to three other jobs (12 and 19 min), so seconds per edit are contended.
export REPEDIT_DATA=../shared/data
C="--data rep-counterfact --n 20 --threads 1 --tests efficacy,fluency \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
# plain MEMIT: its value step without the value-side forms (MEMIT's default before 0.2.0)
repedit eval --method memit $C \
    --set value.robust_forms=0 --set value.robust_prefix_lengths= --out runs/a-memit
repedit eval --method memit $C \
    --set value.robust_forms=3 --set value.robust_prefix_lengths=50,300 \
    --out runs/b-memit-value-side
# plain ROME and ROME with the value-side passages alone (no scrambles), made on 2026-12-07, 1
# thread, one after the other next to one other job (5 and 6 min)
repedit eval --method rome $C --out runs/c-rome
repedit eval --method rome $C --set value.robust_prefix_lengths=50,300 --out runs/d-rome-passages
# the passages with up to 50 value steps, made on 2026-12-07 next to a CI run (9 min)
repedit eval --method rome $C --set value.robust_prefix_lengths=50,300 --set value.steps=50 \
    --out runs/e-rome-passages-steps50
