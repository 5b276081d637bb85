"""The key path's ceiling: how far an edit reaches every probe when the probe's own key is
replaced by the edit's key ``k*``, against the plain edit and the edit with REP.

For each case the probes of the suite are scored four ways on the edited model:

``plain``
    the edit alone.
``rep``
    the edit with REP adapters trained for it (when asked).
``oracle_key``
    the down-projection input at the probe's last subject token replaced by the edit's ``k*``
    at every edited layer: the most any method acting on that one key can get.
``oracle_key_all``
    the same at every subject token.

The locality probes (neighbourhood, look-alike subjects) hold no edited subject, so their
oracle scores are their plain ones. ``gap_closed`` = (rep − plain) / (oracle_key − plain).
The scrambles' halves are reported as tests of their own (``scrambled_subject_id`` / ``_ood``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from repedit.data.case import EditCase
from repedit.data.loaders import load_cases
from repedit.data.variants import NearSubjects, PassageSampler, Variant, case_variants
from repedit.editors import make_editor
from repedit.editors.keys import keys_at
from repedit.errors import InvalidRequestError
from repedit.evaluation.probes import (
    LOCALITY_TESTS,
    SuiteConfig,
    build_probes,
    case_keys,
    passage_sampler,
    variant_probe,
)
from repedit.evaluation.scoring import (
    Probe,
    ProbeScore,
    predictions,
    score_probes,
    tokenize_probe,
)
from repedit.io import atomic_path, write_json
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.tokens import prompt_ids, subject_token_index
from repedit.rep import RepConfig, rep_applied, train_rep_after

Mode = Literal["plain", "rep", "oracle_key", "oracle_key_all"]
ORACLES: tuple[Mode, ...] = ("oracle_key", "oracle_key_all")


@dataclass
class CeilingConfig:
    """Cases, editor and suite settings of a ceiling run (``rep``: also score with REP)."""

    data: str = "demo"
    data_dir: str | None = None
    n: int | None = None
    id_split: int = 5
    method: str = "rome"
    hparams: dict[str, Any] = field(default_factory=dict)
    rep: RepConfig | None = None
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    out: str = "runs/ceiling"


@dataclass
class Item:
    """One probe with the token positions an oracle rewrites (None: none to rewrite)."""

    probe: Probe
    test: str
    last: tuple[int, ...] | None
    every: tuple[int, ...] | None


def _test_name(probe: Probe) -> str:
    if probe.test == "scrambled_subject":
        return f"scrambled_subject_{probe.meta.get('half', 'id')}"
    return probe.test


def _positions(tokenizer: Any, v: Variant, probe: Probe) -> tuple[tuple[int, ...] | None, ...]:
    """The last subject token, and every subject token, in the probe's scored prompt."""
    if v.subject_span is None:
        return None, None
    ids = prompt_ids(tokenizer, v.text)
    if tokenize_probe(tokenizer, probe.prompt, probe.target)[0] != ids:
        return None, None
    a, b = v.subject_span
    last = subject_token_index(tokenizer, v.text, a, b, "last")
    first = min(subject_token_index(tokenizer, v.text, a, a + 1, "last"), last)
    return (last,), tuple(range(first, last + 1))


def case_items(
    lm: LoadedModel,
    case: EditCase,
    key: str,
    suite: SuiteConfig,
    sampler: PassageSampler | None,
    near: NearSubjects | None,
) -> list[Item]:
    """The case's success probes (from its variants, with positions) and locality probes."""
    variants = case_variants(
        case,
        lm.tokenizer,
        key=key,
        seed=suite.seed,
        scramble_max=suite.scramble_max,
        sampler=sampler,
        passages=suite.long_context_passages,
    )
    items = []
    for v in variants:
        probe = variant_probe(v, case, sampler)
        last, every = _positions(lm.tokenizer, v, probe)
        items.append(Item(probe, _test_name(probe), last, every))
    local = SuiteConfig(tests=LOCALITY_TESTS, near_subject_max=suite.near_subject_max)
    for probes in build_probes(case, lm, local, sampler=None, key=key, near=near).values():
        items.extend(Item(p, p.test, None, None) for p in probes)
    return items


