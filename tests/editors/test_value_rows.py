"""Batches rebuilt from recorded rows equal batches computed by the model, without running it.

``value_rows.select`` keeps some requests' rows of a batch and ``concat`` puts two sets of
rows side by side, padded to one layout; ``SelectedRunner`` replays the upper layers on them.
The final hidden states at every real suffix position must equal those of a batch built from
scratch over the same requests, up to the rounding of the forward passes, while the rebuild
runs no decoder layer at all.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from numerics import assert_within, forward_tolerance
from repedit.data.case import EditRequest
from repedit.editors.value_plan import make_plan
from repedit.editors.value_rows import Rows, SelectedRunner, concat, rows_from_plan, select
from repedit.editors.values import _build, injection_module
from repedit.models.runner import frozen
from repedit.models.tiny import tiny_loaded
from repedit.models.tokens import pad_id

REQUESTS = (
    EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
    # a subject at position 0: its bare row has no prefix, which selection must keep valid
    EditRequest("{} capital of Italy is", "The", "Michel Rocard", case_id="the"),
    EditRequest("{} was founded in", "Toyota", "Europe", case_id="toyota"),
    EditRequest("The mother tongue of Michel Rocard is {}", "French", "Berlin", case_id="rocard"),
)
CONTEXTS = ("{}", "The capital of France is Paris. Apple was founded by {}")
LAYER = 1


def _rows(lm, requests) -> Rows:
    b = _build(lm, list(requests), CONTEXTS, ("{} is a",), "last")
    module = injection_module(lm, LAYER, "mlp")
    return rows_from_plan(lm, b, make_plan(lm, b, module, LAYER, "prefix"))


class _LayerRuns:
    """Counts real forwards of every decoder layer (through each one's MLP down projection)."""

    def __init__(self, lm) -> None:
        self.calls = 0
        self.handles = [
            lm.arch.down_proj(i).register_forward_hook(self._count) for i in range(lm.arch.n_layers)
        ]

    def _count(self, *args) -> None:
        self.calls += 1

    def __enter__(self) -> _LayerRuns:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _real_outputs(rows: Rows, hidden: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Final hidden states by (request, row of that request, column from the subject) for
    every real suffix column: a layout-free view to compare two batches."""
    out = {}
    seen: dict[int, int] = {}
    suffix = rows.mask[:, rows.split :]
    for r in range(rows.owner.shape[0]):
        owner = int(rows.owner[r])
        k = seen.get(owner, 0)
        seen[owner] = k + 1
        for c in torch.nonzero(suffix[r]).flatten().tolist():
            out[(owner, k, c)] = hidden[r, c]
    return out


def _assert_same_batch(lm, got: Rows, want: Rows) -> None:
    with torch.no_grad():
        a = _real_outputs(got, SelectedRunner(lm, LAYER, got).run())
        b = _real_outputs(want, SelectedRunner(lm, LAYER, want).run())
    assert a.keys() == b.keys()
    stack_a, stack_b = torch.stack(list(a.values())), torch.stack([b[k] for k in a])
    tol = forward_tolerance(
        lm.arch, blocks=lm.arch.n_layers, head=False, magnitude=float(stack_b.abs().max())
    )
    assert_within(stack_a, stack_b, tol, "final hidden state at a real column")
    assert_within(
        got.site_values[got.bare_rows], want.site_values[want.bare_rows], tol, "site value"
    )
    torch.testing.assert_close(got.target_ids, want.target_ids, rtol=0, atol=0)
    assert torch.equal(got.owner[got.target_rows], want.owner[want.target_rows])
    assert_within(got.kl_init, want.kl_init, tol * 10, "KL targets")


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_selection_equals_a_fresh_batch_without_running_layers(family: str) -> None:
    lm = tiny_loaded(family)
    with frozen(lm.model):
        rows = _rows(lm, REQUESTS)
        with _LayerRuns(lm) as runs:
            kept = select(rows, [2, 1])
            runner = SelectedRunner(lm, LAYER, kept)
        assert runs.calls == 0
        # the narrower request set needs fewer columns than the whole batch
        assert kept.mask.shape[1] < rows.mask.shape[1]
        assert kept.n == 2 and runner.hidden_in.shape[0] == kept.owner.shape[0]
        _assert_same_batch(lm, kept, _rows(lm, [REQUESTS[2], REQUESTS[1]]))


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_selected_rows_plus_new_rows_equal_a_fresh_batch(family: str) -> None:
    """New requests computed alone and appended (wider and narrower prefix and suffix than the
    kept rows) give the batch the model would compute over all of them."""
    lm = tiny_loaded(family)
    with frozen(lm.model):
        old = select(_rows(lm, REQUESTS[:3]), [2, 0])
        new = _rows(lm, [REQUESTS[3], REQUESTS[1]])
        assert new.split != old.split
        both = concat(old, new, pad_id(lm.tokenizer))
        want = _rows(lm, [REQUESTS[2], REQUESTS[0], REQUESTS[3], REQUESTS[1]])
        _assert_same_batch(lm, both, want)


def test_comparison_catches_a_prefix_cache_of_other_rows() -> None:
    """The comparison can fail: kept rows whose cached prefix is not their own (the cache
    selected in another order than the layer input) are caught."""
    lm = tiny_loaded("llama")
    with frozen(lm.model):
        kept = select(_rows(lm, REQUESTS), [2, 1])
        flip = torch.arange(kept.owner.shape[0] - 1, -1, -1)
        broken = replace(kept, prefix=[(k[flip], v[flip]) for k, v in kept.prefix])
        with pytest.raises(AssertionError, match="exceeds the derived tolerance"):
            _assert_same_batch(lm, broken, kept)
