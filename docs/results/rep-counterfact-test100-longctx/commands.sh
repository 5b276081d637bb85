# SmolLM2-135M, ROME, REP-CounterFact test cases 0-99: the long-context probe (a 512-token
# passage before the prompt) plain, with REP at its defaults (the generalisation setting:
# gate_subject_tokens=ignore, generated forms, 16 pool subjects, negative_pool=auto) and with the
# oracle key. Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to one or two other
# jobs (47 min).
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --method rome --rep --data rep-counterfact --n 100 --threads 1 \
    --tests efficacy,long_context \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/rome-rep
