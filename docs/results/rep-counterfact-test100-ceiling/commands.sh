# SmolLM2-135M, ROME, REP-CounterFact test cases 0-99, REP with its defaults of the time (now
# --rep-ablation listed-forms): plain, REP and the
# oracle key k* at the probe's last subject token (every subject token: oracle all).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 2 threads, machine otherwise idle (16 min).
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --method rome --rep --data rep-counterfact --n 100 --threads 2 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/rome-rep
# the generalisation setting (REP's defaults since: gate_subject_tokens=ignore, generated forms,
# 16 pool subjects, negative_pool=auto), written out so the line reproduces it under any default.
# 1 thread, next to one other single-thread job and tests (47 min).
repedit analyze ceiling --method rome --rep --data rep-counterfact --n 100 --threads 1 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 \
    --rep-set gate_subject_tokens=ignore \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --rep-set pool_negatives=16 --rep-set negative_pool=auto --out runs/rome-rep-generalise
