# SmolLM2-135M, MEMIT (its default layers), REP-CounterFact test cases 0-99: plain, REP with the
# generalisation setting (REP's defaults since: gate_subject_tokens=ignore, generated forms, 16
# pool subjects, negative_pool=auto; written out so the line reproduces it under any default)
# and the oracle key k* at the probe's last subject token at every edited layer.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to one or two other jobs (71 min).
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --method memit --rep --data rep-counterfact --n 100 --threads 1 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 \
    --rep-set gate_subject_tokens=ignore \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --rep-set pool_negatives=16 --rep-set negative_pool=auto --out runs/memit-rep-generalise
