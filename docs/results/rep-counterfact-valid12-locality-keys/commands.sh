# SmolLM2-135M, ROME's layer, the first 12 REP-CounterFact validation cases: the share of a
# ROME edit written at each probe's keys when 20 or 100 other CounterFact subjects' keys are
# held in the solve at weight mu (no value optimisation: the share does not depend on v*).
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to four other jobs (4 min).
export REPEDIT_DATA=../shared/data
python tools/locality_keys.py --n 12 --held 20,100 --mu 0,0.1,1,10 \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 \
    --out runs/rome/locality_keys.json
