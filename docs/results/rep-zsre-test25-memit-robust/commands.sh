# SmolLM2-135M, REP-ZsRE test cases 0-24: plain MEMIT, MEMIT with the value-side forms (three
# in-domain scrambles and passages of 50 and 300 words as rows of v*'s loss) and CoRE at its
# defaults (per-request prefixes, variance weight 1e-4), each scored plain, with REP at its
# defaults and with the oracle key at every edited layer. Made with repedit 0.2.0.dev0 on
# 2026-12-06, 1 thread, next to two other jobs (14, 32 and 16 min).
export REPEDIT_DATA=../shared/data
C="--rep --data rep-zsre --n 25 --threads 1 \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,neighbourhood \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
# plain MEMIT: its value step without the value-side forms (MEMIT's default before 0.2.0)
repedit analyze ceiling --method memit $C \
    --set value.robust_forms=0 --set value.robust_prefix_lengths= --out runs/a-memit-rep
repedit analyze ceiling --method memit $C \
    --set value.robust_forms=3 --set value.robust_prefix_lengths=50,300 \
    --out runs/b-memit-value-side-rep
repedit analyze ceiling --method core $C --out runs/c-core-rep
