# SmolLM2-135M, ROME, REP-ZsRE test cases 0-49: plain ROME and ROME with the value-side forms
# (three in-domain scrambles and passages of 50 and 300 words as rows of v*'s loss), each
# scored plain, with REP at its defaults and with the oracle key. ZsRE's goal is on the subject
# paraphrases (plain + 10 points); its locality test is the dataset's unrelated question.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to two other jobs (26 and 34 min).
export REPEDIT_DATA=../shared/data
C="--rep --data rep-zsre --n 50 --threads 1 \
   --tests efficacy,subject_paraphrase,ood_subject_paraphrase,neighbourhood \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling --method rome $C --out runs/a-rome-rep
repedit analyze ceiling --method rome $C \
    --set value.robust_forms=3 --set value.robust_prefix_lengths=50,300 \
    --out runs/b-rome-value-side-rep
