# SmolLM2-135M (embedded), CPU, float32, the first 1,000 CounterFact cases each editor accepts,
# editor defaults (25 value steps, streamed value batches, key_mode "auto"), a seeded sample of
# 100 cases for paraphrase, neighbourhood and fluency (100 sampled tokens per text).
# One torch thread each, run side by side at nice 5 on a shared 2-core machine (see docs/scale.md).
export REPEDIT_DATA=../shared/data
# one batch of 1,000; "auto" resolves to "mean" at this size; then the same batch solved with
# "each" on the same values
python benchmarks/mass_edit.py --method memit --n 1000 --threads 1 --also-key-mode each \
    --out runs/memit-1000
# ten sequential batches of 100 ("auto" resolves to "each" at 100)
python benchmarks/mass_edit.py --method alphaedit --n 1000 --batch-size 100 --threads 1 \
    --out runs/alphaedit-1000-seq
