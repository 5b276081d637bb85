# SmolLM2-135M, ROME, REP-ZsRE test cases 0-99: plain, REP at its defaults (the generalisation
# setting) and the oracle key. ZsRE's locality test is the dataset's unrelated question.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to two or three other jobs (58 min).
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --method rome --rep --data rep-zsre --n 100 --threads 1 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,neighbourhood \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/a-rome-rep
