"""The rows a value optimisation runs, and how each step runs them.

``RowBatch`` is a group's token rows with where the subject, targets and KL prompts sit;
``make_plan`` turns it into a runner for the layers above the injection point, either with the
columns before the subject cached (``PrefixRunner``) or over the full rows (``UpperRunner``),
since the prefix path is faster but cannot be set up for every architecture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from repedit.errors import PrefixUnavailable
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.runner import PrefixRunner, UpperRunner, prefix_cache
from repedit.models.tokens import pad_id

ValuePath = Literal["auto", "prefix", "full"]

log = logging.getLogger(__name__)


@dataclass
class RowBatch:
    """A group's rows: padded ids and the positions the loss reads."""

    ids: torch.Tensor
    mask: torch.Tensor
    subject_pos: torch.Tensor  # [rows]
    owner: torch.Tensor  # [rows] request index within the group
    target_rows: torch.Tensor  # [m] row of each scored target token
    target_pos: torch.Tensor  # [m] position whose logits predict it
    target_ids: torch.Tensor  # [m]
    target_prompt: torch.Tensor  # [m] prompt (row) index, for per-prompt sums
    kl_rows: torch.Tensor  # [r] rows holding KL prompts
    bare_rows: torch.Tensor  # [n] row of each request's bare prompt


@dataclass
class Plan:
    """A runner and where, in the columns its ``run()`` returns, the loss reads and writes."""

    runner: UpperRunner
    site_values: torch.Tensor  # [rows, d] unmodified injection-site output at the subject token
    inject_pos: torch.Tensor  # [rows] column of the subject token (where δ goes, KL is read)
    target_pos: torch.Tensor  # [m] column whose logits predict each target token
    path: str


def full_plan(lm: LoadedModel, b: RowBatch, module: torch.nn.Module, layer: int) -> Plan:
    device = lm.device
    subject_pos = b.subject_pos.to(device)
    with Hooks() as h:  # the runner's one full forward also gives the "before" values
        h.capture("site", module, which="output", positions=subject_pos)
        runner = UpperRunner(lm, layer, b.ids.to(device), b.mask.to(device))
        site_values = h["site"]
    return Plan(runner, site_values, subject_pos, b.target_pos.to(device), "full")


def left_align(b: RowBatch, pad: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """``b``'s rows left-padded so every subject token sits in one column ``split``: ids and
    mask [rows, width], ``split``, and each target's column counted from ``split``."""
    split = int(b.subject_pos.max())
    shift = split - b.subject_pos  # [rows] left padding of each row
    lengths = b.mask.sum(1)
    n_rows, width = b.ids.shape[0], int((shift + lengths).max())
    target_pos = b.target_pos + shift[b.target_rows] - split
    if bool((target_pos < 0).any()):
        raise ValueError("a target is scored before its subject token")
    ids = torch.full((n_rows, width), pad, dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    for i, (s, n) in enumerate(zip(shift.tolist(), lengths.tolist(), strict=True)):
        ids[i, s : s + n] = b.ids[i, :n]
        mask[i, s : s + n] = 1
    return ids, mask, split, target_pos


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens, so a padded row is computed as if unpadded."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def prefix_plan(lm: LoadedModel, b: RowBatch, module: torch.nn.Module, layer: int) -> Plan:
    """Rows left-padded so every subject token sits in column ``split``; columns before it cached.

    Position ids count only real tokens, so each row is computed as if unpadded. A failed
    setup check of the cache (``prefix_cache`` and ``PrefixRunner`` raise RuntimeError or
    ValueError) becomes ``PrefixUnavailable``, naming the layer.
    """
    device = lm.device
    ids, mask, split, target_pos = left_align(b, pad_id(lm.tokenizer))
    n_rows, width = ids.shape
    position = position_ids(mask)
    first = torch.zeros(n_rows, dtype=torch.long, device=device)
    ids, mask, position = ids.to(device), mask.to(device), position.to(device)
    try:
        cache = prefix_cache(lm, ids, mask, position, split)
        with Hooks() as h:  # the capture is the suffix forward's, at the subject column
            h.capture("site", module, which="output", positions=first)
            runner = PrefixRunner(lm, layer, ids, mask, position, split, cache)
            site_values = h["site"]
    except torch.cuda.OutOfMemoryError:  # a resource limit, not a missing feature
        raise
    except (RuntimeError, ValueError) as exc:  # what the cache's setup checks raise
        raise PrefixUnavailable(f"layer {layer}: {exc}") from exc
    log.debug("value optimisation: cached prefix of %d of %d columns", split, width)
    return Plan(runner, site_values, first, target_pos.to(device), "prefix")


def make_plan(
    lm: LoadedModel, b: RowBatch, module: torch.nn.Module, layer: int, path: ValuePath
) -> Plan:
    """The prefix plan unless ``path`` is "full" (or it cannot be set up and ``path`` is "auto")."""
    if path != "full":
        try:
            return prefix_plan(lm, b, module, layer)
        except PrefixUnavailable as exc:
            if path == "prefix":
                raise
            warn_fallback(exc)
    log.debug("value optimisation: full rows")
    return full_plan(lm, b, module, layer)


_warned: set[str] = set()


def warn_fallback(exc: PrefixUnavailable) -> None:
    """Log, once per distinct reason, that ``path="auto"`` fell back to full rows: the run is
    slower, not wrong, so a warning rather than an error."""
    reason = str(exc)
    if reason not in _warned:
        _warned.add(reason)
        log.warning("value optimisation: full rows (cached prefix unavailable: %s)", reason)
