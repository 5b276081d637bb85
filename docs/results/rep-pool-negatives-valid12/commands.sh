# SmolLM2-135M, ROME at its default layer, REP-CounterFact *validation* cases 0-11: gate
# negatives from a subject pool (CounterFact subjects the evaluation never uses), against the
# REP defaults and gate_subject_tokens=ignore with and without generated forms (those three
# runs are the same files as in rep-generalisation-valid12).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread each, two runs at a time.
export REPEDIT_DATA=../shared/data
C="--method rome --rep --data rep-counterfact-valid --n 12 --threads 1 \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
AUG="--rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2"
repedit analyze ceiling $C --out runs/base                                  # REP defaults
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore --out runs/ignore
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore $AUG --out runs/ignore-aug
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore --rep-set pool_negatives=8 \
    --out runs/ignore-pool8
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore $AUG --rep-set pool_negatives=8 \
    --out runs/ignore-aug-pool8
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore $AUG --rep-set pool_negatives=16 \
    --out runs/ignore-aug-pool16
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore $AUG --rep-set pool_negatives=8 \
    --rep-set negatives=true --rep-set negative_sources=subjects --out runs/ignore-aug-pool8-neg
repedit analyze ceiling $C --rep-set gate_subject_tokens=ignore $AUG --rep-set pool_negatives=16 \
    --rep-set pool_kinds=kin,lookalike,random --out runs/ignore-aug-pool16-kin
