"""ROME and MEMIT on the embedded SmolLM2-135M: the edit becomes the greedy answer, an
unrelated fact survives, and a batch of ten built-in facts mostly lands.

Key statistics come from WikiText (100k tokens) and are cached under the default cache, so only
the first run pays for them. Every test reverts its edit, leaving the session model as loaded.
"""

from __future__ import annotations

import pytest
import torch

from repedit.data import builtin_facts
from repedit.data.case import EditRequest
from repedit.editors import StatsConfig, make_editor
from repedit.evaluation.scoring import greedy_completion

pytestmark = pytest.mark.integration

SLOVENIA = EditRequest(
    "{} is located in the continent of", "Slovenia", "Antarctica", "Europe", "slovenia-continent"
)
FRANCE = "The capital of France is"


def _snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_unchanged(lm, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    assert not [k for k, v in before.items() if not torch.equal(v, after[k])]


def _starts_with(completion: str, target: str) -> bool:
    return completion.strip().startswith(target.strip())


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_single_edit_becomes_the_greedy_answer(
    smollm2, wikitext_stats: StatsConfig, method: str
) -> None:
    before = _snapshot(smollm2)
    pre_edit, pre_france = greedy_completion(smollm2, [SLOVENIA.text, FRANCE])
    assert not _starts_with(pre_edit, SLOVENIA.target_new), pre_edit
    assert _starts_with(pre_france, "Paris"), pre_france

    result = make_editor(method, stats=wikitext_stats).edit(smollm2, SLOVENIA)
    try:
        edited, france = greedy_completion(smollm2, [SLOVENIA.text, FRANCE])
    finally:
        result.revert(smollm2)

    _assert_unchanged(smollm2, before)
    info = {k: v for k, v in result.info.items() if k != "seconds"}
    assert _starts_with(edited, " Antarctica"), f"{method}: {edited!r} ({info})"
    assert _starts_with(france, " Paris"), f"{method} broke France: {france!r}"


def test_memit_batch_of_ten_builtin_facts(smollm2, wikitext_stats: StatsConfig) -> None:
    cases = [c for c in builtin_facts() if c.case_id != "france-capital"][:10]
    assert len(cases) == 10
    requests = [c.request for c in cases]
    before = _snapshot(smollm2)

    result = make_editor("memit", stats=wikitext_stats).edit(smollm2, requests)
    try:
        completions = greedy_completion(smollm2, [r.text for r in requests])
    finally:
        result.revert(smollm2)

    _assert_unchanged(smollm2, before)
    hits = {
        r.case_id: _starts_with(c, r.target_new) for r, c in zip(requests, completions, strict=True)
    }
    detail = {r.case_id: (r.target_new, c) for r, c in zip(requests, completions, strict=True)}
    assert sum(hits.values()) >= 9, f"{sum(hits.values())}/10 landed: {detail}"
