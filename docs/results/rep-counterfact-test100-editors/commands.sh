# SmolLM2-135M, REP-CounterFact test cases 0-99: the five editors at their defaults, each plain
# and with REP at its defaults (the generalisation setting: gate_subject_tokens=ignore,
# generated forms, 16 pool subjects, negative_pool=auto), with the oracle key k* for the gap
# closed. a-rome-rep and c-memit-rep are the runs of rep-counterfact-test100-ceiling and
# rep-counterfact-test100-memit-ceiling, which wrote the setting out as --rep-set options.
# Made with repedit 0.2.0.dev0 on 2026-12-06, 1 thread each, two or three jobs on 2 cores
# (R-ROME 38 min, EMMET 38 min, AlphaEdit 56 min).
export REPEDIT_DATA=../shared/data
T=efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject
C="--rep --data rep-counterfact --n 100 --threads 1 --tests $T \
   --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000"
repedit analyze ceiling --method rome $C --out runs/a-rome-rep
repedit analyze ceiling --method r-rome $C --out runs/b-r-rome-rep
repedit analyze ceiling --method memit $C --out runs/c-memit-rep
repedit analyze ceiling --method emmet $C --out runs/d-emmet-rep
repedit analyze ceiling --method alphaedit $C --out runs/e-alphaedit-rep
