"""Would holding other subjects' keys in ROME's solve keep an edit off its neighbours?

ROME writes ``ΔW k = s(k)·r`` for any key ``k``, with ``s(k) = uᵀk / uᵀk*`` and ``u = C⁻¹k*``.
Holding a set ``K`` of other subjects' keys in the solve (``C' = C + μ·KKᵀ/m``, the same
``ΔW k* = r``) shrinks ``s`` on those keys. That helps locality only if it also shrinks ``s``
on the case's neighbourhood prompts, which the held keys never include, while the subject's
own paraphrases keep theirs. This measures exactly that, per ``μ``, without any value
optimisation (``s`` does not depend on ``v*``), so it is cheap enough to decide whether the
option is worth building into the editor.

The held subjects are drawn like REP's pool negatives (other CounterFact subjects with the
case's true answer, look-alikes, random ones), never one whose text occurs in a neighbourhood
prompt of the case; a second, disjoint draw of the same size is reported as "held-out pool".

    python tools/locality_keys.py --n 12 --held 20,100 --mu 0,0.1,1,10 \
        --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --stats-tokens 100000

Prints one JSON object, then a table; ``--out FILE`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from repedit.data.case import EditCase, EditRequest
    from repedit.models.loading import LoadedModel

F64 = torch.float64


def overlap_ratios(
    c: torch.Tensor,
    k_star: torch.Tensor,
    held: torch.Tensor,
    probes: dict[str, list[torch.Tensor]],
    mu: float,
) -> dict[str, float]:
    """Per probe family, the mean over its probes of the largest ``|s(k)|`` over the probe's
    keys, with ``m = held.shape[1]`` keys held at weight ``mu``.

    ``c``: [d, d]; ``k_star``: [d]; ``held``: [d, m]; each probe is a [n_keys, d] tensor (one
    key per token the probe's effect could enter at)."""
    a = c.to(F64)
    if mu and held.shape[1]:
        h = held.to(F64)
        a = a + mu * (h @ h.T) / h.shape[1]
    u = torch.linalg.solve(a, k_star.to(F64))
    denom = u @ k_star.to(F64)
    out = {}
    for name, keys in probes.items():
        per = [float((k.to(F64) @ u / denom).abs().max()) for k in keys if k.shape[0]]
        out[name] = sum(per) / len(per) if per else float("nan")
    return out


def _case_probes(
    lm: LoadedModel, layer: int, case: EditCase, req: EditRequest, subjects_held_out: list[str]
) -> dict[str, list[torch.Tensor]]:
    """Keys of one case's probes: neighbourhood prompts at every token after the first, the
    subject's in-domain and held-out paraphrases and held-out pool subjects at the subject's
    last token of the edit prompt."""
    from repedit.editors.keys import key_inputs, keys_at
    from repedit.models.tokens import prompt_ids

    def last(subject: str) -> torch.Tensor:
        seqs, pos = key_inputs(lm, [req.with_subject(subject)], ["{}"], "last")
        return keys_at(lm, [layer], seqs, pos)[layer]

    def every(text: str) -> torch.Tensor:
        ids = prompt_ids(lm.tokenizer, text)
        return keys_at(lm, [layer], [ids] * (len(ids) - 1), list(range(1, len(ids))))[layer]

    return {
        "neighbourhood": [every(n.prompt) for n in case.neighbourhood],
        "in-domain paraphrase": [last(s) for s in case.id_paraphrases],
        "held-out paraphrase": [last(s) for s in case.ood_paraphrases],
        "held-out pool subject": [last(s) for s in subjects_held_out],
    }


def measure(args: argparse.Namespace) -> dict:
    """Every case's ratios per (held count, μ), then their means."""
    from repedit.data.augment import fold
    from repedit.data.loaders import dataset_path, load_cases
    from repedit.editors import StatsConfig, make_editor
    from repedit.editors.keys import key_inputs, keys_at
    from repedit.models.loading import load_model
    from repedit.rep.negatives import subject_pool

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    stats = StatsConfig(corpus=args.corpus, n_tokens=args.stats_tokens, progress=False)
    editor = make_editor("rome", None, stats)
    hp = editor.hparams.for_model(lm)
    (layer,) = editor.layers(lm, hp)
    c = editor.second_moment(lm, [layer])[layer].matrix
    pool = subject_pool(lm, args.pool)
    cases = load_cases(dataset_path(args.data)).cases[: args.n]
    sums: dict[str, dict[str, float]] = {}
    for case in cases:
        req = case.request
        seqs, pos = key_inputs(lm, [req], editor.contexts(lm, hp), hp.position)
        k_star = keys_at(lm, [layer], seqs, pos)[layer].mean(0)
        texts = [fold(n.prompt) for n in case.neighbourhood]
        top = max(args.held)
        drawn = pool.draw(case, 2 * top, kinds=("kin", "lookalike", "random"),
                          key=str(req.case_id), texts=texts)  # fmt: skip
        held_all, held_out = drawn[0::2], drawn[1::2]
        probes = _case_probes(lm, layer, case, req, held_out[: args.probe_subjects])
        held_keys = [req.with_subject(s) for s in held_all]
        seqs, pos = key_inputs(lm, held_keys, ["{}"], "last")
        held = keys_at(lm, [layer], seqs, pos)[layer].T
        for m in args.held:
            for mu in args.mu:
                got = overlap_ratios(c, k_star, held[:, :m], probes, mu)
                row = sums.setdefault(f"{m}|{mu}", {})
                for name, val in got.items():
                    row[name] = row.get(name, 0.0) + val / len(cases)
    rows = [
        {"held": int(k.split("|")[0]), "mu": float(k.split("|")[1]), **v} for k, v in sums.items()
    ]
    return {"model": args.model, "layer": layer, "data": args.data, "n": len(cases),
            "pool": args.pool, "rows": rows}  # fmt: skip


def table(doc: dict) -> str:
    """The rows as a markdown table of mean max |s|."""
    names = [k for k in doc["rows"][0] if k not in ("held", "mu")]
    lines = ["| held keys | μ | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for r in doc["rows"]:
        vals = " | ".join(f"{r[n]:.3f}" for n in names)
        lines.append(f"| {r['held']} | {r['mu']:g} | {vals} |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="rep-counterfact-valid")
    p.add_argument("--n", type=int, default=12, help="first N cases")
    p.add_argument("--pool", default="counterfact", help="dataset the held subjects come from")
    p.add_argument("--held", type=lambda t: [int(x) for x in _floats(t)], default=[20, 100])
    p.add_argument("--mu", type=_floats, default=[0.0, 0.1, 1.0, 10.0])
    p.add_argument("--probe-subjects", type=int, default=20, help="held-out pool subjects")
    p.add_argument("--corpus", default="auto")
    p.add_argument("--stats-tokens", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    doc = measure(args)
    text = json.dumps(doc, indent=2)
    print(text)
    print(table(doc))
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
