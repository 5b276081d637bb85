"""The fast (packed) scoring path against the reference (padded) path, and packing itself.

Both paths compute the same sums in different orders (other matrix shapes, masked entries
that add exact zeros), so log-probs agree to float32 rounding, not bit for bit. Reordering a
sum of ``n`` float32 terms moves it by at most about ``n · eps`` relative to the sum of their
magnitudes; the widest sums of a layer run over the hidden width plus the attended tokens,
and the layers add their perturbations. The tolerance is that bound,
``eps · layers · (width + tokens) · max(1, |score|)``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from repedit.errors import InvalidRequestError
from repedit.evaluation.packing import build_rows, group_by_prompt, pack
from repedit.evaluation.scoring import (
    Probe,
    ProbeScore,
    greedy_completion,
    score_probes,
    tokenize_probe,
)
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded
from repedit.rep.adapter import RepAdapter, RepConfig
from repedit.rep.inject import rep_applied

torch.set_num_threads(1)

EPS = torch.finfo(torch.float32).eps

PROBES = [
    Probe("The capital of France is", "Paris", alt="Berlin"),
    Probe("Rome is", "the capital of Italy"),
    Probe("The mother tongue of Michel Rocard is", "French", alt="English"),
    Probe("Toyota was founded in", "Japan and Europe"),
    Probe("Lionel Messi plays", "football", alt="tennis for Barcelona"),
    Probe("Rome is", "the capital of Italy", alt="a city"),  # a prompt seen before
    Probe("Rome is", "the capital of Italy"),  # a probe seen before
]


def _tolerance(lm, value: float, n_tokens: int) -> float:
    return EPS * lm.arch.n_layers * (lm.arch.d_model + n_tokens) * max(1.0, abs(value))


def assert_same_records(
    lm, probes: list[Probe], fast: list[ProbeScore], ref: list[ProbeScore]
) -> None:
    """Identical flags and predictions; log-probs within float32 rounding of each other."""
    assert len(fast) == len(ref) == len(probes)
    for probe, f, r in zip(probes, fast, ref, strict=True):
        n = sum(map(len, tokenize_probe(lm.tokenizer, probe.prompt, probe.target)))
        assert f.pred_tokens == r.pred_tokens, probe
        assert f.target_tokens == r.target_tokens
        flags = ("exact", "token_acc", "beats_alt", "agree")
        assert [getattr(f, k) for k in flags] == [getattr(r, k) for k in flags], probe
        assert f.logprob == pytest.approx(r.logprob, abs=_tolerance(lm, r.logprob, n))
        assert (f.alt_logprob is None) == (r.alt_logprob is None)
        if r.alt_logprob is not None:
            assert probe.alt is not None
            n_alt = sum(map(len, tokenize_probe(lm.tokenizer, probe.prompt, probe.alt)))
            assert f.alt_logprob == pytest.approx(
                r.alt_logprob, abs=_tolerance(lm, r.alt_logprob, n_alt)
            )


# --------------------------------------------------------------------------- packing


def test_items_share_a_prompt_and_rows_respect_capacity():
    seqs = [([1, 2, 3], [4]), ([1, 2, 3], [5, 6]), ([7], [8]), ([1, 2], [4]), ([9] * 10, [1])]
    items = group_by_prompt(seqs)
    assert [it.prompt for it in items] == [[1, 2, 3], [7], [1, 2], [9] * 10]
    assert items[0].answers == [[4], [5, 6]] and items[0].seqs == [0, 1]
    rows = pack(items, capacity=6)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3]
    for row in rows:
        tokens = sum(items[i].tokens for i in row)
        assert tokens <= 6 or len(row) == 1  # an item longer than a row gets its own


def test_tree_mask_hides_sibling_answers_and_other_items():
    (row,) = build_rows([([1, 2], [3, 4]), ([1, 2], [5]), ([6], [7])], capacity=100)
    assert row.ids == [1, 2, 3, 4, 5, 6, 7]  # the larger item first
    allowed = row.attention(torch.float32)[0, 0] == 0
    at = {tok: i for i, tok in enumerate(row.ids)}
    assert allowed[at[5], at[1]] and allowed[at[5], at[2]] and allowed[at[5], at[5]]
    assert not allowed[at[5], at[3]] and not allowed[at[5], at[4]]  # a sibling answer
    assert not allowed[at[7], at[1]] and allowed[at[7], at[6]]  # another item
    assert not allowed[at[1], at[2]]  # causal
    assert row.positions[at[5]] == 2 and row.positions[at[4]] == 3 and row.positions[at[7]] == 1
    assert row.prompt_mask()[0].tolist() == [i in (1, 2, 6) for i in row.ids]
    # each answer's first token is read where its prompt ends; later ones behind it
    reads, answer = row.targets[0]
    assert answer == [3, 4] and reads == [at[2], at[3]]
    assert row.targets[1][0] == [at[2]]


# --------------------------------------------------------------------------- fast == reference


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fast_equals_reference(family):
    lm = tiny_loaded(family)
    ref = score_probes(lm, PROBES, batch_size=3, impl="reference")
    reference = [s.pred_tokens for s in ref]
    fast = score_probes(lm, PROBES, reference=reference, impl="fast")
    ref = score_probes(lm, PROBES, reference=reference, batch_size=3, impl="reference")
    assert_same_records(lm, PROBES, fast, ref)


def test_lm_head_reads_each_shared_position_once():
    lm = tiny_loaded("llama")
    shapes = []
    hook = lm.arch.lm_head().register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    probe = Probe("The capital of France is", "Paris and Berlin", alt="Rome")
    try:
        score_probes(lm, [probe])
    finally:
        hook.remove()
    n_target = len(tokenize_probe(lm.tokenizer, probe.prompt, probe.target)[1])
    n_alt = len(tokenize_probe(lm.tokenizer, probe.prompt, probe.alt)[1])
    # one position predicts both answers' first tokens
    assert shapes == [torch.Size([1, n_target + n_alt - 1, lm.model.config.vocab_size])]


def test_unknown_impl_is_refused():
    with pytest.raises(InvalidRequestError, match="impl"):
        score_probes(tiny_loaded("llama"), PROBES[:1], impl="slow")  # type: ignore[arg-type]


def _open_adapter(d: int, prompt_only: bool) -> RepAdapter:
    """An adapter whose gate is forced open, so it changes every key it may touch."""
    torch.manual_seed(0)
    adapter = RepAdapter(d, RepConfig(gate_bias_init=20.0, prompt_only=prompt_only))
    with torch.no_grad():
        adapter.B.weight.normal_(0, 0.5)
    return adapter.eval()


@pytest.mark.parametrize("prompt_only", [True, False])
def test_fast_equals_reference_with_rep_attached(prompt_only):
    lm = tiny_loaded("llama")
    adapters = {1: _open_adapter(lm.arch.d_mlp, prompt_only)}
    plain = score_probes(lm, PROBES, impl="reference")
    with rep_applied(lm, adapters, count=True) as inj:
        ref = score_probes(lm, PROBES, batch_size=3, impl="reference")
        ref_tokens = inj.gate_rates()[1]["tokens"]
        inj.reset_counts()
        fast = score_probes(lm, PROBES, impl="fast")
        fast_tokens = inj.gate_rates()[1]["tokens"]
    assert_same_records(lm, PROBES, fast, ref)
    assert [s.logprob for s in ref] != pytest.approx([s.logprob for s in plain], abs=1e-3)
    seqs = [(p.prompt, a) for p in PROBES for a in (p.target, p.alt) if a is not None]
    ids = [tokenize_probe(lm.tokenizer, p, a) for p, a in seqs]
    if prompt_only:  # the fast path runs each distinct prompt once
        assert ref_tokens == sum(len(p) for p, _ in ids)
        assert fast_tokens == sum(len(p) for p in {tuple(p) for p, _ in ids})
    else:
        assert fast_tokens < ref_tokens  # no padding, shared prompts


# --------------------------------------------------------------------------- real cases


@pytest.mark.integration
def test_fast_equals_reference_on_rep_counterfact(smollm2, shared_data: Path):
    from repedit.data import load_cases
    from repedit.errors import RepeditError
    from repedit.evaluation.probes import CaseProbes, SuiteConfig, build_probes, passage_sampler

    try:
        cases = load_cases("rep-counterfact", data_dir=shared_data).cases[:3]
    except RepeditError as exc:
        pytest.skip(f"REP-CounterFact not available: {exc}")
    suite = SuiteConfig()
    sampler = passage_sampler(smollm2, suite)
    adapters = {3: _open_adapter(smollm2.arch.d_mlp, prompt_only=True)}
    for n, case in enumerate(cases):
        flat = CaseProbes("k", build_probes(case, smollm2, suite, sampler=sampler)).flat
        assert flat
        # the harness scores long passages apart in the reference path (padding)
        short = [p for p in flat if p.test != "long_context"]
        long = [p for p in flat if p.test == "long_context"]
        injected = rep_applied(smollm2, adapters) if n == 0 else contextlib.nullcontext()
        with injected:  # case 0: REP injected
            ref = score_probes(smollm2, short, impl="reference")
            ref += score_probes(smollm2, long, impl="reference") if long else []
            fast = score_probes(smollm2, short + long, impl="fast")
        assert_same_records(smollm2, short + long, fast, ref)


# --------------------------------------------------------------------------- precision


def test_bfloat16_precision_runs_the_forward_under_autocast():
    lm = tiny_loaded("llama")
    seen: list[torch.dtype] = []
    linear = lm.arch.down_proj(0)
    hook = linear.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        plain = score_probes(lm, PROBES[:2])
        assert seen and set(seen) == {torch.float32}
        seen.clear()
        half = score_probes(lm, PROBES[:2], precision="bfloat16")
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        greedy_completion(lm, ["Rome is"], 2, precision="bfloat16")
        assert seen and set(seen) == {torch.bfloat16}
    finally:
        hook.remove()
    for h, p in zip(half, plain, strict=True):
        assert h.target_tokens == p.target_tokens and torch.isfinite(torch.tensor(h.logprob))
    with pytest.raises(InvalidRequestError, match="precision"):
        score_probes(lm, PROBES[:1], precision="half")  # type: ignore[arg-type]
