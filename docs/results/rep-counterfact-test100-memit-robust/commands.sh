# SmolLM2-135M, MEMIT at its default layers, REP-CounterFact test cases 0-99: plain MEMIT and
# MEMIT with the value-side forms (three in-domain scrambles and passages of 50 and 300 words as
# rows of v*'s loss), each scored plain, with REP at its defaults and with the oracle key at
# every edited layer, and CoRE at its defaults (per-request prefixes, variance weight 1e-4).
# The value-side run's in-domain scramble half is trained on.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to one to four other jobs (98 and
# 114 min); CoRE on 2026-12-07, next to one or two other jobs (112 min).
export REPEDIT_DATA=../shared/data
T=efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,long_context,neighbourhood,near_subject
C="--rep --data rep-counterfact --n 100 --threads 1 --tests $T \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
# plain MEMIT: its value step without the value-side forms (MEMIT's default before 0.2.0)
repedit analyze ceiling --method memit $C \
    --set value.robust_forms=0 --set value.robust_prefix_lengths= --out runs/a-memit-rep
repedit analyze ceiling --method memit $C \
    --set value.robust_forms=3 --set value.robust_prefix_lengths=50,300 \
    --out runs/b-memit-value-side-rep
repedit analyze ceiling --method core $C --out runs/c-core-rep
