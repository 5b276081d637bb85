"""REP on the embedded SmolLM2-135M, after a real ROME edit: training opens the gate on the
subject's surface forms and on nothing else, pulls their keys onto the edit (β̃ toward 1), and
with the adapters attached the edit still lands while unrelated facts survive. Adapters and
edit come off again without a trace.

The unit tests in ``tests/rep`` check the same mechanics on random-weight models; this is the
check that they hold on a pretrained model, whose keys are not random.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repedit.data import builtin_facts
from repedit.editors import StatsConfig, make_editor
from repedit.evaluation.scoring import greedy_completion
from repedit.rep import RepConfig, rep_applied, train_rep_for_editor

pytestmark = pytest.mark.integration

UNRELATED = {
    "The capital of France is": " Paris",
    "Germany is located in the continent of": " Europe",
}


def test_rep_after_rome_on_the_embedded_model(
    smollm2, wikitext_stats: StatsConfig, wikitext: Path
) -> None:
    case = next(c for c in builtin_facts() if c.case_id == "slovenia-continent")
    before = {k: v.detach().clone() for k, v in smollm2.model.state_dict().items()}
    cfg = RepConfig(long_context_corpus=str(wikitext))
    editor = make_editor("rome", stats=wikitext_stats)

    result, rep = train_rep_for_editor(smollm2, editor, [case], cfg)
    try:
        prompts = [case.request.text, *UNRELATED]
        with rep_applied(smollm2, rep.adapters):
            completions = greedy_completion(smollm2, prompts, max_new_tokens=3)
    finally:
        result.revert(smollm2)

    after = smollm2.model.state_dict()
    assert not [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert rep.info["pool"]["long"] > 0, rep.info["pool"]  # long-context examples trained on
    (layer,) = rep.layers
    summary = rep.summary()[str(layer)]
    open_before, open_after = summary["open_pos"]
    beta_before, beta_after = summary["beta_pos"]
    assert open_before == 0.0 and open_after >= 0.9, summary  # τ = 0.9: shut before training
    assert summary["open_neg"][1] <= 0.01, summary
    assert beta_after > beta_before + 0.2 and abs(beta_after - 1) < 0.2, summary
    edited, *others = completions
    assert edited.strip().startswith(case.request.target_new.strip()), completions
    for completion, truth in zip(others, UNRELATED.values(), strict=True):
        assert completion.startswith(truth), completions
