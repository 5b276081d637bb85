"""``second_moments`` against a brute-force computation, and its cache: round trip, resume
after an interruption, and recovery from corrupt files."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import repedit.stats.second_moment as sm
from numerics import forward_tolerance, solve_tolerance, tolerance
from repedit.io import read_safetensors, write_safetensors
from repedit.models import Hooks, LoadedModel
from repedit.models.tiny import tiny_loaded
from repedit.stats import LocalTextCorpus, ModelSampledCorpus, SecondMoment, StatsKey
from repedit.stats import second_moments as compute_moments

SEQ_LEN = 32
BATCH_TOKENS = 3 * SEQ_LEN  # three windows per forward
N_TOKENS = 7 * SEQ_LEN + 12  # the last batch has one full and one partial (padded) window
LAYERS = [0, 2]
_WORD_TEXT = """
the of and a in is was to for on by with as at from his her river city king music school war
team league station island church museum railway song album Paris Berlin Slovenia Japan Toyota
French capital Europe football founded
"""
WORDS = _WORD_TEXT.split()


def _documents() -> list[tuple[str, list[str]]]:
    rng = random.Random(0)
    docs = []
    for d in range(3):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45))) for _ in range(3)]
        docs.append((f"Article {d}", lines))
    return docs  # ~350 words


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    text = "".join(
        f" = {title} = \n\n" + "\n\n".join(lines) + "\n\n" for title, lines in _documents()
    )
    path.write_text(text)
    return path


@pytest.fixture(params=["llama", "gpt2", "gpt_neox"])
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    return tiny_loaded(request.param)


def _windows_by_hand(lm: LoadedModel) -> list[list[int]]:
    """Documents joined with EOS, cut into SEQ_LEN windows (the tiny tokenizer adds no BOS)."""
    tok = lm.tokenizer
    assert tok("a")["input_ids"][0] != tok.bos_token_id
    ids: list[int] = []
    for title, lines in _documents():
        ids += tok("\n".join([title, *lines]), add_special_tokens=False)["input_ids"]
        ids.append(tok.eos_token_id)
    return [ids[i : i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN)]


def _brute_force(
    lm: LoadedModel, layers: list[int], n_tokens: int, skip: int = 0
) -> dict[int, torch.Tensor]:
    """K.T @ K / n over n_tokens keys from the ``skip``-th on, one unpadded forward per window."""
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for window in _windows_by_hand(lm):
        with Hooks() as h, torch.no_grad():
            for layer in layers:
                h.capture(str(layer), lm.arch.down_proj(layer))
            out = h.run(lm.model, input_ids=torch.tensor([window]), use_cache=False)
        assert out is not None
        for layer in layers:
            keys[layer].append(h[str(layer)][0].double())
    result = {}
    for layer in layers:
        k = torch.cat(keys[layer])
        assert k.shape[0] >= n_tokens + skip, "test corpus too small"
        k = k[skip : skip + n_tokens]
        result[layer] = k.T @ k / n_tokens
    return result


def _moments(lm: LoadedModel, corpus: object, layers: list[int] = LAYERS, **kw: object):
    kw.setdefault("n_tokens", N_TOKENS)
    kw.setdefault("seq_len", SEQ_LEN)
    kw.setdefault("batch_tokens", BATCH_TOKENS)
    kw.setdefault("progress", False)
    return compute_moments(lm, layers, corpus, **kw)  # type: ignore[arg-type]


def _moment_tolerance(lm: LoadedModel, layer: int, expected: torch.Tensor) -> float:
    """Keys from a padded batch vs single windows, through ``layer + 1`` blocks in float32,
    then multiplied in pairs (twice their relative error) and averaged in float64: relative to
    the largest |C_ij|, which bounds the mean of |k_i k_j|."""
    keys = forward_tolerance(lm.arch, blocks=layer + 1, head=False, seq_len=SEQ_LEN)
    return 2 * keys * float(expected.abs().max())


def _assert_matches(got: torch.Tensor, expected: torch.Tensor, lm: LoadedModel, layer: int) -> None:
    assert got.dtype == torch.float64
    tol = _moment_tolerance(lm, layer, expected)
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def _assert_same_sums(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same float32 keys summed in float64 in another grouping (resumed, cached)."""
    tol = tolerance(torch.float64, terms=N_TOKENS, magnitude=float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.numerics
def test_matches_brute_force(lm: LoadedModel, corpus_file: Path) -> None:
    expected = _brute_force(lm, LAYERS, N_TOKENS)
    report: dict = {}
    got = _moments(lm, LocalTextCorpus(corpus_file), use_cache=False, report=report)
    assert sorted(got) == LAYERS
    for layer in LAYERS:
        c = got[layer]
        assert isinstance(c, SecondMoment)
        assert c.layer == layer
        assert c.n_tokens == N_TOKENS
        assert c.matrix.shape == (lm.arch.d_mlp, lm.arch.d_mlp)
        _assert_matches(c.matrix, expected[layer], lm, layer)
    assert not torch.allclose(got[0].matrix, got[2].matrix)
    assert report["tokens"] == N_TOKENS
    assert report["resumed_tokens"] == 0
    assert report["computed_layers"] == LAYERS
    assert report["tokens_per_s"] > 0


@pytest.mark.numerics
@pytest.mark.parametrize("bug", ["dropped token", "off by one"])
def test_moment_comparison_catches_a_token_bug(corpus_file: Path, bug: str) -> None:
    """One key too few, or every key one token late, fails the derived tolerance."""
    lm = tiny_loaded("llama")
    got = _moments(lm, LocalTextCorpus(corpus_file), use_cache=False)
    n, skip = (N_TOKENS - 1, 0) if bug == "dropped token" else (N_TOKENS, 1)
    wrong = _brute_force(lm, LAYERS, n, skip=skip)
    for layer in LAYERS:
        with pytest.raises(AssertionError):
            _assert_matches(got[layer].matrix, wrong[layer], lm, layer)


@pytest.mark.numerics
def test_corpus_given_as_a_path_string(corpus_file: Path, tmp_cache: Path) -> None:
    lm = tiny_loaded("qwen2")
    got = _moments(lm, str(corpus_file), layers=[1], n_tokens=50)
    _assert_matches(got[1].matrix, _brute_force(lm, [1], 50)[1], lm, 1)


@pytest.mark.numerics
def test_cache_round_trip(corpus_file: Path, tmp_cache: Path) -> None:
    lm = tiny_loaded("llama")
    corpus = LocalTextCorpus(corpus_file)
    first_report: dict = {}
    first = _moments(lm, corpus, report=first_report)
    assert first_report["cached_layers"] == []
    for layer in LAYERS:
        key = StatsKey(lm.fingerprint, layer, corpus.identity, N_TOKENS, SEQ_LEN)
        assert key.path(tmp_cache).is_file()
        assert str(key.path(tmp_cache)).startswith(str(tmp_cache))
        assert not key.partial_path(tmp_cache).exists()
    second_report: dict = {}
    second = _moments(lm, corpus, report=second_report)
    assert second_report["cached_layers"] == LAYERS
    assert second_report["computed_layers"] == []
    assert "tokens" not in second_report  # nothing was computed
    for layer in LAYERS:
        assert second[layer].meta["cached"] is True
        assert second[layer].n_tokens == N_TOKENS
        assert torch.equal(second[layer].matrix, first[layer].matrix)
    # a subset is served from the cache; a new layer is computed alongside a cached one
    mixed_report: dict = {}
    mixed = _moments(lm, corpus, layers=[2, 3], report=mixed_report)
    assert mixed_report["cached_layers"] == [2]
    assert mixed_report["computed_layers"] == [3]
    _assert_matches(mixed[3].matrix, _brute_force(lm, [3], N_TOKENS)[3], lm, 3)
    # another token count is another cache entry
    other_report: dict = {}
    _moments(lm, corpus, layers=[0], n_tokens=N_TOKENS - 1, report=other_report)
    assert other_report["computed_layers"] == [0]


def test_use_cache_false_writes_nothing(corpus_file: Path, tmp_cache: Path) -> None:
    lm = tiny_loaded("llama")
    _moments(lm, LocalTextCorpus(corpus_file), use_cache=False)
    assert list(tmp_cache.rglob("*.safetensors")) == []


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n_windows: int) -> None:
    original = sm.token_windows

    def token_windows(*args: object, **kwargs: object) -> Iterator[list[int]]:
        for i, window in enumerate(original(*args, **kwargs)):  # type: ignore[arg-type]
            if i == n_windows:
                raise KeyboardInterrupt
            yield window

    monkeypatch.setattr(sm, "token_windows", token_windows)


