"""Teacher-forced scoring in packed rows: no padding, and each prompt run once for all its answers.

A case's probes are many short ``prompt + answer`` sequences, and most prompts are scored
with two answers (the new and the true target). Padding them to a batch's longest row and
running each prompt once per answer wastes about half the work. Here the sequences are
grouped by prompt into *items* (one prompt, the answers that follow it), the items are packed
first-fit-decreasing into rows of at most ``capacity`` tokens (a longer item gets a row of its
own), and each row runs as one forward with a 4D attention mask shaped like a tree:

* a token sees only tokens of its own item, at positions not after its own;
* an answer's token sees the prompt and its own answer, never a sibling answer;
* position ids restart at 0 for each item, and an answer's continue after its prompt,

so every token sees exactly what it sees when its sequence runs alone. The logits that
predict an answer's first token sit at the prompt's last token and are shared by all the
item's answers; only the positions that predict answer tokens reach the LM head.

The prompt tokens are declared to rewrite hooks by an explicit mask
(:func:`repedit.models.spans.declare_prompt` with ``where``), so a prompt-only rewrite such as
REP's acts on the same tokens as in the reference path. A model with a sliding attention
window shorter than an item cannot be scored this way (:func:`packable` says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.spans import declare_prompt

#: default row capacity in tokens: long enough for few forwards, short enough that the
#: masked-out part of each row's attention stays small next to its linear layers
ROW_TOKENS = 256

Seq = tuple[list[int], list[int]]


@dataclass
class Item:
    """One prompt and the answers scored after it (``seqs``: their indices in the input)."""

    prompt: list[int]
    answers: list[list[int]] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.prompt) + sum(map(len, self.answers))

    @property
    def longest(self) -> int:
        return len(self.prompt) + max(map(len, self.answers))


def group_by_prompt(seqs: list[Seq]) -> list[Item]:
    """Items in first-appearance order; equal prompt ids share one item."""
    items: dict[tuple[int, ...], Item] = {}
    for i, (prompt, answer) in enumerate(seqs):
        item = items.setdefault(tuple(prompt), Item(list(prompt)))
        item.answers.append(list(answer))
        item.seqs.append(i)
    return list(items.values())


def pack(items: list[Item], capacity: int) -> list[list[int]]:
    """Item indices per row, first-fit decreasing by token count; a row holds at most
    ``capacity`` tokens unless it holds a single longer item."""
    order = sorted(range(len(items)), key=lambda i: -items[i].tokens)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        need = items[i].tokens
        for r, left in enumerate(room):
            if need <= left:
                rows[r].append(i)
                room[r] -= need
                break
        else:
            rows.append([i])
            room.append(max(capacity - need, 0))
    return rows


@dataclass
class Row:
    """One packed forward: ids, per-sequence positions, the tree mask's parts, the prompt
    tokens, and per input sequence the row positions whose logits predict its tokens."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    item: list[int] = field(default_factory=list)
    branch: list[int] = field(default_factory=list)  # -1: prompt; k: the item's k-th answer
    targets: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)

    def add(self, n: int, item: Item) -> None:
        start, p = len(self.ids), len(item.prompt)
        self._extend(item.prompt, range(p), n, -1)
        last_prompt = start + p - 1
        for k, (answer, seq) in enumerate(zip(item.answers, item.seqs, strict=True)):
            at = len(self.ids)
            self._extend(answer, range(p, p + len(answer)), n, k)
            reads = [last_prompt] + [at + j for j in range(len(answer) - 1)]
            self.targets[seq] = (reads, answer)

    def _extend(self, ids: list[int], positions: range, item: int, branch: int) -> None:
        self.ids.extend(ids)
        self.positions.extend(positions)
        self.item.extend([item] * len(ids))
        self.branch.extend([branch] * len(ids))

    def attention(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive ``[1, 1, L, L]`` tree mask (0 where a token may attend, else min)."""
        item, branch = torch.tensor(self.item), torch.tensor(self.branch)
        pos = torch.tensor(self.positions)
        allowed = (
            (item[:, None] == item[None, :])
            & (pos[None, :] <= pos[:, None])
            & ((branch[None, :] == -1) | (branch[None, :] == branch[:, None]))
        )
        zero = torch.zeros((), dtype=dtype)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]

    def prompt_mask(self) -> torch.Tensor:
        return (torch.tensor(self.branch) == -1)[None]


def build_rows(seqs: list[Seq], capacity: int = ROW_TOKENS) -> list[Row]:
    """The packed rows that score every sequence of ``seqs`` once."""
    items = group_by_prompt(seqs)
    rows = []
    for members in pack(items, capacity):
        row = Row()
        for n in members:
            row.add(n, items[n])
        rows.append(row)
    return rows


def _sliding_window(config: Any) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        window = getattr(cfg, "sliding_window", None) if cfg is not None else None
        if isinstance(window, int) and window > 0:
            return window
    return None


def packable(lm: LoadedModel, seqs: list[Seq]) -> bool:
    """Whether the tree mask reproduces what each sequence sees alone: not when a sliding
    attention window is shorter than a sequence (the mask would ignore the window)."""
    window = _sliding_window(getattr(lm.model, "config", None))
    return window is None or max(len(p) + len(t) for p, t in seqs) <= window


def _mask_dtype(lm: LoadedModel) -> torch.dtype:
    dtype = getattr(lm, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def run_row(
    lm: LoadedModel, row: Row, head: torch.nn.Module | None
) -> tuple[torch.Tensor, list[int]]:
    """``(log-probs [n_read, vocab] in float32, reads)``: at the sorted row positions
    ``reads`` that predict answer tokens, in one forward."""
    device = lm.device
    reads = sorted({p for reads, _ in row.targets.values() for p in reads})
    where = torch.tensor(reads, device=device)
    length = len(row.ids)
    gathered = {"done": False}

    def pick(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or tuple(x.shape[:2]) != (1, length):
            return x
        gathered["done"] = True
        return x[:, where]

    ids = torch.tensor([row.ids], device=device)
    positions = torch.tensor([row.positions], device=device)
    mask = row.attention(_mask_dtype(lm)).to(device)
    with Hooks() as hooks, declare_prompt(lm, where=row.prompt_mask()):
        if head is not None:
            hooks.rewrite(head, pick)
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if not gathered["done"]:
        logits = logits[:, where]
    return torch.log_softmax(logits[0].float(), dim=-1), reads


def score_rows(
    lm: LoadedModel, seqs: list[Seq], head: torch.nn.Module | None, capacity: int = ROW_TOKENS
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence ``(answer log-probs [K], argmax ids [K])`` on CPU, as the padded path
    returns them, from packed rows."""
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
    with torch.inference_mode():
        for row in build_rows(seqs, capacity):
            logp, reads = run_row(lm, row, head)
            index = {p: i for i, p in enumerate(reads)}
            argmax = logp.argmax(-1).cpu()
            for seq, (at, answer) in row.targets.items():
                rows = torch.tensor([index[p] for p in at])
                picked = logp[rows.to(logp.device)]
                target = torch.tensor(answer, device=picked.device)[:, None]
                results[seq] = (picked.gather(-1, target)[:, 0].cpu(), argmax[rows])
    return results  # type: ignore[return-value]
