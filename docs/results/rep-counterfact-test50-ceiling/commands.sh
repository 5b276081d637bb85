# SmolLM2-135M, ROME, REP-CounterFact test cases 0-49, REP with its defaults; plain, REP and the
# oracle key k* at the probe's last subject token (every subject token: oracle all).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread.
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --method rome --rep --data rep-counterfact --n 50 --threads 1 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/rome-rep
# the setting that generalised best on the validation cases (not a default: see generalisation.md)
repedit analyze ceiling --method rome --rep --data rep-counterfact --n 50 --threads 1 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 \
    --rep-set gate_subject_tokens=ignore \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --out runs/rome-rep-ignore-aug
# the same with gate negatives from a subject pool (CounterFact subjects the evaluation never
# uses; chosen on the validation cases, rep-pool-negatives-valid12), 1 thread, shared machine.
# rome-rep-ignore-aug-pool16 was made before keep_prompt_key kept every subject token of the edit
# prompt under ignore (commit 482e211); rome-rep-ignore-aug-pool16-keep after it (same command)
repedit analyze ceiling --method rome --rep --data rep-counterfact --n 50 --threads 1 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 \
    --rep-set gate_subject_tokens=ignore \
    --rep-set augment=case,spacing,punct,noise,determiner,initials,truncate --rep-set n_augment=2 \
    --rep-set pool_negatives=16 --out runs/rome-rep-ignore-aug-pool16
# (rome-rep-ignore-aug-pool16-keep: the same command, --out runs/rome-rep-ignore-aug-pool16-keep)
