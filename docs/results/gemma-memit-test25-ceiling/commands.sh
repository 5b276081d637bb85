# Gemma-3-270M, MEMIT at its default layers (2-4 of 18), REP-CounterFact test cases 0-24, REP with
# its defaults: plain, REP and the oracle key. Since MEMIT-style editors map their residual
# share through Gemma's post-MLP norm (before that, every edit failed: 0 of 10 edit prompts).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, three jobs on 2 cores (18 min).
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --model gemma3-270m --method memit --rep --data rep-counterfact --n 25 \
    --threads 1 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/memit-rep
