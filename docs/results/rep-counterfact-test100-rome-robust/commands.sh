# SmolLM2-135M, ROME, REP-CounterFact test cases 0-99: the configurations of docs/core.md's
# test tables, each scored plain, with REP at its defaults (the generalisation setting) and with
# the oracle key. a-rome-rep is plain ROME: its success and locality tests are the ROME run of
# rep-counterfact-test100-editors (ceiling.json) and its long-context test the run of
# rep-counterfact-test100-longctx (ceiling.long_context.json); both runs made the same edits
# (their efficacy rows agree). b-rome-value-side-rep adds the value-side forms chosen on the
# validation cases (three in-domain scrambles and passages of 50 and 300 words as rows of v*'s
# loss); its in-domain scramble half is trained on, so only the held-out half is a measure.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread, next to two or three other jobs (109 min).
export REPEDIT_DATA=../shared/data
T=efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,long_context,neighbourhood,near_subject
C="--rep --data rep-counterfact --n 100 --threads 1 \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling --method rome $C \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --out runs/a-rome-rep
repedit analyze ceiling --method rome $C --tests efficacy,long_context --out runs/a-rome-rep-long
repedit analyze ceiling --method rome $C --tests $T \
    --set value.robust_forms=3 --set value.robust_prefix_lengths=50,300 \
    --out runs/b-rome-value-side-rep
# c-rome-passages: the value-side passages alone (no scrambles), to see whether the long-context
# gain keeps ROME's locality; scored plain and with the oracle key, without REP (the "always"
# list of a default is about the edit alone). Made on 2026-12-07, 1 thread, next to one or two
# other jobs (50 min).
repedit analyze ceiling --method rome --data rep-counterfact --n 100 --threads 1 \
    --tests efficacy,long_context,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 \
    --set value.robust_prefix_lengths=50,300 --out runs/c-rome-passages
# d-rome-passages-steps50: the same with up to 50 value steps (25 before), since the one edit
# c-rome-passages lost stopped at the step limit. Made on 2026-12-07, 1 thread, next to one
# other job and a CI run (50 min).
repedit analyze ceiling --method rome --data rep-counterfact --n 100 --threads 1 \
    --tests efficacy,long_context,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 \
    --set value.robust_prefix_lengths=50,300 --set value.steps=50 --out runs/d-rome-passages-steps50
