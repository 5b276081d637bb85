"""Regularising REP's projection: decoupled weight decay and a bound on its spectral norm."""

from __future__ import annotations

import pytest
import torch
from tiny_rome import tiny_rome

from numerics import tolerance
from repedit.data.case import EditCase, EditRequest
from repedit.errors import InvalidRequestError
from repedit.rep import RepAdapter, RepConfig, train_rep

CASE = EditCase(
    EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
    subject_paraphrases=["the city of Paris", "Paris France", "Pari", "Lutetia"],
    id_split=2,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model, a ROME edit of CASE (not applied) and what train_rep needs for it."""
    t = tiny_rome(tmp_path_factory.mktemp("rep-reg"), CASE)
    return t.lm, t.result, t.layer, t.kw, t.corpus


def _train(setup, **cfg: object) -> RepAdapter:
    lm, result, layer, kw, corpus = setup
    base = {"long_context_corpus": str(corpus), "long_context_length": 30, "steps": 12}
    rep = train_rep(lm, result, CASE, cfg=RepConfig().replace(**{**base, **cfg}), **kw)
    adapter = rep.adapters[layer]
    assert isinstance(adapter, RepAdapter)
    return adapter


def _state(adapter: RepAdapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


def _full_norm(adapter: RepAdapter) -> float:
    p = adapter.B.weight.detach().double() @ adapter.A.weight.detach().double() * adapter.scale
    return float(torch.linalg.matrix_norm(p, ord=2))


def test_projection_norm_is_the_spectral_norm_and_clipping_bounds_it() -> None:
    d = 48
    torch.manual_seed(0)
    adapter = RepAdapter(d, RepConfig(rank=4))
    torch.nn.init.normal_(adapter.B.weight)
    want = _full_norm(adapter)
    # QR, a product and an SVD, each over at most d terms, on values of size ``want``
    tol = tolerance(torch.float32, terms=d, stages=3, magnitude=want)
    assert abs(float(adapter.projection_norm()) - want) <= tol
    a, b = adapter.A.weight.detach().clone(), adapter.B.weight.detach().clone()
    adapter.clip_projection(2 * want)
    assert torch.equal(adapter.B.weight, b)  # within the bound: untouched
    adapter.clip_projection(want / 3)
    assert abs(_full_norm(adapter) - want / 3) <= tol
    assert torch.equal(adapter.A.weight, a)  # only B is rescaled


def test_defaults_are_the_unregularised_training(setup) -> None:
    plain = _state(_train(setup))
    explicit = _state(_train(setup, weight_decay=0.0, max_norm=None))
    assert plain.keys() == explicit.keys()
    assert all(torch.equal(plain[k], explicit[k]) for k in plain)


def test_weight_decay_shrinks_the_projection_only(setup) -> None:
    plain, decayed = _train(setup), _train(setup, weight_decay=20.0)
    p0, p1 = _full_norm(plain), _full_norm(decayed)
    assert 0 < p1 < 0.9 * p0
    # the decoupled gate learns from its own loss on raw keys: decay on P leaves it as it was
    for name in ("gate_in.weight", "gate_in.bias", "gate_out.weight", "gate_out.bias"):
        assert torch.equal(plain.state_dict()[name], decayed.state_dict()[name]), name


def test_max_norm_bounds_the_trained_projection(setup) -> None:
    free = _full_norm(_train(setup))
    bound = free / 4
    clipped = _train(setup, max_norm=bound)
    got = _full_norm(clipped)
    assert got <= bound * (1 + tolerance(torch.float32, terms=clipped.d_mlp, stages=3))
    assert got > 0.5 * bound  # clipped to the bound, not collapsed
    with pytest.raises(InvalidRequestError, match="max_norm"):
        RepConfig(max_norm=0)
    with pytest.raises(InvalidRequestError, match="weight_decay"):
        RepConfig(weight_decay=-1)


def test_regularisers_parse_from_strings() -> None:
    cfg = RepConfig().replace(weight_decay="0.1", max_norm="none")
    assert cfg.weight_decay == 0.1 and cfg.max_norm is None
    assert RepConfig().replace(max_norm="2.5").max_norm == 2.5
