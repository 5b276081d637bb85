# SmolLM2-135M (embedded), ROME at layer 5, REP-CounterFact validation cases 0-11 (the first 12):
# the success probes scored plain, with the oracle key, and with the subject's layer output patched
# from the edit prompt at layers 4, 5, 8, ..., 26, 28 (last subject token, and every subject token).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread under nice on a shared 2-core machine
# (21 min CPU, 28 min wall).
export REPEDIT_DATA=../shared/data
repedit analyze readout --method rome --data rep-counterfact-valid --n 12 --threads 1 --layer-step 3 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,long_context \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/readout-rome

# The same cases edited with MEMIT, its default layers 4-8 and a range ending higher, 4-12: plain,
# oracle key (k* at every edited layer) and one patch (hidden@14). Same day, same machine,
# two runs side by side (4 and 6 min CPU; the 4-12 run includes 5 min of key statistics for
# layers 9-12).
C="--data rep-counterfact-valid --n 12 --threads 1 --layers 14 --last-token-only \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,long_context \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze readout --method memit $C --out runs/readout-memit-4-8
repedit analyze readout --method memit $C --set 'layers=[4,5,6,7,8,9,10,11,12]' --out runs/readout-memit-4-12

# ROME again, every layer from 19 to 23 at the last subject token (where the sweep above falls).
# Same day, same machine (7 min CPU).
repedit analyze readout --method rome --data rep-counterfact-valid --n 12 --threads 1 \
    --layers 19-23 --last-token-only \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,long_context \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/readout-rome-19-23
