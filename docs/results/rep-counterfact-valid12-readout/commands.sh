# SmolLM2-135M (embedded), ROME at layer 5, REP-CounterFact validation cases 0-11 (the first 12):
# the success probes scored plain, with the oracle key, and with the subject's layer output patched
# from the edit prompt at layers 4, 5, 8, ..., 26, 28 (last subject token, and every subject token).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread under nice on a shared 2-core machine
# (21 min CPU, 28 min wall).
export REPEDIT_DATA=../shared/data
repedit analyze readout --method rome --data rep-counterfact-valid --n 12 --threads 1 --layer-step 3 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,long_context \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/readout-rome
