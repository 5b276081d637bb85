# SmolLM2-135M, ROME, REP-CounterFact *validation* cases 0-11, every success test, long context
# and locality, REP at its defaults: the plain edit, the edit with value-side forms (three
# in-domain scrambles and passages of 50 and 300 words as extra rows of v*'s loss), and the same
# with the value optimisation stopping at a mean target probability of 0.8 instead of 0.95 (a
# smaller v*, to win locality back). Chosen here, reported on test cases in docs/core.md.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread each, three jobs on 2 cores.
export REPEDIT_DATA=../shared/data
T=efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject,long_context
C="--method rome --rep --data rep-counterfact-valid --n 12 --threads 1 --tests $T \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
V="--set value.robust_forms=3 --set value.robust_prefix_lengths=50,300"
repedit analyze ceiling $C --out runs/a-plain
repedit analyze ceiling $C $V --out runs/b-value
repedit analyze ceiling $C $V --set value.stop_prob=0.8 --out runs/c-value-stop80
# the value-side forms plus three of the case's in-domain subject paraphrases as rows
# (value.robust_paraphrases), 1 thread, three or four jobs on 2 cores (21 min)
repedit analyze ceiling $C $V --set value.robust_paraphrases=3 --out runs/d-value-paraphrases
