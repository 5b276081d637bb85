"""Extra training rows for the value loss: the edit prompt with another subject form or prefix.

By default ``v*`` is fitted on the edit prompt after the shared context prefixes only. A
``Form`` adds one more row for one request; the value loss then asks the target of it too. Two
sources feed forms: an editor (CoRE's per-request prefixes) and the value-side robustness
option of :class:`~repedit.editors.values.ValueHparams` (:func:`robust_forms`), which serves
every editor.

The robustness forms obey REP's no-leakage rule. Scrambled subjects come from the in-domain
half of the evaluation suite's scramble list (same generator, key, seed and list length), the
half the suite labels ``"id"`` and REP trains on. Subject paraphrases are the request's
``subject_forms``, which a case fills with its in-domain half only. Passages are drawn under
the key ``"<case key>:value-train"``, disjoint from the suite's ``"<case key>:test"`` draw.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repedit.data.case import EditRequest
from repedit.data.loaders import DATA_ENV, passage_corpus
from repedit.data.variants import PassageSampler, scrambled_subjects, split_half
from repedit.models.loading import LoadedModel
from repedit.models.tokens import prompt_ids

#: the evaluation suite's scramble list length and seed (its defaults): the in-domain half of
#: exactly this list is what the suite reports as ``half="id"``
SUITE_SCRAMBLE_MAX = 10
SUITE_SEED = 0
#: tokens left free after a passage row for the target (:func:`fit_passage`)
TARGET_ROOM = 64


@dataclass(frozen=True)
class Form:
    """One extra row of a request: ``template`` (exactly one ``{}``) filled with ``subject``."""

    template: str
    subject: str


def case_key(request: EditRequest) -> str:
    """The suite's case key (the case id, else the prompt text): it seeds scrambles and
    passages."""
    return str(request.case_id) if request.case_id is not None else request.text


def training_scrambles(request: EditRequest, tokenizer: Any, count: int) -> list[str]:
    """The first ``count`` scrambles of the suite's in-domain half (never a held-out one)."""
    every = scrambled_subjects(
        request.subject, tokenizer, n_max=SUITE_SCRAMBLE_MAX, seed=SUITE_SEED, key=case_key(request)
    )
    return split_half(every)[0][:count]


@functools.lru_cache(maxsize=8)
def _sampler(path: str, mtime_ns: int, length: int) -> PassageSampler:
    """Word passages of ``length`` from the corpus file (cached per file version and length)."""
    return PassageSampler.from_file(path, length=length, unit="words", seed=SUITE_SEED)


def training_passages(request: EditRequest, lengths: tuple[int, ...]) -> list[str]:
    """One corpus passage per length (in words), or none when the corpus is not found."""
    path, where = passage_corpus()
    if path is None:
        warnings.warn(
            f"value robustness: passage corpus not found ({where}); no passage prefixes. "
            f"Set {DATA_ENV}.",
            stacklevel=3,
        )
        return []
    mtime = Path(path).stat().st_mtime_ns
    key = f"{case_key(request)}:value-train"
    return [_sampler(str(path), mtime, n).passages(key, 1)[0] for n in lengths]


def robust_forms(
    lm: LoadedModel,
    request: EditRequest,
    *,
    scrambles: int,
    prefix_lengths: tuple[int, ...],
    paraphrases: int = 0,
) -> list[Form]:
    """The value-side robustness rows of one request: training-half scrambles and the first
    ``paraphrases`` of its ``subject_forms`` in the edit prompt, then the edit prompt after
    one corpus passage of each length."""
    out = [Form(request.prompt, s) for s in training_scrambles(request, lm.tokenizer, scrambles)]
    out += [Form(request.prompt, s) for s in request.subject_forms[:paraphrases]]
    for passage in training_passages(request, prefix_lengths) if prefix_lengths else []:
        passage = fit_passage(lm, passage, request.text)
        if not passage:
            continue
        escaped = passage.replace("{", "{{").replace("}", "}}")
        out.append(Form(escaped + " " + request.prompt, request.subject))
    return out


def fit_passage(lm: LoadedModel, passage: str, prompt: str) -> str:
    """``passage`` with words cut from its front until it, ``prompt`` and ``TARGET_ROOM``
    tokens fit the model's positions (unchanged when they fit or the model has no limit):
    a model with a short context still gets the longest passage it can read."""
    limit = lm.max_positions
    if limit is None:
        return passage

    def fits(text: str) -> bool:
        return len(prompt_ids(lm.tokenizer, text + " " + prompt)) + TARGET_ROOM <= limit

    words = passage.split(" ")
    if fits(passage):
        return passage
    lo, hi = 0, len(words)  # keep the last ``lo`` words (fits), not the last ``hi`` (too long)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(" ".join(words[-mid:])) else (lo, mid)
    return " ".join(words[-lo:]) if lo else ""
