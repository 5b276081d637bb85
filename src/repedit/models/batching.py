"""Grouping sequences of very different lengths into forward passes with little padding.

A right-padded batch costs as much as its longest row times its rows, so one 500-token passage
among fifteen 20-token prompts makes the whole batch thirty times dearer. Every caller that
runs many sequences through the model (key reading, REP's training pool, probe scoring) groups
them with :func:`length_buckets`, so the rule is written once.
"""

from __future__ import annotations

from collections.abc import Sequence

#: a bucket's longest row may be at most ``GROWTH`` times its shortest row plus ``SLACK``
GROWTH = 2
SLACK = 8


def fits_width(shortest: int, width: int) -> bool:
    """Whether a row of ``width`` tokens may share a bucket whose shortest row has ``shortest``.

    The slack keeps very short rows (a 3-token prompt and a 12-token one) together, where
    padding costs little and separate forwards would cost more.
    """
    return width <= GROWTH * shortest + SLACK


def length_buckets(
    lengths: Sequence[int], *, max_rows: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices into ``lengths``, grouped into buckets of similar length, shortest first.

    Indices are sorted by length (stable: equal lengths keep their order); a new bucket starts
    when the next row would break :func:`fits_width` against the bucket's shortest row, when
    the bucket already holds ``max_rows`` rows, or when its padded size (rows × longest row)
    would exceed ``max_tokens`` (a row longer than ``max_tokens`` gets a bucket of its own).
    The buckets together hold every index exactly once.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[i]
        if cur and (
            not fits_width(lengths[cur[0]], width)
            or (max_rows is not None and len(cur) >= max_rows)
            or (max_tokens is not None and width * (len(cur) + 1) > max_tokens)
        ):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out