def _hit(item: Item, score: Any) -> float:
    """A probe's rate: exact success, or agreement with the unedited model for locality."""
    if item.probe.test in LOCALITY_TESTS:
        return float(score.agree) if score.agree is not None else 0.0
    return float(score.exact)


def plain_rates(
    lm: LoadedModel, items: Sequence[Item], reference: list[list[int]], batch_size: int
) -> list[float]:
    got = score_probes(lm, [i.probe for i in items], batch_size=batch_size, reference=reference)
    return [_hit(i, s) for i, s in zip(items, got, strict=True)]


def token_writer(where: torch.Tensor, k: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A [batch, seq, d] rewrite: ``k`` ([d], or [len(where), d] row by row) at token positions
    ``where`` of every row."""

    def write(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, where.to(x.device)] = k.to(x.device, x.dtype)
        return x

    return write


Positions = tuple[int, ...]
#: installs a group's rewrites on ``Hooks``, given the token positions the group shares
Install = Callable[[Hooks, Positions], None]


def patched_probe_scores(
    lm: LoadedModel,
    items: Sequence[Item],
    reference: list[list[int]],
    where: Callable[[Item], Positions | None],
    install: Install,
    batch_size: int,
) -> dict[int, ProbeScore]:
    """Scores (by item index) with ``install``'s rewrites in place at each probe's positions
    ``where(item)``; probes grouped by positions, items without positions left out. Every
    oracle of the analyses is one ``install``: the grouping and the scorer stay in one place."""
    groups: dict[Positions, list[int]] = {}
    for j, item in enumerate(items):
        pos = where(item)
        if pos is not None:
            groups.setdefault(pos, []).append(j)
    out: dict[int, ProbeScore] = {}
    for pos, idx in groups.items():
        with Hooks() as hooks:
            install(hooks, pos)
            # the positions count from each sequence's start: the padded reference scorer keeps
            # them, the packed one puts several sequences in a row at other offsets
            got = score_probes(
                lm,
                [items[j].probe for j in idx],
                batch_size=batch_size,
                reference=[reference[j] for j in idx],
                impl="reference",
            )
        out.update(zip(idx, got, strict=True))
    return out


def patched_rates(
    lm: LoadedModel,
    items: Sequence[Item],
    reference: list[list[int]],
    where: Callable[[Item], Positions | None],
    install: Install,
    batch_size: int,
    fallback: list[float],
) -> list[float]:
    """Rates with the rewrites of :func:`patched_probe_scores`; probes without positions keep
    their ``fallback`` rate (the plain one, or another oracle's the rewrite would repeat)."""
    got = patched_probe_scores(lm, items, reference, where, install, batch_size)
    return [_hit(items[j], got[j]) if j in got else fallback[j] for j in range(len(items))]


def key_oracle(
    lm: LoadedModel, k_stars: dict[int, torch.Tensor], which: Mode
) -> tuple[Callable[[Item], Positions | None], Install]:
    """``k*`` written into the down-projection input at every edited layer, at the probe's
    last subject token (``oracle_key``) or every subject token (``oracle_key_all``)."""

    def where(item: Item) -> Positions | None:
        return item.last if which == "oracle_key" else item.every

    def install(hooks: Hooks, pos: Positions) -> None:
        for layer, k in k_stars.items():
            hooks.rewrite(lm.arch.down_proj(layer), token_writer(torch.tensor(pos), k))

    return where, install


def oracle_rates(
    lm: LoadedModel,
    items: Sequence[Item],
    reference: list[list[int]],
    k_stars: dict[int, torch.Tensor],
    which: Mode,
    batch_size: int,
    plain: list[float],
) -> list[float]:
    """Rates with ``k*`` written; probes without positions keep their plain rate."""
    where, install = key_oracle(lm, k_stars, which)
    return patched_rates(lm, items, reference, where, install, batch_size, plain)


def rep_gate_open(lm: LoadedModel, adapters: dict[int, Any], items: Sequence[Item]) -> list[float]:
    """Per item, 1.0 if REP's gate opens (``g > τ``) at the probe's last subject token at the
    lowest adapted layer (the first the key path meets), else 0.0; NaN for items without
    positions. Tells a probe REP missed because its gate stayed shut from one it adapted
    badly."""
    layer = min(adapters)
    adapter = adapters[layer]
    idx = [j for j, item in enumerate(items) if item.last is not None]
    out = [float("nan")] * len(items)
    if not idx:
        return out
    seqs = [prompt_ids(lm.tokenizer, items[j].probe.prompt) for j in idx]
    keys = keys_at(lm, [layer], seqs, [items[j].last[0] for j in idx])[layer]  # type: ignore[index]
    with torch.no_grad():
        gates = adapter.gate(keys.to(next(adapter.parameters()).device)).cpu()
    for j, g in zip(idx, gates.tolist(), strict=True):
        out[j] = float(g > adapter.tau)
    return out


def reference_ids(lm: LoadedModel, items: Sequence[Item], batch_size: int) -> list[list[int]]:
    """Per probe: the unedited model's predictions (locality), else the target's own ids."""
    local = [j for j, i in enumerate(items) if i.probe.test in LOCALITY_TESTS]
    preds = predictions(lm, [items[j].probe for j in local], batch_size=batch_size)
    ref = [tokenize_probe(lm.tokenizer, i.probe.prompt, i.probe.target)[1] for i in items]
    for j, p in zip(local, preds, strict=True):
        ref[j] = p
    return ref


def mean_keys(result: Any) -> dict[int, torch.Tensor]:
    """``k*`` per edited layer: the mean of the edit's stored keys (over context prefixes)."""
    return {layer: result.tensors[f"keys.{layer}"].float().mean(0) for layer in result.layers}


def score_case(
    lm: LoadedModel,
    editor: Any,
    case: EditCase,
    key: str,
    items: Sequence[Item],
    cfg: CeilingConfig,
    exclude_subjects: Collection[str] = (),
) -> dict[str, list[float]]:
    """Every item scored in every mode (the model is unedited again on return).
    ``exclude_subjects``: subjects REP's generated forms must not take (the look-alikes)."""
    bs = cfg.suite.batch_size
    reference = reference_ids(lm, items, bs)
    result = editor.edit(lm, [case.edit_request])
    try:
        k_stars = mean_keys(result)
        scores: dict[str, list[float]] = {"plain": plain_rates(lm, items, reference, bs)}
        for which in ORACLES:
            scores[which] = oracle_rates(lm, items, reference, k_stars, which, bs, scores["plain"])
        if cfg.rep is not None:
            rep = train_rep_after(
                lm,
                editor,
                result,
                [case],
                cfg=cfg.rep,
                keys=[key],
                exclude_subjects=exclude_subjects,
            )
            with rep_applied(lm, rep.adapters):
                scores["rep"] = plain_rates(lm, items, reference, bs)
            scores["rep_gate"] = rep_gate_open(lm, rep.adapters, items)
    finally:
        result.revert(lm)
    return scores


def mean_rates(
    rows: Sequence[tuple[str, dict[str, float]]], modes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """``{TEST: {"n", MODE: rate}}`` from ``(test, {mode: hit})`` rows: each mode's hits
    averaged over the test's probes, tests in order of first appearance."""
    tests: dict[str, dict[str, Any]] = {}
    for test, hits in rows:
        t = tests.setdefault(test, {"n": 0, **{m: 0.0 for m in modes}})
        t["n"] += 1
        for m in modes:
            t[m] += hits[m]
    for t in tests.values():
        for m in modes:
            t[m] /= t["n"]
    return tests


def tally(rows: Sequence[tuple[str, dict[str, float]]], with_rep: bool) -> dict[str, Any]:
    """``{"tests": {TEST: {"plain", "rep"?, "oracle_key", "oracle_key_all", "gap_closed"?,
    "rep_gate_open"?, "n"}}}`` from ``(test, {mode: hit})`` rows: rates as fractions over
    probes; ``rep_gate_open`` over the probes with a subject position (absent for none)."""
    modes: list[str] = ["plain", *(["rep"] if with_rep else []), *ORACLES]
    tests = mean_rates(rows, modes)
    gates: dict[str, list[float]] = {}
    for test, hits in rows:
        g = hits.get("rep_gate")
        if g is not None and g == g:  # NaN: no subject position
            gates.setdefault(test, []).append(g)
    if with_rep:
        for test, t in tests.items():
            gap = t["oracle_key"] - t["plain"]
            t["gap_closed"] = (t["rep"] - t["plain"]) / gap if gap > 0 else None
            if gates.get(test):
                t["rep_gate_open"] = sum(gates[test]) / len(gates[test])
    return {"tests": tests}


def ceiling_markdown(doc: dict[str, Any], title: str = "Key-path ceiling") -> str:
    """``ceiling.md``: one row per test, rates in percent."""
    with_rep = any("rep" in t for t in doc["tests"].values())
    head = ["test", "n", "plain", *(["REP"] if with_rep else []), "oracle key", "oracle all"]
    if with_rep:
        head += ["gap closed", "REP gate open"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in doc["tests"].items():
        cells = [name, str(t["n"]), f"{100 * t['plain']:.1f}"]
        if with_rep:
            cells.append(f"{100 * t['rep']:.1f}")
        cells += [f"{100 * t['oracle_key']:.1f}", f"{100 * t['oracle_key_all']:.1f}"]
        if with_rep:
            g = t.get("gap_closed")
            cells.append("—" if g is None else f"{100 * g:.0f} %")
            o = t.get("rep_gate_open")
            cells.append("—" if o is None else f"{100 * o:.0f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load(cfg: CeilingConfig, n: int | None) -> list[EditCase]:
    cases = load_cases(cfg.data, data_dir=cfg.data_dir, n=n, id_split=cfg.id_split).cases
    if not cases:
        raise InvalidRequestError(f"no cases in {cfg.data}")
    return cases


def run_ceiling(
    cfg: CeilingConfig,
    lm: LoadedModel,
    editor: Any = None,
    *,
    stats_config: Any = None,
    on_case: Callable[[str], None] = lambda _key: None,
) -> dict[str, Any]:
    """Score every case's probes in every mode; write ``ceiling.json`` and ``ceiling.md``."""
    editor = editor or make_editor(cfg.method, cfg.hparams, stats_config)
    cases = _load(cfg, cfg.n)
    sampler = passage_sampler(lm, cfg.suite)
    near = None
    if "near_subject" in cfg.suite.tests:  # look-alikes come from the whole dataset
        every = cases if cfg.n is None else _load(cfg, None)
        near = NearSubjects(every, lm.tokenizer)
    rows: list[tuple[str, dict[str, float]]] = []
    for case, key in zip(cases, case_keys(cases), strict=True):
        items = case_items(lm, case, key, cfg.suite, sampler, near)
        items = [i for i in items if i.probe.test in cfg.suite.tests]
        scores = score_case(lm, editor, case, key, items, cfg, near.subjects if near else ())
        for j, item in enumerate(items):
            rows.append((item.test, {m: s[j] for m, s in scores.items()}))
        on_case(key)
    doc = {
        "method": editor.name,
        "data": cfg.data,
        "n_cases": len(cases),
        **tally(rows, cfg.rep is not None),
    }
    out = Path(cfg.out)
    write_json(out / "ceiling.json", doc)
    with atomic_path(out / "ceiling.md") as tmp:
        tmp.write_text(ceiling_markdown(doc, f"Key-path ceiling: {editor.name}, {cfg.data}"))
    return doc
