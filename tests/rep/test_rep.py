"""REP on tiny random models: the adapter's semantics (identity at start, hard gate at τ,
deterministic eval), injection through hooks only, save/load, the training pool (long-context
examples, no repeated batch), training (loss down, whitened alignment up, bare-prompt key kept,
only adapter parameters learn; every adapted layer trains) on every family.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from numerics import assert_within, forward_tolerance, max_error, tolerance
from repedit.data.augment import candidates
from repedit.data.case import EditCase, EditRequest, Neighbour
from repedit.editors import StatsConfig, make_editor
from repedit.errors import FingerprintMismatchError, InvalidRequestError
from repedit.evaluation.scoring import Probe, greedy_completion, score_probes, tokenize_probe
from repedit.io import read_safetensors, write_safetensors
from repedit.models.hooks import Hooks
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded
from repedit.models.tokens import locate
from repedit.rep import (
    RepAdapter,
    RepConfig,
    RepStack,
    build_pool,
    gate_rates,
    heldout_examples,
    load_adapters,
    make_adapters,
    read_keys,
    released_config,
    rep_applied,
    rep_items,
    save_adapters,
    train_rep,
    train_rep_after,
    train_rep_for_editor,
)
from repedit.rep.inject import attach
from repedit.rep.targets import edit_targets
from repedit.rep.variants import NoRepeatBatches, passage_sampler
from repedit.stats import second_moments
from tiny_text import tiny_corpus_text

#: a fast edit: few contexts, few value steps
FAST = {"contexts": ((3, 2),), "value": {"steps": 8}}

CASE = EditCase(
    EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
    subject_paraphrases=[
        "the city of Paris",
        "Paris France",
        "Pari",
        "the French capital",
        "Lutetia",
        "Paree",
        "Paris city",
    ],
    neighbourhood=[Neighbour("Toyota was founded in", "Japan")],
)
OTHER = EditCase(
    EditRequest("Toyota was founded in {}", "Japan", "Europe", case_id="toyota"),
    subject_paraphrases=["the country of Japan", "Nippon", "Japan Asia"],
)


def tiny_cfg(corpus: Path, **kw: object) -> RepConfig:
    """Short passages (the tiny corpus is small) and a fast-learning gate for tiny models."""
    base = {
        "long_context_corpus": str(corpus),
        "long_context_length": 30,
        "steps": 4,
        "batch": 6,
    }
    return RepConfig().replace(**{**base, **kw})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random text over most of the tiny tokenizer's vocabulary (well-conditioned C)."""
    root = tmp_path_factory.mktemp("rep-corpus")
    path = root / "corpus.txt"
    path.write_text(tiny_corpus_text())
    return path


