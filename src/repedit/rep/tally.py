"""Gate and alignment reports of REP adapters on a set of sequences.

Per layer and category (``positive``, ``negative``, ``pos:<kind>``, ``neg:<kind>``,
``neg:context``): the token count, the hard-open share (``g > τ``) and the mean soft gate, and
for subject tokens the cosine to ``u`` and ``β̃`` of the adapted keys. Why: a gate that never
opens (or opens everywhere) is invisible in the scores alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from repedit.models.loading import LoadedModel
from repedit.rep.adapter import Adapter
from repedit.rep.reader import read_keys
from repedit.rep.targets import Targets
from repedit.rep.variants import RepExample


class Tally:
    """Gate and alignment sums per (layer, category), so groups add up."""

    def __init__(self) -> None:
        self.gate: dict[int, dict[str, list[float]]] = {}
        self.align: dict[int, dict[str, list[float]]] = {}

    def add_gate(self, layer: int, cat: str, g: torch.Tensor, tau: float) -> None:
        s = self.gate.setdefault(layer, {}).setdefault(cat, [0, 0, 0.0])
        s[0] += g.numel()
        s[1] += int((g > tau).sum())
        s[2] += float(g.sum())

    def add_align(self, layer: int, cat: str, cos: torch.Tensor, beta: torch.Tensor) -> None:
        s = self.align.setdefault(layer, {}).setdefault(cat, [0, 0.0, 0.0])
        s[0] += cos.numel()
        s[1] += float(cos.sum())
        s[2] += float(beta.sum())

    def merge(self, other: Tally) -> None:
        for mine, theirs in ((self.gate, other.gate), (self.align, other.align)):
            for layer, cats in theirs.items():
                for cat, vals in cats.items():
                    cur = mine.setdefault(layer, {}).setdefault(cat, [0] * len(vals))
                    for i, v in enumerate(vals):
                        cur[i] += v

    def gate_dict(self) -> dict[int, dict[str, dict[str, float]]]:
        return {
            layer: {
                cat: {"n": n, "open": o / n if n else 0.0, "soft": s / n if n else 0.0}
                for cat, (n, o, s) in sorted(cats.items())
            }
            for layer, cats in self.gate.items()
        }

    def align_dict(self) -> dict[int, dict[str, dict[str, float]]]:
        return {
            layer: {
                cat: {"n": n, "cos": c / n if n else 0.0, "beta": b / n if n else 0.0}
                for cat, (n, c, b) in sorted(cats.items())
            }
            for layer, cats in self.align.items()
        }


def measure(
    adapters: Mapping[int, Adapter],
    examples: Sequence[RepExample],
    keys: Mapping[int, Sequence[torch.Tensor]],
    targets: Targets | None,
    request_map: Sequence[int] | None = None,
) -> Tally:
    """Gate (eval semantics: hard-open share and soft mean) and alignment of adapted keys.

    A positive's other tokens are negatives, except, under ``gate_subject_tokens="ignore"``,
    the subject's earlier tokens, which its gate loss leaves free: they are tallied apart as
    ``subject_other``.

    Each layer's gate runs once over every token of every example, and the adapter once over
    all subject-token keys; the tallies are then split per example."""
    tally = Tally()
    if not examples:
        return tally
    with torch.no_grad():
        for layer, adapter in adapters.items():
            modes = adapter.training
            adapter.eval()
            try:
                ks = list(keys[layer])
                flat = torch.cat(ks)
                if adapter.cfg.use_gate:
                    g_all = adapter.gate(flat).cpu()
                else:
                    g_all = torch.ones(flat.shape[0])
                gates = torch.split(g_all, [k.shape[0] for k in ks])
                pos_rows = [i for i, ex in enumerate(examples) if ex.position is not None]
                for ex, g in zip(examples, gates, strict=True):
                    if ex.position is None:
                        for cat in ("negative", f"neg:{ex.kind}"):
                            tally.add_gate(layer, cat, g, adapter.tau)
                        continue
                    pos = ex.position
                    for cat in ("positive", f"pos:{ex.kind}"):
                        tally.add_gate(layer, cat, g[pos : pos + 1], adapter.tau)
                    start = pos  # under "ignore" the subject's earlier tokens are not negatives
                    if adapter.cfg.gate_subject_tokens == "ignore" and ex.subject_start is not None:
                        start = min(ex.subject_start, pos)
                        if start < pos:
                            tally.add_gate(layer, "subject_other", g[start:pos], adapter.tau)
                    neg = torch.cat([g[:start], g[pos + 1 :]])
                    if neg.numel():
                        tally.add_gate(layer, "negative", neg, adapter.tau)
                        tally.add_gate(layer, "neg:context", neg, adapter.tau)
                if targets is None or not pos_rows:
                    continue
                rows = [examples[i].request for i in pos_rows]
                if request_map is not None:
                    rows = [request_map[r] for r in rows]
                kh = adapter(torch.stack([ks[i][examples[i].position] for i in pos_rows]))
                cos = F.cosine_similarity(kh, targets.u[layer][rows], dim=-1).cpu()
                beta = (kh * targets.w[layer][rows]).sum(-1).cpu()
                for j, i in enumerate(pos_rows):
                    for cat in ("positive", f"pos:{examples[i].kind}"):
                        tally.add_align(layer, cat, cos[j : j + 1], beta[j : j + 1])
            finally:
                adapter.train(modes)
    return tally


def gate_rates(
    lm: LoadedModel,
    adapters: Mapping[int, Adapter],
    examples: Sequence[RepExample],
) -> dict[int, dict[str, dict[str, float]]]:
    """Gate report on any sequences (e.g. :func:`~repedit.rep.variants.heldout_examples`):
    per layer and category (``positive``, ``negative``, ``pos:<kind>``, ``neg:<kind>``,
    ``neg:context`` = the non-subject tokens of positive sequences) the token count ``n``, the
    hard-open share ``open`` (g > τ) and the mean soft gate ``soft``."""
    if not examples:
        return {}
    keys = read_keys(lm, sorted(adapters), examples, adapters)
    return measure(adapters, examples, keys, None).gate_dict()
