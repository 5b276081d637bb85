# SmolLM2-135M, MEMIT (its default layers), REP-CounterFact test cases 0-39: the long-context
# probe (a 512-token passage before the prompt) plain, with REP at its defaults (the
# generalisation setting) and with the oracle key at every edited layer.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to one or two other jobs (24 min).
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --method memit --rep --data rep-counterfact --n 40 --threads 1 \
    --tests efficacy,long_context \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/memit-rep