@pytest.fixture(scope="module")
def stats_cfg(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> StatsConfig:
    cache = tmp_path_factory.mktemp("rep-stats")
    return StatsConfig(corpus=str(corpus), n_tokens=3000, cache=str(cache), progress=False)


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def edited(lm, stats_cfg):
    """A ROME edit of CASE (not applied) with its editor."""
    editor = make_editor("rome", FAST, stats_cfg)
    result = editor.edit(lm, [CASE.request], apply=False)
    return editor, result


def _snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_unchanged(lm, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def _logits(lm, text: str = "The Eiffel Tower is in Paris and Rome") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


F32 = torch.float32


def _adapter_tol(k: torch.Tensor, adapter: RepAdapter) -> float:
    """An adapter's output two ways: the projection's two products of ``d`` terms on keys of
    this size, through ``|B||A|`` (the bound on ``sum |B_ij A_jk k_k|``)."""
    gain = float((adapter.B.weight.detach().abs() @ adapter.A.weight.detach().abs()).sum(1).max())
    magnitude = float(k.abs().max()) * (1 + gain * adapter.scale)
    return tolerance(torch.float32, terms=k.shape[-1], stages=2, magnitude=magnitude)


def _key_tol(lm, layer: int, keys: list[torch.Tensor]) -> float:
    """Keys at ``layer`` from two forwards (other batching, padding or replay)."""
    magnitude = max(float(k.abs().max()) for k in keys)
    seq_len = max(k.shape[0] for k in keys)
    return forward_tolerance(
        lm.arch, blocks=layer + 1, head=False, magnitude=magnitude, seq_len=seq_len
    )


def _open_adapter(d: int, **cfg: object) -> RepAdapter:
    """An adapter with a moved projection and a gate forced open (bias +20)."""
    torch.manual_seed(0)
    adapter = RepAdapter(d, RepConfig(gate_bias_init=20.0, **cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        adapter.B.weight.normal_(0, 0.5)
    return adapter


# --------------------------------------------------------------------------- adapter


def test_config_rejects_unknown_fields_and_parses_strings() -> None:
    with pytest.raises(InvalidRequestError, match="unknown"):
        RepConfig().replace(rnak=4)
    assert RepConfig().replace(use_gate="False").use_gate is False  # never bool("False") (D7)
    assert RepConfig().replace(steps="20").steps == 20
    with pytest.raises(InvalidRequestError, match="target"):
        RepConfig(target="nope")
    assert RepConfig().gate_hidden(11008) == 1100
    assert RepConfig().gate_hidden(40) == 8


def test_adapter_starts_as_identity_in_train_and_eval() -> None:
    torch.manual_seed(0)
    adapter = RepAdapter(128)
    assert torch.count_nonzero(adapter.B.weight) == 0
    k = torch.randn(3, 7, 128)
    for mode in (True, False):
        adapter.train(mode)
        assert torch.equal(adapter(k), k)
    # a gate that starts near 0.5 (default init) is shut at τ = 0.9
    assert float(adapter.gate(k).detach().max()) < 0.9


@pytest.mark.numerics
def test_hard_gate_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _open_adapter(64)
    k = torch.randn(2, 5, 64)
    proj = adapter.eval().project(k)
    for value, opened in ((0.89, False), (0.91, True)):
        monkeypatch.setattr(adapter, "gate", lambda x, v=value: torch.full(x.shape[:-1], v))
        adapter.eval()
        out = adapter(k)
        expected = k + proj if opened else k
        assert_within(out, expected, _adapter_tol(k, adapter), "open adapter")
        if not opened:
            assert torch.equal(out, k)  # shut: the key itself
        adapter.train()
        soft = adapter.B(adapter.A(k)) * adapter.scale  # dropout aside, the soft gate scales P
        torch.manual_seed(1)
        out_train = adapter(k)
        assert not torch.allclose(out_train, k + soft)  # dropout is on in training
    adapter.dropout.p = 0.0
    assert_within(adapter(k), k + 0.91 * proj, _adapter_tol(k, adapter), "soft gate")


def test_eval_is_deterministic_and_dropout_is_a_submodule() -> None:
    adapter = _open_adapter(64)
    k = torch.randn(4, 64)
    adapter.eval()
    assert not adapter.dropout.training  # registered: eval() reaches it
    a, b = adapter(k), adapter(k)
    assert torch.equal(a, b)
    assert not torch.equal(a, k)
    adapter.train()
    assert adapter.dropout.training
    assert not torch.equal(adapter(k), adapter(k))


@pytest.mark.numerics
def test_adapter_keeps_dtype_and_no_gate_ablation() -> None:
    adapter = _open_adapter(32).eval()
    k = torch.randn(2, 32, dtype=torch.bfloat16)
    assert adapter(k).dtype == torch.bfloat16
    plain = RepAdapter(32, RepConfig(use_gate=False))
    with torch.no_grad():
        plain.B.weight.fill_(0.1)
    plain.eval()
    k = torch.randn(2, 32)
    assert_within(plain(k), k + plain.project(k), _adapter_tol(k, plain), "no gate")


@pytest.mark.numerics
def test_stack_sums_adapters() -> None:
    a, b = _open_adapter(32).eval(), _open_adapter(32).eval()
    with torch.no_grad():
        b.B.weight.mul_(-0.5)
    stack = RepStack([a, b]).eval()
    k = torch.randn(3, 32)
    tol = _adapter_tol(k, a) + _adapter_tol(k, b)
    assert_within(stack(k), k + a.project(k) + b.project(k), tol, "stack")


@pytest.mark.numerics
def test_beta_guard_keeps_keys_that_already_retrieve_the_edit() -> None:
    """With ``beta_guard``, an open gate leaves a key alone when β̃(k) = k·w ≥ the guard, for
    any of the adapter's edits; in training, or with the guard off, nothing changes."""
    adapter = _open_adapter(16).eval()
    w = torch.zeros(2, 16)
    w[0, 0], w[1, 1] = 1.0, 1.0  # β̃ = k[0] for edit 0, k[1] for edit 1
    adapter.set_guard(w)
    k = torch.randn(6, 16)
    k[0, :2] = torch.tensor([0.9, 0.0])  # retrieves edit 0: kept
    k[1, :2] = torch.tensor([0.0, 0.5])  # retrieves edit 1 at 0.5: kept (≥)
    k[2:, :2] = torch.tensor([0.2, -3.0])  # retrieves neither: adapted
    assert adapter.beta_guard == 0.5  # on by default (the paper has no guard)
    adapter.beta_guard = None
    off = adapter(k)
    assert not torch.equal(off[0], k[0])
    adapter.beta_guard = 0.5
    out = adapter(k)
    assert torch.equal(out[:2], k[:2])
    tol = _adapter_tol(k, adapter)
    assert_within(out[2:], k[2:] + adapter.project(k[2:]), tol, "adapted keys")
    assert torch.equal(adapter(k[:2]), k[:2])  # every token kept: the key itself
    adapter.train()
    adapter.dropout.p = 0.0
    assert not torch.equal(adapter(k)[0], k[0])  # training ignores the guard
    adapter.eval()
    stack = RepStack([adapter, _open_adapter(16).eval()]).eval()
    stack.adapters[1].set_guard(w)
    stack.beta_guard = 0.5  # reaches every member
    assert [m.beta_guard for m in stack.adapters] == [0.5, 0.5]
    assert torch.equal(stack(k[:2]), k[:2])
    stack.beta_guard = None
    assert not torch.equal(stack(k[:2]), k[:2])
    stack.beta_guard = 0.5
    plain = RepAdapter(16, RepConfig(use_gate=False, beta_guard=0.5)).eval()
    plain.set_guard(w)
    with torch.no_grad():
        plain.B.weight.fill_(0.1)
    got = plain(k)
    assert torch.equal(got[:2], k[:2]) and not torch.equal(got[2:], k[2:])
    with pytest.raises(InvalidRequestError, match="beta_guard"):
        RepConfig(beta_guard=float("nan"))


def test_prompt_key_is_kept_exactly() -> None:
    """``keep_prompt_key``: a key equal to the edit prompt's own (to 1e-3 relative) is kept even
    where the gate opens; a nearby but different key is not; off, nothing is kept."""
    adapter = _open_adapter(16).eval()
    adapter.beta_guard = None
    k = torch.randn(4, 16)
    adapter.set_prompt_keys(k[:1])
    near = k[0] * (1 + 1e-5)
    far = k[0] + 0.05 * k[0].norm() * torch.nn.functional.normalize(torch.randn(16), dim=0)
    keys = torch.stack([k[0], near, far, k[1]])
    out = adapter(keys)
    assert torch.equal(out[:2], keys[:2])
    assert not torch.equal(out[2], keys[2]) and not torch.equal(out[3], keys[3])
    adapter.cfg = adapter.cfg.replace(keep_prompt_key=False)
    assert not torch.equal(adapter(keys)[0], keys[0])
    # many rows of a wide key, equal up to float rounding: all kept (cdist's matmul shortcut,
    # which it takes above 25 rows, was measured to miss such copies at d ≥ 2560)
    wide = _open_adapter(4096).eval()
    wide.beta_guard = None
    k_o = torch.randn(4096) * 3
    wide.set_prompt_keys(k_o)
    copies = k_o * (1 + 1e-6 * torch.randn(64, 4096))
    assert torch.equal(wide(copies), copies)
    assert not released_config().keep_prompt_key  # the paper has no such rule


# --------------------------------------------------------------------------- injection


def test_injection_changes_output_and_removal_restores_bit_for_bit(lm) -> None:
    before_state = _snapshot(lm)
    before = _logits(lm)
    adapters = {1: _open_adapter(lm.arch.d_mlp), 2: _open_adapter(lm.arch.d_mlp)}
    with rep_applied(lm, adapters, count=True) as inj:
        during = _logits(lm)
        rates = inj.gate_rates()
    assert not torch.equal(before, during)
    assert rates[1]["tokens"] > 0 and rates[1]["rate"] == 1.0
    assert rates[1]["guarded"] == 0  # no guard: no open token kept
    assert torch.equal(_logits(lm), before)
    torch.manual_seed(0)
    adapters[1].set_guard(torch.randn(1, lm.arch.d_mlp))
    adapters[1].beta_guard = 0.0  # keeps the keys with k·w ≥ 0: some, not all
    with rep_applied(lm, adapters, count=True) as inj:
        guarded = _logits(lm)
        rates = inj.gate_rates()
    assert 0 < rates[1]["guarded"] < rates[1]["open"] == rates[1]["tokens"]
    assert not torch.equal(guarded, during)
    adapters[1].beta_guard = None
    _assert_unchanged(lm, before_state)
    assert not any(k.endswith(("A.weight", "B.weight")) for k in lm.model.state_dict())
    handle = attach(lm, adapters)
    assert not torch.equal(_logits(lm), before)
    handle.remove()
    assert torch.equal(_logits(lm), before)
    handle.remove()  # idempotent


def _adapted_at(adapter: RepAdapter, n_first: int):
    """A rewrite that applies ``adapter`` (eval mode) to the first ``n_first`` positions only."""

    def fn(k: torch.Tensor) -> torch.Tensor:
        first = torch.arange(k.shape[1])[None, :, None] < n_first
        return torch.where(first, adapter(k), k)

    return fn


@pytest.mark.numerics
def test_prompt_only_scoring_leaves_the_answer_tokens_alone(lm) -> None:
    adapter = _open_adapter(lm.arch.d_mlp).eval()
    probe = Probe("The Eiffel Tower is in", "Paris and Rome")
    p_ids, t_ids = tokenize_probe(lm.tokenizer, probe.prompt, probe.target)
    ids = torch.tensor([p_ids + t_ids])

    def by_hand(n_first: int) -> float:
        with torch.no_grad(), Hooks() as h:
            h.rewrite(lm.arch.down_proj(1), _adapted_at(adapter, n_first))
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
        return sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(t_ids))

    plain = score_probes(lm, [probe])[0].logprob
    with rep_applied(lm, {1: adapter}, count=True) as inj:
        # a second, longer probe in the same batch: each row gets its own prompt length
        longer = Probe(probe.prompt + " the", "city")
        got, _ = score_probes(lm, [probe, longer])
    # a log-prob summed over the target tokens, each through every block and the head
    # (log-probs of len(t_ids) tokens, each from logits of order one: magnitude |sum| + count)
    tol = forward_tolerance(lm.arch, blocks=lm.n_layers, magnitude=abs(plain) + len(t_ids))
    assert got.logprob == pytest.approx(by_hand(len(p_ids)), abs=tol)
    assert abs(got.logprob - plain) > tol  # the prompt's keys were adapted
    n_longer = len(tokenize_probe(lm.tokenizer, longer.prompt, longer.target)[0])
    assert n_longer > len(p_ids)
    assert inj.gate_rates()[1]["tokens"] == len(p_ids) + n_longer  # prompt tokens only
    adapter.cfg = adapter.cfg.replace(prompt_only=False)  # the paper: every token
    with rep_applied(lm, {1: adapter}):
        every = score_probes(lm, [probe])[0].logprob
    assert every == pytest.approx(by_hand(len(ids[0])), abs=tol)
    assert abs(every - got.logprob) > tol
    # a forward whose caller declares no prompt is adapted everywhere
    adapter.cfg = adapter.cfg.replace(prompt_only=True)
    everywhere = _by_rewrite(lm, _adapted_at(adapter, 10**6))
    with rep_applied(lm, {1: adapter}):
        assert torch.equal(_logits(lm), everywhere)


def _by_rewrite(lm, fn, text: str = "The Eiffel Tower is in Paris and Rome") -> torch.Tensor:
    with Hooks() as h:
        h.rewrite(lm.arch.down_proj(1), fn)
        return _logits(lm, text)


def test_prompt_only_generation_adapts_the_prefill_only(lm) -> None:
    adapter = _open_adapter(lm.arch.d_mlp).eval()
    prompts = ["The Eiffel Tower is in", "Toyota was founded in the city of"]

    def by_hand(prompt: str, n_new: int, prompt_only: bool) -> str:
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        n_prompt = ids.shape[1] if prompt_only else 10**6
        for _ in range(n_new):  # no KV cache: every step reruns the whole sequence
            with torch.no_grad(), Hooks() as h:
                h.rewrite(lm.arch.down_proj(1), _adapted_at(adapter, n_prompt))
                step = lm.model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, step.view(1, 1)], 1)
        return lm.tokenizer.decode(ids[0, -n_new:], skip_special_tokens=True)

    with rep_applied(lm, {1: adapter}):
        got = greedy_completion(lm, prompts, 8)
    assert got == [by_hand(p, 8, True) for p in prompts]
    assert got != [by_hand(p, 8, False) for p in prompts]  # adapting new tokens would differ


def test_injection_of_fresh_adapters_is_exact(lm) -> None:
    before = _logits(lm)
    with rep_applied(lm, {1: RepAdapter(lm.arch.d_mlp)}):
        assert torch.equal(_logits(lm), before)


# --------------------------------------------------------------------------- saving


def test_save_load_round_trip_and_fingerprint_refusal(lm, tmp_path: Path) -> None:
    adapters = {1: _open_adapter(lm.arch.d_mlp, rank=8), 2: RepStack([_open_adapter(128)] * 2)}
    k = torch.randn(3, lm.arch.d_mlp)
    adapters[1].set_guard(k[:1] / (k[0] @ k[0]))  # β̃(k[0]) = 1: the guard keeps k[0]
    adapters[1].beta_guard = 0.5
    path = save_adapters(tmp_path / "edit.rep.safetensors", adapters, None, lm.fingerprint)
    loaded = load_adapters(path, lm)
    assert sorted(loaded) == [1, 2]
    assert isinstance(loaded[2], RepStack) and len(loaded[2]) == 2
    assert loaded[1].cfg.rank == 8 and not loaded[1].training
    assert loaded[1].beta_guard == 0.5 and torch.equal(loaded[1].guard_w, adapters[1].guard_w)
    assert loaded[2].adapters[0].guard_w.shape == (0, 128)  # never set: no guard rows
    for layer in (1, 2):
        adapters[layer].eval()
        assert torch.equal(loaded[layer](k), adapters[layer](k))
    assert torch.equal(loaded[1](k)[0], k[0]) and not torch.equal(loaded[1](k)[1], k[1])
    # a file written before the guard existed (no guard_w tensor) still loads, guard empty
    tensors, meta = read_safetensors(path)
    old = {name: t for name, t in tensors.items() if not name.endswith("guard_w")}
    write_safetensors(tmp_path / "old.rep.safetensors", old, meta)
    assert load_adapters(tmp_path / "old.rep.safetensors", lm)[1].guard_w.shape[0] == 0
    other = tiny_loaded("llama", seed=1)
    assert other.fingerprint != lm.fingerprint
    with pytest.raises(FingerprintMismatchError):
        load_adapters(path, other)


# --------------------------------------------------------------------------- data


def test_pool_has_every_variant_kind_and_long_context(lm, corpus: Path) -> None:
    cfg = tiny_cfg(corpus)
    sampler = passage_sampler(lm, cfg)
    contexts = ["{}", "Hello there. {}", "The capital. {}"]
    pool = build_pool(lm, rep_items(CASE), contexts, cfg, sampler=sampler)
    counts = pool.counts()
    assert counts["prompt"] == 1
    assert counts["original"] == 2  # contexts without the bare one
    assert counts["paraphrase"] == 5 * 3  # in-domain paraphrases only, every context
    assert counts["long"] == cfg.n_long  # passages + prompt are trained on
    for ex in pool.positives:
        assert ex.position is not None and 0 <= ex.position < len(ex.ids)
    long_ex = [ex for ex in pool.positives if ex.kind == "long"]
    assert all(ex.text.endswith(CASE.request.text) for ex in long_ex)
    # the position is the subject's last token
    tok = lm.tokenizer
    for ex in long_ex:
        prefix = tok.decode(list(ex.ids[: ex.position + 1]))
        assert prefix.endswith(CASE.request.subject)
    off = build_pool(
        lm, rep_items(CASE), contexts, tiny_cfg(corpus, long_context=False), sampler=sampler
    )
    assert "long" not in off.counts()


def test_pool_trains_generated_forms_at_the_subjects_last_token(lm, corpus: Path) -> None:
    cfg = tiny_cfg(corpus, long_context=False, augment="punct,determiner,noise", n_augment=2)
    contexts = ["{}", "Hello there. {}", "The capital. {}"]
    pool = build_pool(lm, rep_items(CASE), contexts, cfg)
    none = tiny_cfg(corpus, long_context=False, augment=())
    plain = build_pool(lm, rep_items(CASE), contexts, none)
    aug = [ex for ex in pool.positives if ex.kind == "augment"]
    assert "augment" not in plain.counts()
    assert len(aug) == 3 * 2 * 3  # kinds x forms x (prompt + two contexts)
    assert pool.positives[: len(plain.positives)] == plain.positives  # the rest as before
    tok = lm.tokenizer
    for ex in aug:
        assert ex.position is not None and ex.subject_start is not None
        head = tok.decode(list(ex.ids[: ex.position + 1])).rstrip()
        # punctuation and determiners sit outside the subject: the key is read at its end
        assert not head.endswith(tuple("\"'(),:;.!-")), ex.text
        assert "The Eiffel Tower is in" in ex.text
        assert tok.decode(list(ex.ids[ex.subject_start : ex.position + 1])).strip() in {
            f.core for f in candidates("Paris", "noise")
        } | {"Paris"}


def test_negative_pool(lm, corpus: Path) -> None:
    cfg = tiny_cfg(corpus, negatives=True, negative_sources=("subjects", "neighbourhood", "text"))
    pool = build_pool(
        lm,
        rep_items(CASE),
        ["{}"],
        cfg,
        sampler=passage_sampler(lm, cfg),
        negative_subjects=["Rome"],
    )
    kinds = {ex.kind for ex in pool.negatives}
    assert kinds == {"subject_negative", "neighbourhood", "text"}
    assert all(ex.position is None for ex in pool.negatives)


def test_batches_never_repeat() -> None:
    sampler = NoRepeatBatches(7, 3, random.Random(0))
    seen: list[int] = []
    previous = None
    for _ in range(14):
        batch = next(sampler)
        assert len(batch) == len(set(batch)) == 3
        assert batch != previous
        previous = batch
        seen += batch
    # 42 draws over 7 items: every item exactly 6 times
    assert sorted(seen) == sorted(list(range(7)) * 6)


@pytest.mark.numerics
def test_read_keys_matches_editor_keys(lm) -> None:
    from repedit.editors.keys import key_inputs, keys_at

    seqs, pos = key_inputs(lm, [CASE.request], ["{}", "Hello. {}"], "last")
    ref = keys_at(lm, [1], seqs, pos)[1]
    pool = build_pool(lm, rep_items(CASE), ["{}", "Hello. {}"], RepConfig(long_context=False))
    examples = [pool.prompts[0], pool.positives[0]]
    keys = read_keys(lm, [1], examples)[1]
    got = torch.stack([k[ex.position] for k, ex in zip(keys, examples, strict=True)])
    assert_within(got, ref.float(), _key_tol(lm, 1, list(keys)), "read_keys vs editor keys")


@pytest.mark.numerics
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("infer", [True, False])
def test_layerwise_reader_matches_read_keys_with_adapters_upstream(
    family: str, infer: bool, corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer-by-layer replay gives the keys a fresh forward with the lower adapters in place
    gives (adjacent and non-adjacent layers, padded chunks of unequal lengths, gates open on
    every token or on some), with the upper blocks' calls inferred or recorded."""
    import repedit.rep.reader as reader_module

    if not infer:
        monkeypatch.setattr(reader_module, "infer_calls", lambda *a: None)
    lm = tiny_loaded(family)
    layers = [1, 2, 3] if lm.n_layers == 4 else pytest.fail("tiny models have 4 layers")
    cfg = tiny_cfg(corpus)
    pool = build_pool(lm, rep_items(CASE), ["{}", "Hello there. {}"], cfg)
    examples = pool.all_examples()
    assert len({len(ex.ids) for ex in examples}) > 2
    reader = reader_module.LayerwiseReader(lm, layers, examples)
    if not infer or family in ("llama", "gpt2"):
        assert reader.inferred == infer  # one kind of block: the calls come for free
    plain = read_keys(lm, layers, examples)
    tol = _key_tol(lm, 1, plain[1])
    for got, want in zip(reader.current, plain[1], strict=True):
        assert_within(got, want, tol, "reader at layer 1")
    # the adapter at 1 is open everywhere, the one at 2 on some tokens only
    adapters = {1: _open_adapter(lm.arch.d_mlp).eval(), 2: _open_adapter(lm.arch.d_mlp).eval()}
    with torch.no_grad():
        adapters[2].gate_out.bias.fill_(0.0)
        adapters[2].gate_out.weight.mul_(40.0)
    adapters[2].tau = 0.5
    for layer in (2, 3):
        upstream = {j: a for j, a in adapters.items() if j < layer}
        got = reader.advance(layer, upstream)
        want = read_keys(lm, [layer], examples, upstream=upstream)[layer]
        moved = 0.0
        tol = _key_tol(lm, layer, want)
        for g, w, p in zip(got, want, plain[layer], strict=True):
            assert_within(g, w, tol, f"reader at layer {layer}")
            moved = max(moved, max_error(w, p))
        assert moved > tol  # the upstream adapters did change the deeper keys
        if layer == 2:
            with torch.no_grad():
                g2 = adapters[2].gate(torch.cat(got).to(lm.device))
            assert 0 < int((g2 > 0.5).sum()) < len(g2)  # open on some tokens, shut on others


@pytest.mark.numerics
@pytest.mark.parametrize("bug", ["missing adapter", "off by one"])
def test_reader_comparison_catches_a_bug(bug: str, corpus) -> None:
    """Keys read without the adapter one layer down, or one token late, fail the derived
    tolerance that the layer-by-layer reader meets."""
    from repedit.rep.reader import LayerwiseReader

    lm = tiny_loaded("llama")
    pool = build_pool(lm, rep_items(CASE), ["{}", "Hello there. {}"], tiny_cfg(corpus))
    examples = pool.all_examples()
    reader = LayerwiseReader(lm, [1, 2], examples)
    upstream = {1: _open_adapter(lm.arch.d_mlp).eval()}
    got = reader.advance(2, upstream)
    if bug == "missing adapter":
        want = read_keys(lm, [2], examples)[2]
    else:
        right = read_keys(lm, [2], examples, upstream=upstream)[2]
        want = [torch.cat([k[1:], k[-1:]]) for k in right]  # every key one token late
    tol = _key_tol(lm, 2, want)
    assert any(max_error(g, w) > tol for g, w in zip(got, want, strict=True))


# --------------------------------------------------------------------------- training


def test_training_aligns_variant_keys_and_keeps_the_prompt_key(
    lm, edited, corpus, tmp_path: Path
) -> None:
    editor, result = edited
    before_state = _snapshot(lm)
    hp = editor.resolved(lm)
    (layer,) = editor.layers(lm, hp)
    stats = second_moments(lm, [layer], str(corpus), 2000, cache=tmp_path, progress=False)
    cfg = tiny_cfg(corpus, steps=40, gate_lr=1e-2, lr=2e-3)
    rep = train_rep(
        lm, result, CASE, layers=[layer], stats=stats, contexts=editor.contexts(lm, hp), cfg=cfg
    )
    _assert_unchanged(lm, before_state)  # edit applied for training and reverted
    assert not result.applied
    assert all(p.grad is None for p in lm.model.parameters())
    assert rep.losses[-1]["total"] < rep.losses[0]["total"]
    gb, ga = rep.gate_before[layer], rep.gate_after[layer]
    ab, aa = rep.alignment_before[layer], rep.alignment_after[layer]
    # the gate opens on the subject's variants and stays mostly shut elsewhere
    assert gb["positive"]["open"] == 0.0
    assert ga["positive"]["open"] > 0.5
    assert ga["negative"]["open"] < 0.2
    # adapted variant keys retrieve more of the edit (β̃ up) ...
    assert aa["pos:paraphrase"]["beta"] > ab["pos:paraphrase"]["beta"]
    assert aa["positive"]["cos"] > ab["positive"]["cos"]
    # ... while the bare prompt's key k_o stays (almost) where it was
    adapter = rep.adapters[layer].eval()
    ex = build_pool(lm, rep_items(CASE), ["{}"], RepConfig(long_context=False)).prompts[0]
    k_o = read_keys(lm, [layer], [ex])[layer][0][ex.position]
    drift = float((adapter(k_o) - k_o).norm() / k_o.norm())
    assert drift < 0.05
    assert rep.seconds > 0 and rep.info["pool"]["long"] == cfg.n_long
    assert rep.summary()[str(layer)]["open_pos"][1] == ga["positive"]["open"]


@pytest.mark.numerics
def test_match_loss_pulls_variant_keys_onto_k_star(lm, edited, corpus, tmp_path: Path) -> None:
    """``agg="match"``: the surface forms' adapted keys end nearer k* and β̃ nearer 1 than with
    no training; the paper's direction loss at its lr barely moves them."""
    editor, result = edited
    hp = editor.resolved(lm)
    (layer,) = editor.layers(lm, hp)
    stats = second_moments(lm, [layer], str(corpus), 2000, cache=tmp_path, progress=False)
    kw = {"layers": [layer], "stats": stats, "contexts": editor.contexts(lm, hp)}
    match = train_rep(lm, result, CASE, cfg=tiny_cfg(corpus, steps=30), **kw)
    b, a = match.alignment_before[layer]["positive"], match.alignment_after[layer]["positive"]
    assert abs(a["beta"] - 1.0) < abs(b["beta"] - 1.0)
    assert a["cos"] > b["cos"]
    losses = [step["agg"] for step in match.losses]
    assert losses[-1] < losses[0]  # the relative distance to k* falls
    # ... and the edit prompt's own subject key, exactly as the model computes it
    ids, pos = locate(lm.tokenizer, CASE.request.prompt, CASE.request.subject)
    with torch.no_grad(), Hooks() as h:
        h.capture("k", lm.arch.down_proj(layer))
        h.run(lm.model, input_ids=torch.tensor([ids]))
    k_o = h["k"][0, pos].float()
    tol = _key_tol(lm, layer, [h["k"][0]])
    assert_within(match.adapters[layer].prompt_k[0], k_o, tol, "stored prompt key")
    # training stores the edit's β̃ direction for the guard: β̃(k*) = 1
    k_star = result.tensors[f"keys.{layer}"].float()
    guard_w = match.adapters[layer].guard_w
    assert guard_w.shape == (1, lm.arch.d_mlp)
    assert torch.allclose(guard_w @ k_star.reshape(-1), torch.ones(1), atol=1e-3)
    paper = train_rep(lm, result, CASE, cfg=released_config(long_context=False), **kw)
    moved = paper.alignment_after[layer]["positive"]["beta"]
    assert abs(moved - paper.alignment_before[layer]["positive"]["beta"]) < abs(
        a["beta"] - b["beta"]
    )
    with pytest.raises(InvalidRequestError, match="agg"):
        RepConfig(agg="cosine")


def test_gate_rates_on_heldout_examples(lm, corpus) -> None:
    adapters = {1: _open_adapter(lm.arch.d_mlp)}
    cfg = tiny_cfg(corpus)
    held = heldout_examples(lm, CASE, sampler=passage_sampler(lm, cfg), n_long=1)
    assert held["ood_paraphrase"] and held["long_test"] and held["neighbourhood"]
    rates = gate_rates(lm, adapters, [e for v in held.values() for e in v])[1]
    assert rates["positive"]["open"] == 1.0 and rates["neg:neighbourhood"]["n"] > 0


@pytest.mark.numerics
def test_targets_whitened_and_raw(lm, edited, corpus) -> None:
    editor, result = edited
    stats = editor.second_moment(lm, result.layers)
    (layer,) = result.layers
    items = rep_items(CASE)
    whitened = edit_targets(lm, result, items, [layer], stats, RepConfig())
    raw = edit_targets(lm, result, items, [layer], stats, RepConfig(target="raw"))
    k_star = result.tensors[f"keys.{layer}"].float()
    assert torch.allclose(raw.t[layer], k_star)
    d = lm.arch.d_mlp  # a float32 norm and a float32 dot product of d terms
    assert math.isclose(float(whitened.t[layer].norm()), 1.0, rel_tol=tolerance(F32, terms=d))
    # β̃(k*) = 1 by construction, up to the dot product's rounding relative to sum |k_i w_i|
    w = whitened.w[layer][0]
    spread = float(k_star[0].abs() @ w.abs()) / abs(float(k_star[0] @ w))
    assert math.isclose(float(k_star[0] @ w), 1.0, rel_tol=tolerance(F32, terms=d) * spread)
    released = edit_targets(lm, result, items, [layer], stats, RepConfig(target="released"))
    assert torch.allclose(released.t[layer], whitened.t[layer])  # ROME: whitened


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_trains_only_adapters(family: str, corpus: Path, stats_cfg) -> None:
    lm = tiny_loaded(family)
    before_state = _snapshot(lm)
    before = _logits(lm)
    editor = make_editor("rome", FAST, stats_cfg)
    result, rep = train_rep_for_editor(lm, editor, [CASE], tiny_cfg(corpus, steps=3))
    try:
        assert all(p.grad is None for p in lm.model.parameters())
        (layer,) = rep.layers
        adapter = rep.adapters[layer]
        assert torch.count_nonzero(adapter.B.weight) > 0  # the projection moved
        assert len(rep.losses) == 3 and all(math.isfinite(s["total"]) for s in rep.losses)
        with rep_applied(lm, rep.adapters, count=True) as inj:
            _logits(lm)
        assert inj.gate_rates()[layer]["tokens"] > 0
    finally:
        result.revert(lm)
    assert torch.equal(_logits(lm), before)
    _assert_unchanged(lm, before_state)


def test_two_layers_both_adapters_train(lm, corpus, stats_cfg) -> None:
    """With MEMIT on two layers every adapter gets gradients, not only the last."""
    editor = make_editor("memit", {**FAST, "layers": (1, 2)}, stats_cfg)
    result, rep = train_rep_for_editor(lm, editor, [CASE], tiny_cfg(corpus, steps=3))
    try:
        assert rep.layers == [1, 2]
        for layer in (1, 2):
            assert torch.count_nonzero(rep.adapters[layer].B.weight) > 0, layer
            assert rep.info["k_star"][str(layer)] == "edit"
    finally:
        result.revert(lm)


@pytest.mark.parametrize("layerwise", [True, False])
def test_two_layers_layerwise_or_joint(lm, corpus, stats_cfg, layerwise: bool) -> None:
    """Layer-wise training (default) reads the keys once per layer, the joint mode every step;
    both bring the lower layer's surface-form keys nearer k*."""
    editor = make_editor("memit", {**FAST, "layers": (1, 2)}, stats_cfg)
    result, rep = train_rep_for_editor(
        lm, editor, [CASE], tiny_cfg(corpus, steps=20, layerwise=layerwise)
    )
    try:
        assert len(rep.losses) == 20
        b, a = rep.alignment_before[1]["positive"], rep.alignment_after[1]["positive"]
        assert a["cos"] > b["cos"]
        assert rep.losses[-1]["agg"] < rep.losses[0]["agg"]
    finally:
        result.revert(lm)


def test_batch_edits_get_own_or_shared_adapters(lm, corpus, stats_cfg) -> None:
    editor = make_editor("memit", {**FAST, "layers": (2,)}, stats_cfg)
    result = editor.edit(lm, [CASE.request, OTHER.request], apply=False)
    kw = {
        "layers": [2],
        "stats": editor.second_moment(lm, [2]),
        "contexts": editor.contexts(lm, editor.resolved(lm)),
    }
    own = train_rep(lm, result, [OTHER, CASE], cfg=tiny_cfg(corpus, steps=2), **kw)
    assert isinstance(own.adapters[2], RepStack) and len(own.adapters[2]) == 2
    assert own.info["groups"] == 2
    shared = train_rep(lm, result, [CASE, OTHER], cfg=tiny_cfg(corpus, steps=2, shared=True), **kw)
    assert isinstance(shared.adapters[2], RepAdapter) and shared.info["groups"] == 1
    assert shared.info["pool"]["prompt"] == 2


def test_released_config_gate_never_opens(lm, edited, corpus) -> None:
    """§9: the released code's REP (gate trained only through L_agg, 10 steps at lr 5e-4)
    never opens its hard gate, so it changes nothing; the report must show it."""
    from repedit.rep import released_config

    editor, result = edited
    (layer,) = result.layers
    rep = train_rep_after(
        lm,
        editor,
        result,
        CASE,
        layers=[layer],
        cfg=released_config(long_context_corpus=str(corpus), long_context_length=30),
    )
    assert rep.gate_after[layer]["positive"]["open"] == 0.0
    assert rep.info["pool"].get("long", 0) == 0  # the released code trained on no passage
    before = _logits(lm)
    with rep_applied(lm, rep.adapters, count=True) as inj:
        assert torch.equal(_logits(lm), before)
    assert inj.gate_rates()[layer]["open"] == 0


@pytest.mark.parametrize("decouple", [True, False])
def test_decoupled_projection_loss_leaves_the_gate_to_its_bce(lm, edited, corpus, decouple) -> None:
    """``decouple_gate``: L_agg and the consistency see ``k + P(k)``, so without the gate's
    BCE the gate gets no gradient at all; coupled (the paper), L_agg moves the gate too."""
    editor, result = edited
    (layer,) = result.layers
    cfg = tiny_cfg(corpus, gate_loss_weight=0.0, decouple_gate=decouple)
    rep = train_rep_after(lm, editor, result, CASE, layers=[layer], cfg=cfg)
    fresh = make_adapters(lm.arch.d_mlp, [layer], cfg)[layer]  # the same seeded start
    trained = rep.adapters[layer]
    assert not torch.equal(trained.B.weight, fresh.B.weight)  # P learned either way
    same_gate = all(
        torch.equal(a, b)
        for a, b in zip(trained.gate_parameters(), fresh.gate_parameters(), strict=True)
    )
    assert same_gate == decouple


@pytest.mark.parametrize(
    "overrides",
    [
        {"consistency_on": "original", "agg_beta_cap": None},
        {"negatives": True, "negative_sources": "subjects,text", "use_gate": False},
        {"target": "raw", "abs_agg": True, "use_norm": False, "gate_subject_tokens": "ignore"},
    ],
)
def test_config_variants_train(lm, edited, corpus, overrides: dict) -> None:
    editor, result = edited
    (layer,) = result.layers
    rep = train_rep_after(
        lm,
        editor,
        result,
        CASE,
        layers=[layer],
        cfg=tiny_cfg(corpus, steps=3, **overrides),
        negative_subjects=["Rome", "Japan"],
    )
    assert all(math.isfinite(s["total"]) for s in rep.losses)
    assert torch.count_nonzero(rep.adapters[layer].B.weight) > 0
    if overrides.get("negatives"):
        assert rep.info["pool"]["subject_negative"] > 0 and rep.losses[0]["neg"] > 0
