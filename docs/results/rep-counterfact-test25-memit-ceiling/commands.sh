# SmolLM2-135M, MEMIT (its default layers), REP-CounterFact test cases 0-24: plain, REP and the
# oracle key k* at the probe's last subject token at every edited layer.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 2 threads, machine otherwise idle.
export REPEDIT_DATA=../shared/data
C="--method memit --rep --data rep-counterfact --n 25 --threads 2 \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling $C --out runs/memit-rep
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --out runs/memit-rep-ignore-aug
# with gate negatives from a subject pool, and (since this commit) every subject token of the
# edit prompt kept at its key under ignore (1 thread, shared machine)
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --rep-set pool_negatives=16 --out runs/memit-rep-ignore-aug-pool16
