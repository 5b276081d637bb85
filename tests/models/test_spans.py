"""Declared prompt spans: which positions of a forward are the prompt, for prompt-only hooks."""

from __future__ import annotations

import pytest
import torch

from repedit.errors import RepeditError
from repedit.models.spans import declare_prompt, prompt_span


class _Holder:
    """Any object a span can be declared on (the loaded model in practice)."""


def test_lengths_mark_each_rows_leading_tokens_once_per_hook() -> None:
    lm = _Holder()
    x = torch.zeros(2, 4, 3)
    assert prompt_span(lm) is None
    with declare_prompt(lm, torch.tensor([1, 3])) as span:
        assert prompt_span(lm) is span
        want = torch.tensor([[True, False, False, False], [True, True, True, False]])
        assert torch.equal(span.mask("a", x), want)
        assert torch.equal(span.mask("b", x), want)  # another hook: its own first forward
        # the hook's next forward is a generation step: no prompt positions at all
        assert not span.mask("a", x[:, :1]).any()
    assert prompt_span(lm) is None


def test_without_lengths_the_first_forward_is_all_prompt_and_blocks_nest() -> None:
    lm = _Holder()
    with declare_prompt(lm) as outer:
        assert outer.mask("a", torch.zeros(1, 5)) is None
        with declare_prompt(lm, [2]) as inner:
            assert prompt_span(lm) is inner
        assert prompt_span(lm) is outer
        assert not outer.mask("a", torch.zeros(1, 1)).any()


def test_a_forward_with_other_rows_is_an_error() -> None:
    with (
        declare_prompt(_Holder(), torch.tensor([1, 2])) as span,
        pytest.raises(RepeditError, match="2 rows"),
    ):
        span.mask("a", torch.zeros(3, 4))
