"""Whitened similarity of variant keys to the edit key: the REP paper's two findings, measured.

For a rank-one edit the change that a key ``k`` retrieves is linear in ``β = kᵀC⁻¹k*``; for
ROME/R-ROME exactly ``ΔW k = β̃ · (v* − W k*)`` with ``β̃ = β / (k*ᵀC⁻¹k*)``
So ``β̃`` is the share of the edit a key gets back: 1 at
``k*`` itself, and whatever it is for the keys that the evaluation probes actually produce.

:func:`key_similarity` reads, at the edit layer, ``k*`` (averaged over the editor's context
prefixes, through :func:`~repedit.editors.keys.compute_keys`) and the bare-prompt key of every
robustness variant of a case -- the case's :func:`~repedit.data.variants.case_variants`, the
same forms :func:`~repedit.evaluation.probes.build_probes` scores, with the same indices, seeds
and passages, so the numbers join with an evaluation run's per-probe results
(:func:`~repedit.analysis.success.similarity_vs_success`):

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

:func:`~repedit.analysis.findings.summarize_findings` then tests the paper's two claims on the
model at hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from repedit.analysis.records import VARIANTS, CaseSimilarity, VariantKeys
from repedit.data.case import EditCase, EditRequest
from repedit.data.variants import PassageSampler, Variant, case_variants, stable_rng
from repedit.editors.keys import compute_keys, keys_at
from repedit.errors import InvalidRequestError
from repedit.evaluation.probes import case_keys
from repedit.models.batching import length_buckets
from repedit.models.loading import LoadedModel
from repedit.models.tokens import Position, locate
from repedit.stats.second_moment import SecondMoment

#: variant kind → the analysis's variant type (the edit prompt is ``original`` in both)
_ORDER = (
    "original",
    "subject_paraphrase",
    "ood_subject_paraphrase",
    "scrambled_subject",
    "long_context",
    "prompt_paraphrase",
)
_HALF = {"train": "id", "heldout": "ood"}


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


def _located(
    lm: LoadedModel,
    variant: str,
    template: str,
    subject: str,
    position: Position,
    label: str,
    index: int,
    **meta: Any,
) -> _Input:
    """Token ids and subject position of ``template`` filled with ``subject``."""
    ids, pos = locate(lm.tokenizer, template, subject, position=position)
    text = template.format(subject)
    return _Input(variant, label, index, text, ids, pos, dict(meta))


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


def _variant_input(
    lm: LoadedModel,
    v: Variant,
    req: EditRequest,
    position: Position,
    sampler: PassageSampler | None,
) -> _Input:
    """The key-reading input of one case variant, labelled as ``similarity.json`` records it."""
    if v.subject_span is None:
        raise InvalidRequestError(f"no verbatim subject in {v.text!r}")
    meta: dict[str, Any] = {}
    label = v.subject
    if v.kind in ("subject_paraphrase", "ood_subject_paraphrase"):
        meta["contains_subject"] = req.subject.casefold() in v.subject.casefold()
    elif v.kind == "scrambled_subject":
        meta["half"] = _HALF[v.half]
    elif v.kind == "long_context" and sampler is not None:
        label = f"passage #{v.index}"
        meta.update(length=sampler.length, unit=sampler.unit)
    elif v.kind == "prompt_paraphrase":
        label = v.text
    return _located(lm, v.kind, v.template, v.subject, position, label, v.index, **meta)


def variant_inputs(
    lm: LoadedModel,
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

    The case's forms are :func:`~repedit.data.variants.case_variants` with the suite's seeds and
    passages (the held-out ones, ``"<key>:test"``), so results join with an evaluation run; the
    ``unrelated`` type adds other cases' subjects in this case's template.
    """
    req = case.request
    variants = case_variants(
        case,
        lm.tokenizer,
        key=key,
        seed=seed,
        scramble_max=scramble_max,
        sampler=long_context,
        passages=n_long_context,
    )
    wanted = [v for v in variants if not (v.kind == "long_context" and v.half == "train")]
    wanted.sort(key=lambda v: _ORDER.index(v.kind))
    out: list[_Input] = []
    skipped: dict[str, int] = {}
    for v in wanted:
        try:
            out.append(_variant_input(lm, v, req, position, long_context))
        except InvalidRequestError:
            skipped[v.kind] = skipped.get(v.kind, 0) + 1
    for i, s in enumerate(_unrelated_subjects(case, key, subject_pool, n_unrelated, seed)):
        try:
            out.append(_located(lm, "unrelated", req.prompt, s, position, s, i))
        except InvalidRequestError:
            skipped["unrelated"] = skipped.get("unrelated", 0) + 1
    return out, skipped


def keys_at_positions(
    lm: LoadedModel,
    layer: int,
    seqs: Sequence[Sequence[int]],
    positions: Sequence[int],
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """Keys at ``positions`` ([n, d_mlp], float32, CPU), with sequences grouped by length
    (:func:`~repedit.models.batching.length_buckets`), ``batch_size`` a forward."""
    out = torch.empty(len(seqs), lm.arch.d_mlp)
    for group in length_buckets([len(s) for s in seqs], max_rows=batch_size):
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
    lm: LoadedModel,
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
    lm: LoadedModel,
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
    results = []
    with torch.no_grad():
        k_stars = edit_keys(
            lm,
            layer,
            [c.request for c in cases],
            contexts,
            position=position,
            on_chunk=(lambda n: progress("k*", n)) if progress else None,
        )
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
            kk = keys_at_positions(
                lm, layer, [x.ids for x in inputs], [x.pos for x in inputs], batch_size=batch_size
            )
            results.append(_case_similarity(case, key, layer, stats, k_star, inputs, kk, skipped))
            if progress is not None:
                progress("variants", 1)
    return results


def _case_similarity(
    case: EditCase,
    key: str,
    layer: int,
    stats: SecondMoment,
    k_star: torch.Tensor,
    inputs: Sequence[_Input],
    keys: torch.Tensor,
    skipped: dict[str, int],
) -> CaseSimilarity:
    """One case's record: every input's scores against ``k_star``, grouped by variant type."""
    self_sim, beta, beta_norm, cosine = whitened_scores(stats, k_star, keys)
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
    return CaseSimilarity(
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


def specificity_matrix(
    lm: LoadedModel,
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
