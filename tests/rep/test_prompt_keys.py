"""keep_prompt_key: which of the edit prompt's keys REP leaves alone."""

from __future__ import annotations

import pytest
import torch
from tiny_rome import tiny_rome

from repedit.data.case import EditCase, EditRequest
from repedit.rep import RepAdapter, RepConfig, train_rep
from repedit.rep.variants import build_pool, rep_items

CASE = EditCase(
    EditRequest("The tower stands in {}", "New Paris Town", "Italy", case_id="t"),
    subject_paraphrases=["Paris Town", "New Paris", "the town of New Paris", "Parisville"],
    id_split=2,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    t = tiny_rome(tmp_path_factory.mktemp("prompt-keys"), CASE)
    return t.lm, t.result, t.layer, t.kw


def _adapter(setup, **cfg: object) -> RepAdapter:
    lm, result, layer, kw = setup
    rep = train_rep(lm, result, CASE, cfg=RepConfig(long_context=False, steps=6, **cfg), **kw)
    adapter = rep.adapters[layer]
    assert isinstance(adapter, RepAdapter)
    return adapter


def _prompt_keys(setup) -> tuple[torch.Tensor, int, int]:
    """The edited model's keys on the bare edit prompt, its subject token, its subject length."""
    lm, result, layer, _ = setup
    prompt = build_pool(lm, rep_items(CASE), ["{}"], RepConfig(long_context=False)).prompts[0]
    ids, pos, first = list(prompt.ids), prompt.position, prompt.subject_start
    assert pos is not None and first is not None
    seen: dict[str, torch.Tensor] = {}
    down = lm.arch.down_proj(layer)
    hook = down.register_forward_pre_hook(lambda _m, a: seen.__setitem__("k", a[0].detach()))
    try:
        with torch.no_grad():
            result.apply(lm)
            lm.model(torch.tensor([ids]))
    finally:
        result.revert(lm)
        hook.remove()
    return seen["k"][0], pos, pos - first + 1


def test_ignore_keeps_every_subject_token_of_the_edit_prompt(setup) -> None:
    keys, pos, n_subject = _prompt_keys(setup)
    assert n_subject > 1
    span = slice(pos - n_subject + 1, pos + 1)
    wide_open = {"tau": 1e-6, "beta_guard": None}  # the gate opens on every token
    default = _adapter(setup, gate_subject_tokens="negative", **wide_open)
    assert default.prompt_k.shape[0] == 1  # "negative": the subject token only
    with torch.no_grad():
        moved = default(keys)
    assert torch.equal(moved[pos], keys[pos])
    assert not torch.equal(moved[span], keys[span])  # its earlier subject tokens do move
    ignore = _adapter(setup, **wide_open)  # the default, "ignore"
    assert ignore.prompt_k.shape[0] == n_subject
    with torch.no_grad():
        kept = ignore(keys)
    assert torch.equal(kept[span], keys[span])
