# SmolLM2-135M, ROME, REP-CounterFact test cases 0-24, every success test plus locality: the plain
# edit against the edit with value-side forms (three in-domain scrambles of the subject and the
# edit prompt after passages of 50 and 300 words as extra rows of v*'s loss), each with REP at
# its defaults (the generalisation setting) and with the oracle key. The value-side run's
# trained scramble half is not held out (its value rows trained on three of those scrambles).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to one or two other jobs
# (17 and 18 min).
export REPEDIT_DATA=../shared/data
T=efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,long_context,neighbourhood,near_subject
C="--method rome --rep --data rep-counterfact --n 25 --threads 1 --tests $T \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling $C --out runs/a-rome-rep
repedit analyze ceiling $C --set value.robust_forms=3 --set value.robust_prefix_lengths=50,300 \
    --out runs/b-rome-value-side-rep