@pytest.mark.numerics
def test_resume_after_interruption(
    corpus_file: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_loaded("gpt2")
    corpus = LocalTextCorpus(corpus_file)
    kw = {"batch_tokens": 2 * SEQ_LEN, "checkpoint_tokens": 2 * SEQ_LEN}
    reference = _moments(lm, corpus, use_cache=False, **kw)

    with monkeypatch.context() as m:
        _interrupt_after(m, 5)  # batches [0,1] and [2,3] are checkpointed, then it dies
        with pytest.raises(KeyboardInterrupt):
            _moments(lm, corpus, **kw)
    for layer in LAYERS:
        key = StatsKey(lm.fingerprint, layer, corpus.identity, N_TOKENS, SEQ_LEN)
        assert not key.path(tmp_cache).exists()
        _, meta = read_safetensors(key.partial_path(tmp_cache))
        assert meta["count"] == 4 * SEQ_LEN
        assert meta["windows"] == 4

    report: dict = {}
    resumed = _moments(lm, corpus, report=report, **kw)
    assert report["resumed_tokens"] == 4 * SEQ_LEN
    assert report["tokens"] == N_TOKENS - 4 * SEQ_LEN
    for layer in LAYERS:
        assert resumed[layer].n_tokens == N_TOKENS
        _assert_same_sums(resumed[layer].matrix, reference[layer].matrix)
        key = StatsKey(lm.fingerprint, layer, corpus.identity, N_TOKENS, SEQ_LEN)
        assert key.path(tmp_cache).is_file()
        assert not key.partial_path(tmp_cache).exists()  # cleaned up once complete
        assert not key.partial_path(tmp_cache).with_suffix(".json").exists()


@pytest.mark.numerics
def test_resume_when_layers_stopped_at_different_points(
    corpus_file: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer 0 has a checkpoint, layer 2 has none: both must end up exact."""
    lm = tiny_loaded("llama")
    corpus = LocalTextCorpus(corpus_file)
    kw = {"batch_tokens": 2 * SEQ_LEN, "checkpoint_tokens": 2 * SEQ_LEN}
    reference = _moments(lm, corpus, use_cache=False, **kw)
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)
        with pytest.raises(KeyboardInterrupt):
            _moments(lm, corpus, layers=[0], **kw)
    report: dict = {}
    both = _moments(lm, corpus, report=report, **kw)
    assert report["computed_layers"] == LAYERS
    for layer in LAYERS:
        assert both[layer].n_tokens == N_TOKENS
        _assert_same_sums(both[layer].matrix, reference[layer].matrix)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "flip":
        (header_len,) = struct.unpack("<Q", raw[:8])
        start = 8 + header_len
        for offset in (start + 17, start + (len(raw) - start) // 2):
            raw[offset] ^= 0x5A
        path.write_bytes(bytes(raw))
    elif how in ("other-key", "nan"):
        tensors, meta = read_safetensors(path)
        acc = tensors["sum"].clone()
        if how == "other-key":
            meta["key"] = {**meta["key"], "corpus": "file:something-else"}
        else:
            acc[3, 3] = float("nan")
        meta["sha256"] = _digest(acc)  # a self-consistent file that is still wrong
        write_safetensors(path, {"sum": acc}, meta)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise AssertionError(how)


@pytest.mark.numerics
@pytest.mark.parametrize("how", ["truncate", "flip", "other-key", "nan", "empty"])
def test_corrupt_cache_is_recomputed_with_a_warning(
    how: str, corpus_file: Path, tmp_cache: Path
) -> None:
    lm = tiny_loaded("llama")
    corpus = LocalTextCorpus(corpus_file)
    good = _moments(lm, corpus)
    bad_path = StatsKey(lm.fingerprint, 2, corpus.identity, N_TOKENS, SEQ_LEN).path(tmp_cache)
    _corrupt(bad_path, how)
    report: dict = {}
    with pytest.warns(UserWarning, match="bad statistics cache") as record:
        again = _moments(lm, corpus, report=report)
    assert any(str(bad_path) in str(w.message) for w in record)
    assert report["cached_layers"] == [0]
    assert report["computed_layers"] == [2]
    for layer in LAYERS:
        _assert_same_sums(again[layer].matrix, good[layer].matrix)
    assert again[2].meta["cached"] is False
    # the recomputed value replaced the bad file
    report = {}
    _moments(lm, corpus, report=report)
    assert report["cached_layers"] == LAYERS


@pytest.mark.numerics
def test_corrupt_checkpoint_is_ignored_with_a_warning(
    corpus_file: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_loaded("llama")
    corpus = LocalTextCorpus(corpus_file)
    kw = {"batch_tokens": 2 * SEQ_LEN, "checkpoint_tokens": 2 * SEQ_LEN}
    reference = _moments(lm, corpus, use_cache=False, **kw)
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)
        with pytest.raises(KeyboardInterrupt):
            _moments(lm, corpus, **kw)
    part = StatsKey(lm.fingerprint, 0, corpus.identity, N_TOKENS, SEQ_LEN).partial_path(tmp_cache)
    _corrupt(part, "flip")
    report: dict = {}
    with pytest.warns(UserWarning, match="bad partial statistics"):
        got = _moments(lm, corpus, report=report, **kw)
    assert report["resumed_tokens"] == 0  # layer 0 starts over, layer 2 skips what it has
    for layer in LAYERS:
        _assert_same_sums(got[layer].matrix, reference[layer].matrix)


def test_sidecar_json_describes_the_cache(corpus_file: Path, tmp_cache: Path) -> None:
    lm = tiny_loaded("llama")
    corpus = LocalTextCorpus(corpus_file)
    _moments(lm, corpus, layers=[1])
    key = StatsKey(lm.fingerprint, 1, corpus.identity, N_TOKENS, SEQ_LEN)
    meta = json.loads(key.path(tmp_cache).with_suffix(".json").read_text())
    assert meta["key"] == key.as_dict()
    assert meta["count"] == N_TOKENS


@pytest.mark.numerics
def test_short_corpus_warns_and_uses_what_there_is(corpus_file: Path, tmp_cache: Path) -> None:
    lm = tiny_loaded("llama")
    total = sum(len(w) for w in _windows_by_hand(lm))
    with pytest.warns(UserWarning, match="ran out"):
        got = _moments(lm, LocalTextCorpus(corpus_file), layers=[1], n_tokens=10 * total)
    assert got[1].n_tokens == total
    _assert_matches(got[1].matrix, _brute_force(lm, [1], total)[1], lm, 1)


def test_bad_arguments(corpus_file: Path, tmp_cache: Path) -> None:
    lm = tiny_loaded("llama")
    with pytest.raises(ValueError, match="positive"):
        _moments(lm, LocalTextCorpus(corpus_file), n_tokens=0)
    with pytest.raises(Exception, match="out of range"):
        _moments(lm, LocalTextCorpus(corpus_file), layers=[4])


@pytest.mark.numerics
def test_model_sampled_corpus(tmp_cache: Path) -> None:
    lm = tiny_loaded("llama")

    def corpus() -> ModelSampledCorpus:
        return ModelSampledCorpus(lm, seed=3, doc_tokens=8, batch=2, max_docs=6)

    docs = list(corpus().documents())
    assert len(docs) == 6
    assert all(isinstance(d, str) and d for d in docs)
    assert list(corpus().documents()) == docs  # seeded
    assert ModelSampledCorpus(lm, seed=4).identity != corpus().identity
    report: dict = {}
    got = compute_moments(
        lm, [1], corpus(), 40, seq_len=16, batch_tokens=32, progress=False, report=report
    )
    c = got[1]
    assert c.n_tokens == 40
    assert report["tokens"] == 40
    assert torch.isfinite(c.matrix).all()
    torch.testing.assert_close(c.matrix, c.matrix.T)
    assert torch.linalg.eigvalsh(c.matrix).min() > -1e-6 * c.matrix.diagonal().max()  # PSD
    again = compute_moments(
        lm, [1], corpus(), 40, seq_len=16, batch_tokens=32, progress=False, use_cache=False
    )
    _assert_same_sums(again[1].matrix, c.matrix)


# --------------------------------------------------------------------------- SecondMoment


def _spd(d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return k.T @ k / (4 * d)


@pytest.mark.numerics
@pytest.mark.parametrize("scale", [1.0, 2.5, 1e3])
def test_solve_matches_linalg_solve(scale: float) -> None:
    c = _spd()
    moment = SecondMoment(3, c, n_tokens=96)
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(24, generator=g, dtype=torch.float64)
    mat = torch.randn(24, 5, generator=g, dtype=torch.float64)
    x = moment.solve(vec, scale=scale)
    assert x.shape == (24,)
    tol = solve_tolerance(torch.float64, size=24, condition=float(torch.linalg.cond(c)))
    torch.testing.assert_close(x, torch.linalg.solve(scale * c, vec), rtol=tol, atol=0)
    y = moment.solve(mat, scale=scale)
    assert y.shape == (24, 5)
    _close_columns(y, torch.linalg.solve(scale * c, mat), tol)
    z = moment.solve(mat.float(), scale=scale)  # float32 in, float64 out
    assert z.dtype == torch.float64
    _close_columns(z, torch.linalg.solve(scale * c, mat.float().double()), tol)


def _close_columns(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """A solve's forward error is relative to each solution vector's size, column by column."""
    atol = tol * want.abs().amax(0, keepdim=True)
    assert bool(((got - want).abs() <= atol).all()), float(((got - want).abs() / atol).max())


@pytest.mark.numerics
def test_cholesky_is_cached_and_correct() -> None:
    c = _spd(seed=2)
    moment = SecondMoment(0, c, n_tokens=96)
    factor = moment.cholesky(scale=2.0, ridge=0.1)
    assert moment.cholesky(scale=2.0, ridge=0.1) is factor
    want = 2.0 * c + 0.1 * torch.eye(24, dtype=torch.float64)
    # |L Lᵀ - A| <= gamma_(n+1) |L| |Lᵀ| (Higham Thm 10.3), and |L||Lᵀ| <= n max|A| elementwise
    tol = tolerance(torch.float64, terms=25, paths=1, magnitude=24 * float(want.abs().max()))
    torch.testing.assert_close(factor @ factor.T, want, rtol=0, atol=tol)
    assert torch.equal(factor, factor.tril())


def test_rank_deficient_moment_warns_and_still_solves() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 24, generator=g, dtype=torch.float64)  # 5 tokens for d = 24
    moment = SecondMoment(7, k.T @ k / 5, n_tokens=5)
    with pytest.warns(UserWarning, match="layer 7 is not positive definite"):
        x = moment.solve(k[0])
    assert torch.isfinite(x).all()


def test_condition_number() -> None:
    c = torch.diag(torch.tensor([1.0, 2.0, 50.0], dtype=torch.float64))
    assert SecondMoment(0, c, 3).condition_number() == pytest.approx(50.0)


@pytest.mark.numerics
def test_bfloat16_precision_is_its_own_cache_entry(corpus_file: Path, tmp_cache: Path) -> None:
    """``precision="bfloat16"`` is keyed apart from float32 (float32 keys keep their old form,
    so existing caches stay valid), and its ``C`` is float32's up to bfloat16 rounding."""
    lm = tiny_loaded("llama")
    corpus = LocalTextCorpus(corpus_file)
    f32 = _moments(lm, corpus)
    plain_key = StatsKey.of(lm, 0, corpus.identity, N_TOKENS, SEQ_LEN)
    assert plain_key == StatsKey(lm.fingerprint, 0, corpus.identity, N_TOKENS, SEQ_LEN)
    assert "dtype" not in plain_key.as_dict()
    report: dict = {}
    bf16 = _moments(lm, corpus, precision="bfloat16", report=report)
    assert report["computed_layers"] == LAYERS  # not served from the float32 files
    for layer in LAYERS:
        key = StatsKey.of(lm, layer, corpus.identity, N_TOKENS, SEQ_LEN, "bfloat16")
        assert key.dtype == "float32+autocast-bfloat16"
        assert key.as_dict()["dtype"] == key.dtype
        assert key.path(tmp_cache).is_file() and key.path(tmp_cache) != plain_key.path(tmp_cache)
        a, b = bf16[layer].matrix, f32[layer].matrix
        assert not torch.equal(a, b), "autocast did not take effect"
        # each of the layer+1 blocks below the key rounds its activations to bfloat16 a few
        # times (norm, attention, MLP): relative error of order (layer + 1) · 8 · u_bf16
        u = 2.0**-8
        rel = float((a - b).norm() / b.norm())
        assert rel <= (layer + 1) * 8 * u, rel
    again: dict = {}
    _moments(lm, corpus, precision="bfloat16", report=again)
    assert again["cached_layers"] == LAYERS
    with pytest.raises(Exception, match="precision must be one of"):
        _moments(lm, corpus, precision="float16")
