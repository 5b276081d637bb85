# SmolLM2-135M, ROME at its default layer, REP-CounterFact *validation* cases 0-11 (settings are
# chosen here, never on the test cases); each run scores plain, REP and the oracle key.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread each, two runs at a time.
export REPEDIT_DATA=../shared/data
C="--method rome --rep --data rep-counterfact-valid --n 12 --threads 1 \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling $C --out runs/base                                  # REP defaults
repedit analyze ceiling $C --rep-set augment=span --rep-set n_augment=4 --out runs/span
repedit analyze ceiling $C --rep-set tau=0.5 --out runs/tau05
repedit analyze ceiling $C --rep-set weight_decay=1.0 --out runs/wd1
repedit analyze ceiling $C --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate \
    --rep-set n_augment=2 --out runs/augall
repedit analyze ceiling $C --rep-set steps=80 --out runs/steps80
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore --out runs/ignore
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --out runs/ignore-aug
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore --rep-set negatives=true \
    --out runs/ignore-neg
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore --rep-set negatives=true \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --out runs/ignore-aug-neg
