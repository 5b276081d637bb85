# SmolLM2-135M, MEMIT, REP-CounterFact test cases 0-19 edited as one batch of 20 (batch mode):
# plain, REP with one adapter set shared by the batch (the batch-mode default), and REP with one
# adapter set per edit (shared=false). 1 thread each, beside two mass_edit.py runs on 2 cores.
export REPEDIT_DATA=../shared/data
T=efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject
C="--data rep-counterfact --n 20 --mode batch --batch-size 20 --tests $T --threads 1 \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit eval --method memit $C --out runs/memit-b20-plain
repedit eval --method memit $C --rep --out runs/memit-b20-rep-shared
repedit eval --method memit $C --rep --rep-set shared=false --out runs/memit-b20-rep-own
repedit eval --method memit $C --rep --rep-set rank=128 --rep-set steps=160 --out runs/memit-b20-rep-shared-r128-s160
repedit eval --method memit $C --rep --rep-set rank=128 --rep-set steps=160 --rep-set beta_guard=none \
    --out runs/memit-b20-rep-shared-r128-s160-noguard
