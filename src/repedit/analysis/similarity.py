"""Whitened similarity of variant keys to the edit key: the REP paper's two findings, measured.

For a rank-one edit the change that a key ``k`` retrieves is linear in ``β = kᵀC⁻¹k*``; for
ROME/R-ROME exactly ``ΔW k = β̃ · (v* − W k*)`` with ``β̃ = β / (k*ᵀC⁻¹k*)``
(``docs/method.md``). So ``β̃`` is the share of the edit a key gets back: 1 at
``k*`` itself, and whatever it is for the keys that the evaluation probes actually produce.

:func:`key_similarity` reads, at the edit layer, ``k*`` (averaged over the editor's context
prefixes, through :func:`~repedit.editors.keys.compute_keys`) and the bare-prompt key of every
robustness variant of a case -- the same texts :func:`~repedit.evaluation.probes.build_probes`
scores, with the same indices, seeds and passages, so the numbers join with an evaluation
run's per-probe results (:func:`similarity_vs_success`):

``original``
    the edit prompt itself (``k_o``).
``subject_paraphrase`` / ``ood_subject_paraphrase``
    the in-domain / held-out subject paraphrases in the edit's relation template.
``scrambled_subject``
    reorderings of the subject's tokens (:func:`~repedit.data.scrambled_subjects`).
``long_context``
    ``passage + " " + prompt``; the key is read at the subject inside the long text.
``prompt_paraphrase``
    the dataset's rephrased prompts that contain the subject verbatim (the others cannot be
    located and are counted in ``skipped``).
``unrelated``
    other cases' subjects in *this* case's template (specificity: these should retrieve
    nothing).

:func:`summarize_findings` then tests the paper's two claims on the model at hand.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repedit.data.case import EditCase, EditRequest, template_from_prompt
from repedit.data.variants import (
    PassageSampler,
    long_context_prompt,
    scrambled_subjects,
    split_half,
    stable_rng,
)
from repedit.editors.keys import compute_keys, key_inputs, keys_at
from repedit.errors import InvalidRequestError, RepeditError
from repedit.evaluation.probes import case_keys
from repedit.models.tokens import Position
from repedit.stats.second_moment import SecondMoment

VARIANTS: tuple[str, ...] = (
    "original",
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
    "prompt_paraphrase",
    "unrelated",
)
"""Variant types, in report order."""

EQUIVALENT: tuple[str, ...] = (
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
    "prompt_paraphrase",
)
"""Semantically equivalent variants other than the edit prompt (robustness: should be high)."""

FINDING1_VARIANTS: tuple[str, ...] = (
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
)
"""The variants of the paper's first finding ("paraphrased and scrambled subjects")."""

TEST_OF_VARIANT: dict[str, str] = {
    "original": "efficacy",
    **{v: v for v in VARIANTS if v not in ("original", "unrelated")},
}
"""Variant type → the evaluation test (``results.jsonl``) that scores the same text."""

VARIANT_OF_TEST: dict[str, str] = {t: v for v, t in TEST_OF_VARIANT.items()}

#: the paper's level for paraphrased/scrambled keys ("from 1.0 to < 0.4")
PAPER_LEVEL = 0.4
#: the paper's unrelated-subject β (> 2500) over LLaMA2-7B's d_mlp (11008): the corpus mean of
#: kᵀC⁻¹k is d_mlp (trace identity), which makes the number comparable across models
PAPER_UNRELATED_RATIO = 2500 / 11008
#: bin edges of β̃ for success rates
BETA_BINS: tuple[float, ...] = (-math.inf, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, math.inf)


# --------------------------------------------------------------------------- records


@dataclass
class VariantKeys:
    """Scores of every key of one variant type of one case (parallel lists, one per key).

    ``beta`` = kᵀC⁻¹k*, ``beta_norm`` = β / k*ᵀC⁻¹k*, ``cosine`` = cos(k, k*). ``index`` is the
    evaluation probe's ``meta["index"]`` (0 for ``original``); ``labels`` the substituted
    subject (or the paraphrase text, or ``passage #i``); ``texts`` the full text the key was
    read from; ``token_index`` the token the key was read at (in ``prompt_ids(text)``).
    """

    beta: list[float] = field(default_factory=list)
    beta_norm: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    token_index: list[int] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.beta)

    def to_dict(self, *, long_texts: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not long_texts:
            d["texts"] = [_abbreviate(t) for t in self.texts]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantKeys:
        return cls(**{k: list(v) for k, v in d.items()})


@dataclass
class CaseSimilarity:
    """One case at the edit layer: ``k*``'s self-similarity and every variant key's scores."""

    case_id: str
    subject: str
    prompt: str
    layer: int
    d_mlp: int
    self_similarity: float
    k_star_norm: float
    variants: dict[str, VariantKeys]
    #: variants whose subject could not be located in the text, per type (not scored)
    skipped: dict[str, int] = field(default_factory=dict)

    def beta_norm(self, variant: str) -> np.ndarray:
        vk = self.variants.get(variant)
        return np.asarray(vk.beta_norm if vk else [], dtype=float)

    def beta(self, variant: str) -> np.ndarray:
        vk = self.variants.get(variant)
        return np.asarray(vk.beta if vk else [], dtype=float)

    def to_dict(self, *, long_texts: bool = False) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "prompt": self.prompt,
            "layer": self.layer,
            "d_mlp": self.d_mlp,
            "self_similarity": self.self_similarity,
            "k_star_norm": self.k_star_norm,
            "skipped": dict(self.skipped),
            "variants": {
                name: vk.to_dict(long_texts=long_texts) for name, vk in self.variants.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseSimilarity:
        return cls(
            case_id=str(d["case_id"]),
            subject=d["subject"],
            prompt=d["prompt"],
            layer=int(d["layer"]),
            d_mlp=int(d["d_mlp"]),
            self_similarity=float(d["self_similarity"]),
            k_star_norm=float(d["k_star_norm"]),
            variants={k: VariantKeys.from_dict(v) for k, v in d["variants"].items()},
            skipped=dict(d.get("skipped", {})),
        )


def _abbreviate(text: str, limit: int = 160) -> str:
    if len(text) <= limit:
        return text
    return f"[{len(text) - 100} chars] …" + text[-100:]


# --------------------------------------------------------------------------- case keys


# --------------------------------------------------------------------------- key reading


@dataclass
class _Input:
    variant: str
    label: str
    index: int
    text: str
    ids: list[int]
    pos: int
    meta: dict[str, Any]


def _input(
    lm: Any, variant: str, req: EditRequest, position: Position, label: str, index: int, **meta
) -> _Input:
    """Token ids and subject position of ``req`` (its prompt is the template) via key_inputs."""
    (ids,), (pos,) = key_inputs(lm, [req], ["{}"], position)
    return _Input(variant, label, index, req.text, ids, pos, dict(meta))


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _unrelated_subjects(
    case: EditCase, key: str, pool: Sequence[str], n: int, seed: int
) -> list[str]:
    """Up to ``n`` other cases' subjects (seeded draw), never this subject or its paraphrases."""
    own = {s.casefold().strip() for s in [case.request.subject, *case.subject_paraphrases]}
    candidates, seen = [], set()
    for s in pool:
        norm = s.casefold().strip()
        if norm and norm not in own and norm not in seen:
            seen.add(norm)
            candidates.append(s)
    if n <= 0 or not candidates:
        return []
    return stable_rng("unrelated", seed, key).sample(candidates, min(n, len(candidates)))


def variant_inputs(
    lm: Any,
    case: EditCase,
    key: str,
    *,
    subject_pool: Sequence[str] = (),
    seed: int = 0,
    long_context: PassageSampler | None = None,
    n_long_context: int = 1,
    n_unrelated: int = 20,
    scramble_max: int = 10,
    position: Position = "last",
) -> tuple[list[_Input], dict[str, int]]:
    """Every variant text of ``case`` with its subject position; and skipped counts per type.

    Texts, indices, scrambles and passages follow :func:`repedit.evaluation.probes.build_probes`
    (same seeds, same ``f"{key}:test"`` passages), so results join with an evaluation run.
    """
    req = case.request
    out: list[_Input] = []
    skipped: dict[str, int] = {}

    def add(variant: str, make: Callable[[], _Input]) -> None:
        try:
            out.append(make())
        except InvalidRequestError:
            skipped[variant] = skipped.get(variant, 0) + 1

    add("original", lambda: _input(lm, "original", req, position, req.subject, 0))
    offset = len(case.id_paraphrases)
    for variant, subjects, start in (
        ("subject_paraphrase", case.id_paraphrases, 0),
        ("ood_subject_paraphrase", case.ood_paraphrases, offset),
    ):
        for i, s in enumerate(subjects):
            contains = req.subject.casefold() in s.casefold()
            add(
                variant,
                lambda v=variant, s=s, i=start + i, c=contains: _input(
                    lm, v, req.with_subject(s), position, s, i, contains_subject=c
                ),
            )
    scrambles = scrambled_subjects(
        req.subject, lm.tokenizer, n_max=scramble_max, seed=seed, key=key
    )
    in_domain, held_out = split_half(scrambles)
    halves = [(s, "id") for s in in_domain] + [(s, "ood") for s in held_out]
    for i, (s, half) in enumerate(halves):
        add(
            "scrambled_subject",
            lambda s=s, i=i, h=half: _input(
                lm, "scrambled_subject", req.with_subject(s), position, s, i, half=h
            ),
        )
    if long_context is not None and n_long_context > 0:
        for i, passage in enumerate(long_context.passages(f"{key}:test", n_long_context)):
            template = _escape(passage) + " " + req.prompt
            text = long_context_prompt(passage, req.text)

            def make(template: str = template, i: int = i, text: str = text) -> _Input:
                item = _input(
                    lm,
                    "long_context",
                    EditRequest(template, req.subject, req.target_new, req.target_true),
                    position,
                    f"passage #{i}",
                    i,
                    length=long_context.length,
                    unit=long_context.unit,
                )
                if item.text != text:  # only if the passage held braces (samplers strip them)
                    raise InvalidRequestError("long-context text differs from the probe's")
                return item

            add("long_context", make)
    seen = {" ".join(req.text.split())}
    for i, raw in enumerate(case.prompt_paraphrases):
        norm = " ".join(raw.split())
        if not norm or norm in seen:
            continue
        seen.add(norm)
        if req.subject not in norm:
            skipped["prompt_paraphrase"] = skipped.get("prompt_paraphrase", 0) + 1
            continue
        add(
            "prompt_paraphrase",
            lambda norm=norm, i=i: _input(
                lm,
                "prompt_paraphrase",
                EditRequest(
                    template_from_prompt(norm, req.subject),
                    req.subject,
                    req.target_new,
                    req.target_true,
                ),
                position,
                norm,
                i,
            ),
        )
    for i, s in enumerate(_unrelated_subjects(case, key, subject_pool, n_unrelated, seed)):
        add(
            "unrelated",
            lambda s=s, i=i: _input(lm, "unrelated", req.with_subject(s), position, s, i),
        )
    return out, skipped


def read_keys(
    lm: Any,
    layer: int,
    seqs: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """Keys at ``positions`` ([n, d_mlp], float32, CPU), with sequences grouped by length.

    :func:`~repedit.editors.keys.keys_at` right-pads each batch to its longest sequence; a
    500-token long-context text among 15-token prompts would multiply the work thirtyfold, so
    sequences are sorted by length and split where the length more than doubles.
    """
    n = len(seqs)
    if n == 0:
        return torch.zeros(0, lm.arch.d_mlp)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    groups: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        if len(seqs[i]) > 2 * len(seqs[groups[-1][0]]) + 8:
            groups.append([i])
        else:
            groups[-1].append(i)
    out = torch.empty(n, lm.arch.d_mlp)
    for group in groups:
        group_seqs = [seqs[i] for i in group]
        group_pos = [positions[i] for i in group]
        got = keys_at(lm, [layer], group_seqs, group_pos, batch_size=batch_size)[layer]
        out[group] = got.float().cpu()
    return out


def whitened_scores(
    stats: SecondMoment, k_star: torch.Tensor, keys: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k*ᵀC⁻¹k*, β, β̃, cosine)`` of ``keys`` [n, d] against ``k_star`` [d] (float64).

    ``C⁻¹k*`` comes from :meth:`SecondMoment.solve` (Cholesky, never an inverse).
    """
    dev = stats.matrix.device
    ks = k_star.to(dev, torch.float64)
    kk = keys.to(dev, torch.float64).reshape(-1, ks.shape[0])
    c_inv_k = stats.solve(ks)  # [d]
    self_sim = float(ks @ c_inv_k)
    beta = kk @ c_inv_k
    norms = kk.norm(dim=1) * ks.norm()
    cosine = (kk @ ks) / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return self_sim, beta, beta / self_sim, cosine.clamp(-1.0, 1.0)


def edit_keys(
    lm: Any,
    layer: int,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    *,
    position: Position = "last",
    chunk: int = 16,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``k*`` of each request ([n, d_mlp], float32, CPU), ``chunk`` requests per call."""
    out = []
    for i in range(0, len(requests), chunk):
        part = requests[i : i + chunk]
        out.append(compute_keys(lm, [layer], part, contexts, position=position)[layer].cpu())
        if on_chunk is not None:
            on_chunk(len(part))
    return torch.cat(out) if out else torch.zeros(0, lm.arch.d_mlp)


def key_similarity(
    lm: Any,
    cases: Sequence[EditCase],
    *,
    layer: int,
    stats: SecondMoment,
    contexts: Sequence[str],
    seed: int = 0,
    long_context: PassageSampler | None = None,
    n_long_context: int = 1,
    n_unrelated: int = 20,
    scramble_max: int = 10,
    position: Position = "last",
    batch_size: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> list[CaseSimilarity]:
    """Whitened similarity of every variant key of every case to the case's ``k*``.

    ``contexts``: the editor's context templates (``Editor.contexts``), over which ``k*`` is
    averaged. ``seed``/``long_context``/``n_long_context``/``scramble_max`` must match the
    evaluation suite's for results to join with an evaluation run. ``progress(stage, n)`` is
    called after each chunk of ``k*`` (stage ``"k*"``) and after each case (``"variants"``).
    """
    if stats.layer != layer:
        raise InvalidRequestError(f"statistics are for layer {stats.layer}, not layer {layer}")
    cases = list(cases)
    keys = case_keys(cases)
    pool = [c.request.subject for c in cases]
    with torch.no_grad():
        k_stars = edit_keys(
            lm,
            layer,
            [c.request for c in cases],
            contexts,
            position=position,
            on_chunk=(lambda n: progress("k*", n)) if progress else None,
        )
        results = []
        for case, key, k_star in zip(cases, keys, k_stars, strict=True):
            inputs, skipped = variant_inputs(
                lm,
                case,
                key,
                subject_pool=pool,
                seed=seed,
                long_context=long_context,
                n_long_context=n_long_context,
                n_unrelated=n_unrelated,
                scramble_max=scramble_max,
                position=position,
            )
            kk = read_keys(
                lm, layer, [x.ids for x in inputs], [x.pos for x in inputs], batch_size=batch_size
            )
            self_sim, beta, beta_norm, cosine = whitened_scores(stats, k_star, kk)
            variants = {name: VariantKeys() for name in VARIANTS}
            for j, x in enumerate(inputs):
                vk = variants[x.variant]
                vk.beta.append(float(beta[j]))
                vk.beta_norm.append(float(beta_norm[j]))
                vk.cosine.append(float(cosine[j]))
                vk.labels.append(x.label)
                vk.index.append(x.index)
                vk.texts.append(x.text)
                vk.token_index.append(x.pos)
                vk.meta.append(x.meta)
            results.append(
                CaseSimilarity(
                    case_id=key,
                    subject=case.request.subject,
                    prompt=case.request.prompt,
                    layer=layer,
                    d_mlp=int(k_star.shape[0]),
                    self_similarity=self_sim,
                    k_star_norm=float(k_star.double().norm()),
                    variants=variants,
                    skipped=skipped,
                )
            )
            if progress is not None:
                progress("variants", 1)
    return results


def specificity_matrix(
    lm: Any,
    cases: Sequence[EditCase],
    layer: int,
    stats: SecondMoment,
    contexts: Sequence[str],
    *,
    position: Position = "last",
    max_cases: int = 30,
) -> tuple[list[str], np.ndarray]:
    """``(subjects, M)`` with ``M[i, j]`` = β̃ of case j's bare-prompt key against case i's k*.

    Rows are the edited subject, columns the probed one: the diagonal is each edit's efficacy
    key, off-diagonal entries are what an edit of row i does to case j's prompt. At most
    ``max_cases`` cases (the first ones).
    """
    cases = list(cases)[:max_cases]
    requests = [c.request for c in cases]
    with torch.no_grad():
        k_stars = edit_keys(lm, layer, requests, contexts, position=position)  # [n, d]
        bare = compute_keys(lm, [layer], requests, ["{}"], position=position)[layer].cpu()
    dev = stats.matrix.device
    c_inv = stats.solve(k_stars.to(dev, torch.float64).T)  # [d, n]: column i = C⁻¹k*_i
    self_sim = (k_stars.to(dev, torch.float64) * c_inv.T).sum(1)  # [n]
    beta = bare.to(dev, torch.float64) @ c_inv  # [j, i] = k_jᵀ C⁻¹ k*_i
    matrix = (beta / self_sim).T  # [i, j]
    return [r.subject for r in requests], matrix.cpu().numpy()


# --------------------------------------------------------------------------- success join


@dataclass
class SuccessAnalysis:
    """Per-probe (β̃, success) rows and their summary (see :func:`success_summary`)."""

    source: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "summary": self.summary,
            "notes": self.notes,
            "rows": self.rows,
        }


def _row(cs: CaseSimilarity, variant: str, j: int, success: bool, **extra: Any) -> dict[str, Any]:
    vk = cs.variants[variant]
    return {
        "case_id": cs.case_id,
        "variant": variant,
        "index": vk.index[j],
        "beta": vk.beta[j],
        "beta_norm": vk.beta_norm[j],
        "success": bool(success),
        **extra,
    }


def _join_run(results: Sequence[CaseSimilarity], run_dir: Path) -> SuccessAnalysis:
    """Rows from an evaluation run's ``results.jsonl`` (per-probe ``exact``), joined on
    (case key, test, probe index)."""
    from repedit.evaluation.rundir import RESULTS, read_jsonl

    path = run_dir / RESULTS
    if not path.is_file():
        raise InvalidRequestError(f"{run_dir} has no {RESULTS} (not an evaluation run directory?)")
    by_case = {cs.case_id: cs for cs in results}
    rows: list[dict[str, Any]] = []
    missing_cases = failed = unmatched = mismatched = 0
    modes = set()
    for rec in read_jsonl(path):
        cs = by_case.get(str(rec.get("case_id")))
        if cs is None:
            missing_cases += 1
            continue
        if rec.get("error"):
            failed += 1
            continue
        modes.add(rec.get("mode"))
        for test, block in (rec.get("tests") or {}).items():
            variant = VARIANT_OF_TEST.get(test)
            if variant is None:
                continue
            vk = cs.variants.get(variant)
            for probe in block.get("probes", []):
                meta = probe.get("meta") or {}
                idx = int(meta.get("index", 0))
                j = vk.index.index(idx) if vk is not None and idx in vk.index else None
                if j is None:
                    unmatched += 1
                    continue
                ours = vk.meta[j]
                if "subject" in meta and meta["subject"] != vk.labels[j]:
                    mismatched += 1
                    continue
                if variant == "long_context" and any(
                    k in meta and meta[k] != ours.get(k) for k in ("length", "unit")
                ):
                    mismatched += 1
                    continue
                rows.append(_row(cs, variant, j, bool(probe["exact"])))
    notes = []
    if missing_cases:
        notes.append(f"{missing_cases} run record(s) have no analysed case (different --n/data?)")
    if failed:
        notes.append(f"{failed} failed case(s) in the run skipped")
    if unmatched or mismatched:
        notes.append(
            f"{unmatched} probe(s) without an analysed key, {mismatched} with a different "
            "variant text (different seed, passage length or id split?)"
        )
    if modes - {"single"}:
        notes.append(f"run mode {sorted(m for m in modes if m)}: β̃ refers to single edits")
    return SuccessAnalysis(f"run:{run_dir}", rows, success_summary(rows), notes)


def _edit_and_score(
    results: Sequence[CaseSimilarity],
    lm: Any,
    cases: Sequence[EditCase],
    editor: Any,
    *,
    batch_size: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> SuccessAnalysis:
    """Rows from editing each case alone, scoring its variant texts, and reverting."""
    from repedit.evaluation.scoring import Probe, score_probes

    by_key = dict(zip(case_keys(cases), cases, strict=True))
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for cs in results:
        case = by_key.get(cs.case_id)
        if case is None:
            failures.append(f"{cs.case_id}: not among the given cases")
            continue
        req = case.request
        items = [(v, j) for v in VARIANTS for j in range(len(cs.variants.get(v, ())))]
        probes = [
            Probe(cs.variants[v].texts[j], req.target_new, req.target_true, v) for v, j in items
        ]
        try:
            result = editor.edit(lm, [req])
        except (RepeditError, RuntimeError) as exc:
            failures.append(f"{cs.case_id}: {exc}")
            if progress is not None:
                progress("edits", 1)
            continue
        try:
            scores = score_probes(lm, probes, batch_size=batch_size)
        finally:
            result.revert(lm)
        for (v, j), score in zip(items, scores, strict=True):
            rows.append(_row(cs, v, j, score.exact, beats_alt=score.beats_alt))
        if progress is not None:
            progress("edits", 1)
    notes = [f"edit failed: {f}" for f in failures]
    source = f"edit:{getattr(editor, 'name', type(editor).__name__)}"
    return SuccessAnalysis(source, rows, success_summary(rows), notes)


def similarity_vs_success(
    results: Sequence[CaseSimilarity],
    *,
    run_dir: str | Path | None = None,
    lm: Any = None,
    cases: Sequence[EditCase] | None = None,
    editor: Any = None,
    method: str = "rome",
    batch_size: int = 32,
    progress: Callable[[str, int], None] | None = None,
) -> SuccessAnalysis:
    """Join every key's β̃ with whether the edited model passes the probe of the same text.

    (a) ``run_dir``: an evaluation run (``repedit eval``) of the same cases; success is the
    probe's ``exact`` (argmax matches every target token). (b) otherwise ``lm`` and ``cases``:
    each case is edited alone with ``editor`` (default ``make_editor(method)``), its variant
    texts -- including the unrelated subjects, where "success" means the edit bled into them --
    are scored with :func:`~repedit.evaluation.scoring.score_probes`, and the edit is reverted.
    """
    if run_dir is not None:
        return _join_run(results, Path(run_dir))
    if lm is None or cases is None:
        raise InvalidRequestError("similarity_vs_success needs run_dir, or lm and cases")
    if editor is None:
        from repedit.editors import make_editor

        editor = make_editor(method)
    return _edit_and_score(results, lm, cases, editor, batch_size=batch_size, progress=progress)


def point_biserial(x: Sequence[float], success: Sequence[bool]) -> float | None:
    """Pearson correlation of a continuous ``x`` with a 0/1 outcome (None when undefined)."""
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(success, dtype=float)
    if len(xs) < 2 or xs.std() == 0 or ys.std() == 0:
        return None
    return float(np.corrcoef(xs, ys)[0, 1])


def binned_success(
    rows: Sequence[dict[str, Any]], edges: Sequence[float] = BETA_BINS
) -> list[dict[str, Any]]:
    """Mean success per β̃ bin ``[lo, hi)`` (bins without rows are kept, with ``None``)."""
    out = []
    for lo, hi in itertools.pairwise(edges):
        hits = [r["success"] for r in rows if lo <= r["beta_norm"] < hi]
        out.append(
            {
                "lo": None if math.isinf(lo) else lo,
                "hi": None if math.isinf(hi) else hi,
                "n": len(hits),
                "success": (sum(hits) / len(hits)) if hits else None,
            }
        )
    return out


def success_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success per variant type and per β̃ bin, and point-biserial correlations.

    ``point_biserial`` pools the equivalent variants and the edit prompt (what an edit should
    reach); ``point_biserial_all`` adds the unrelated subjects.
    """
    by_variant = {}
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        by_variant[v] = {
            "n": len(rs),
            "success": sum(r["success"] for r in rs) / len(rs),
            "median_beta_norm": float(np.median([r["beta_norm"] for r in rs])),
            "point_biserial": point_biserial(
                [r["beta_norm"] for r in rs], [r["success"] for r in rs]
            ),
        }
    reach = [r for r in rows if r["variant"] != "unrelated"]
    return {
        "n": len(rows),
        "by_variant": by_variant,
        "bins": binned_success(reach),
        "bins_all": binned_success(rows),
        "point_biserial": point_biserial(
            [r["beta_norm"] for r in reach], [r["success"] for r in reach]
        ),
        "point_biserial_all": point_biserial(
            [r["beta_norm"] for r in rows], [r["success"] for r in rows]
        ),
    }


# --------------------------------------------------------------------------- findings


def _describe(values: Sequence[float]) -> dict[str, Any]:
    xs = np.asarray(values, dtype=float)
    if xs.size == 0:
        return {"n": 0, "mean": None, "median": None, "q25": None, "q75": None, "min": None,
                "max": None, "share_below_0.4": None}  # fmt: skip
    return {
        "n": int(xs.size),
        "mean": float(xs.mean()),
        "median": float(np.median(xs)),
        "q25": float(np.quantile(xs, 0.25)),
        "q75": float(np.quantile(xs, 0.75)),
        "min": float(xs.min()),
        "max": float(xs.max()),
        "share_below_0.4": float((xs < PAPER_LEVEL).mean()),
    }


def variant_table(results: Sequence[CaseSimilarity]) -> dict[str, dict[str, Any]]:
    """β̃ statistics per variant type (plus median cosine), pooled over cases."""
    table = {}
    for v in VARIANTS:
        vals = [x for cs in results for x in cs.beta_norm(v)]
        cos = [x for cs in results for x in (cs.variants[v].cosine if v in cs.variants else [])]
        stats = _describe(vals)
        stats["median_cosine"] = float(np.median(cos)) if cos else None
        stats["skipped"] = sum(cs.skipped.get(v, 0) for cs in results)
        table[v] = stats
    return table


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def summarize_findings(results: Sequence[CaseSimilarity]) -> dict[str, Any]:
    """The paper's two findings (``docs/method.md``), tested on these results.

    Finding 1 ("paraphrased and scrambled subjects fall from 1.0 to < 0.4"): the pooled β̃ of
    subject-paraphrase (ID + OOD) and scrambled-subject keys. Verdict: *holds* if their median
    is below 0.4, *partly holds* if at least a quarter are, else *does not hold*.

    Finding 2 ("unrelated subjects reach large unnormalised β, so no single bound on native
    keys separates equivalent from unrelated keys"): the largest unrelated β, its ratio to the
    median self-similarity k*ᵀC⁻¹k* and to d_mlp (the corpus mean of kᵀC⁻¹k, by the trace
    identity), per case whether some unrelated key's β reaches the weakest equivalent key's
    (paraphrase, scramble, long context, prompt paraphrase), and the best balanced accuracy of
    one raw-β threshold. Verdict: *holds* if the largest unrelated β is at least the paper's
    2500 in units of d_mlp (2500 / 11008 ≈ 0.23 d_mlp), *partly holds* if at least half that,
    else *does not hold*. The paper's maximum is over a WikiText scan, ours over the other
    cases' subjects: a smaller search, so a lower bound.
    """
    results = list(results)
    if not results:
        raise InvalidRequestError("no cases to summarise")
    d_mlp = results[0].d_mlp
    selfs = np.asarray([cs.self_similarity for cs in results])
    med_self = float(np.median(selfs))
    table = variant_table(results)

    # ---- finding 1
    f1_vals = [x for cs in results for v in FINDING1_VARIANTS for x in cs.beta_norm(v)]
    f1 = _describe(f1_vals)
    not_verbatim = [
        cs.variants[v].beta_norm[j]
        for cs in results
        for v in ("subject_paraphrase", "ood_subject_paraphrase")
        if v in cs.variants
        for j, m in enumerate(cs.variants[v].meta)
        if not m.get("contains_subject")
    ]
    orig = table["original"]
    unrel = table["unrelated"]
    share = f1["share_below_0.4"]
    if f1["n"] == 0:
        verdict1 = "not testable"
    elif f1["median"] < PAPER_LEVEL:
        verdict1 = "holds"
    elif share >= 0.25:
        verdict1 = "partly holds"
    else:
        verdict1 = "does not hold"
    pct = _fmt(100 * share if share is not None else None, 0)
    statement1 = (
        f"Finding 1 {verdict1}: {f1['n']} paraphrased/scrambled-subject keys have median β̃ "
        f"{_fmt(f1['median'])} (mean {_fmt(f1['mean'])}); {pct}% "
        f"are below 0.4, against median {_fmt(orig['median'])} for the edit prompt and "
        f"{_fmt(unrel['median'])} for unrelated subjects (subject paraphrases that do not "
        f"contain the subject: median {_fmt(_describe(not_verbatim)['median'])}, "
        f"n = {len(not_verbatim)})."
    )
    finding1 = {
        "claim": "keys of paraphrased and scrambled subjects fall from β̃ = 1 to < 0.4 "
        "(about a random subject's level)",
        "variants": list(FINDING1_VARIANTS),
        **f1,
        "by_variant": {
            v: {k: table[v][k] for k in ("n", "median", "mean", "share_below_0.4")}
            for v in FINDING1_VARIANTS
        },
        "paraphrases_without_subject": _describe(not_verbatim),
        "original_mean": orig["mean"],
        "original_median": orig["median"],
        "unrelated_median": unrel["median"],
        "criterion": "holds: median < 0.4; partly: >= 25% below 0.4",
        "verdict": verdict1,
        "holds": verdict1 == "holds",
        "statement": statement1,
    }

    # ---- finding 2
    best = None  # (beta, case, subject, beta_norm, edited subject)
    overlap = {v: [0, 0] for v in ("all", *EQUIVALENT)}  # [cases overlapping, cases tested]
    eq_all, un_all, un_norm_all = [], [], []
    for cs in results:
        un = cs.variants.get("unrelated")
        eq_all.extend(x for v in EQUIVALENT for x in cs.beta(v))
        if un is None or not len(un):
            continue
        un_all.extend(un.beta)
        un_norm_all.extend(un.beta_norm)
        j = int(np.argmax(un.beta))
        if best is None or un.beta[j] > best[0]:
            best = (un.beta[j], cs.case_id, un.labels[j], un.beta_norm[j], cs.subject)
        top = max(un.beta)
        for v in overlap:
            eq = [x for w in (EQUIVALENT if v == "all" else (v,)) for x in cs.beta(w)]
            if eq:
                overlap[v][1] += 1
                overlap[v][0] += int(top >= min(eq))
    max_beta = best[0] if best else None
    ratio_d = max_beta / d_mlp if best else None
    if ratio_d is None:
        verdict2 = "not testable"
    elif ratio_d >= PAPER_UNRELATED_RATIO:
        verdict2 = "holds"
    elif ratio_d >= 0.5 * PAPER_UNRELATED_RATIO:
        verdict2 = "partly holds"
    else:
        verdict2 = "does not hold"
    n_over, n_tested = overlap["all"]
    accuracy = _best_threshold_accuracy(eq_all, un_all)
    statement2 = (
        f"Finding 2 {verdict2}: the largest unrelated β is {_fmt(max_beta, 1)} "
        f"({best[2]!r} in the template of {best[4]!r}), {_fmt(ratio_d)}× d_mlp = {d_mlp} "
        f"(the paper's 2500 is {PAPER_UNRELATED_RATIO:.2f}× LLaMA2-7B's 11008) and "
        f"{_fmt(max_beta / med_self)}× the median self-similarity {_fmt(med_self, 1)}; against "
        f"its own edit that key has β̃ {_fmt(best[3])} (largest unrelated β̃ "
        f"{_fmt(max(un_norm_all))}). In {n_over} of {n_tested} cases an unrelated subject's β "
        f"reaches the weakest equivalent key's; one threshold on raw β separates equivalent "
        f"from unrelated keys with balanced accuracy {_fmt(accuracy)}."
        if best
        else f"Finding 2 {verdict2}: no unrelated keys were scored."
    )
    finding2 = {
        "claim": "some unrelated subjects reach large unnormalised β (> 2500 for LLaMA2-7B, "
        "d_mlp 11008), so no single bound on native keys separates equivalent from unrelated "
        "keys",
        "max_unrelated_beta": max_beta,
        "max_unrelated_beta_norm": best[3] if best else None,
        "max_unrelated_case": best[1] if best else None,
        "max_unrelated_subject": best[2] if best else None,
        "max_unrelated_edited_subject": best[4] if best else None,
        "largest_unrelated_beta_norm": max(un_norm_all) if un_norm_all else None,
        "median_self_similarity": med_self,
        "ratio_to_median_self_similarity": max_beta / med_self if best else None,
        "ratio_to_d_mlp": ratio_d,
        "paper_ratio_to_d_mlp": PAPER_UNRELATED_RATIO,
        "unrelated_beta_q95": float(np.quantile(un_all, 0.95)) if un_all else None,
        "unrelated_beta_norm_q95": float(np.quantile(un_norm_all, 0.95)) if un_norm_all else None,
        "cases_overlapping": n_over,
        "cases_tested": n_tested,
        "share_cases_overlapping": n_over / n_tested if n_tested else None,
        "overlap_by_variant": {
            v: {"cases": t, "overlapping": o, "share": o / t if t else None}
            for v, (o, t) in overlap.items()
            if v != "all"
        },
        "global_threshold_accuracy": accuracy,
        "criterion": "holds: largest unrelated β / d_mlp >= the paper's 2500 / 11008; partly: "
        ">= half of it (d_mlp is the corpus mean of kᵀC⁻¹k, a scale-free unit); overlap = the "
        "largest unrelated β of a case reaches its smallest equivalent-key β",
        "verdict": verdict2,
        "holds": verdict2 == "holds",
        "statement": statement2,
    }
    return {
        "n_cases": len(results),
        "layer": results[0].layer,
        "d_mlp": d_mlp,
        "self_similarity": {
            "median": med_self,
            "mean": float(selfs.mean()),
            "min": float(selfs.min()),
            "max": float(selfs.max()),
            "median_over_d_mlp": med_self / d_mlp,
        },
        "variants": table,
        "finding_1": finding1,
        "finding_2": finding2,
    }


def _best_threshold_accuracy(
    positives: Sequence[float], negatives: Sequence[float]
) -> float | None:
    """Best balanced accuracy of one threshold t (positive iff β ≥ t) on raw β."""
    if not positives or not negatives:
        return None
    pos = np.sort(np.asarray(positives, dtype=float))
    neg = np.sort(np.asarray(negatives, dtype=float))
    best = 0.5
    for t in np.concatenate([pos, neg]):
        tpr = 1.0 - np.searchsorted(pos, t, side="left") / len(pos)
        tnr = np.searchsorted(neg, t, side="left") / len(neg)
        best = max(best, 0.5 * (tpr + tnr))
    return float(best)


def findings_markdown(findings: dict[str, Any], success: SuccessAnalysis | None = None) -> str:
    """``findings.md``: the two findings with their numbers, the variant table, success."""
    f1, f2 = findings["finding_1"], findings["finding_2"]
    ss = findings["self_similarity"]
    lines = [
        "# Whitened key similarity: the REP paper's findings on this model",
        "",
        f"{findings['n_cases']} cases, layer {findings['layer']}, d_mlp {findings['d_mlp']}. "
        f"β̃ = kᵀC⁻¹k* / k*ᵀC⁻¹k* (1 at k*); self-similarity k*ᵀC⁻¹k*: median "
        f"{ss['median']:.1f} ({ss['median_over_d_mlp']:.2f}× d_mlp), range "
        f"{ss['min']:.1f}–{ss['max']:.1f}.",
        "",
        "## Finding 1: paraphrased and scrambled subjects",
        "",
        f"Claim: {f1['claim']}.",
        "",
        f1["statement"],
        "",
        "## Finding 2: unrelated subjects",
        "",
        f"Claim: {f2['claim']}.",
        "",
        f2["statement"],
        "",
        "## β̃ per variant type",
        "",
        "| variant | keys | median β̃ | mean β̃ | q25 | q75 | < 0.4 | median cos | skipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, s in findings["variants"].items():
        below = s["share_below_0.4"]
        lines.append(
            f"| {v} | {s['n']} | {_fmt(s['median'])} | {_fmt(s['mean'])} | {_fmt(s['q25'])} | "
            f"{_fmt(s['q75'])} | {_fmt(100 * below if below is not None else None, 0)}% | "
            f"{_fmt(s['median_cosine'])} | {s['skipped']} |"
        )
    if success is not None:
        sm = success.summary
        lines += [
            "",
            f"## β̃ and edit success ({success.source})",
            "",
            f"Point-biserial correlation of β̃ with success: {_fmt(sm['point_biserial'])} "
            f"(edit prompt + equivalent variants), {_fmt(sm['point_biserial_all'])} "
            "(with unrelated subjects).",
            "",
            "| variant | probes | success | median β̃ | r |",
            "|---|---|---|---|---|",
        ]
        for v, s in sm["by_variant"].items():
            lines.append(
                f"| {v} | {s['n']} | {_fmt(s['success'])} | {_fmt(s['median_beta_norm'])} | "
                f"{_fmt(s['point_biserial'])} |"
            )
        lines += ["", "| β̃ bin | probes | success |", "|---|---|---|"]
        for b in sm["bins"]:
            lo = "−∞" if b["lo"] is None else f"{b['lo']:g}"
            hi = "∞" if b["hi"] is None else f"{b['hi']:g}"
            lines.append(f"| [{lo}, {hi}) | {b['n']} | {_fmt(b['success'])} |")
        for note in success.notes:
            lines.append(f"\n_Note: {note}_")
    return "\n".join(lines) + "\n"
