"""Gate negatives made of other subjects from a pool disjoint from the evaluation.

``RepConfig.pool_negatives`` puts that many subjects per request, drawn from the
``RepConfig.negative_pool`` dataset, into the edit's prompt and contexts; the gate learns to stay
shut on their tokens. Half are look-alikes of the edited subject (they share a subword token or
a word beginning, as the ``near_subject`` test's do), the rest are drawn at random. Why: a gate
trained only on a list of the subject's forms, with the subject's other tokens left out of its
loss, opens on anything that resembles the subject; subjects the evaluation never uses teach it
where the subject ends without tuning it on the probes.

No leakage: a pool subject is left out when it is one the caller excludes (the evaluation's
look-alike subjects), one that begins with one of the case's own subject forms (at a shared
prefix a causal model's key is the positive's own), or when it occurs in any text the case's
evaluation probes hold (its neighbourhood prompts among them).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from repedit.data.augment import fold
from repedit.data.case import EditCase
from repedit.data.loaders import dataset_path, load_cases
from repedit.data.variants import NearSubjects, stable_rng
from repedit.errors import DataError
from repedit.models.loading import LoadedModel


@dataclass(frozen=True)
class SubjectPool:
    """A dataset's subjects with their look-alike index; ``source``: the file they came from."""

    index: NearSubjects
    source: str

    def draw(
        self,
        case: EditCase,
        n: int,
        *,
        excluded: Collection[str] = (),
        texts: Iterable[str] = (),
        key: str = "",
        seed: int = 0,
    ) -> list[str]:
        """Up to ``n`` pool subjects for ``case``: the first half look-alikes (most shared
        characters first), the rest in a seeded random order.

        ``excluded``: folded subjects never drawn. ``texts``: folded texts no drawn subject may
        occur in (the case's probes).
        """
        if n <= 0:
            return []
        texts = list(texts)
        own = {fold(s) for s in [case.request.subject, *case.subject_paraphrases]}

        def usable(subject: str) -> bool:
            f = fold(subject)
            if f in excluded or any(f.startswith(o) for o in own):
                return False  # a causal model's key at a shared prefix is the positive's own
            return not any(f in t for t in texts)

        out: list[str] = []
        seen: set[str] = set()

        def take(subject: str) -> None:
            if len(out) < n and fold(subject) not in seen and usable(subject):
                seen.add(fold(subject))
                out.append(subject)

        half = (n + 1) // 2
        for other, _ in self.index.lookalikes(case, 4 * half, key=key, seed=seed):
            if len(out) >= half:
                break
            take(other.request.subject)
        cases = list(self.index.cases)
        stable_rng("pool-negative", seed, key).shuffle(cases)
        for other in cases:
            if len(out) >= n:
                break
            take(other.request.subject)
        return out


_CACHE: dict[tuple[object, ...], SubjectPool] = {}
_LOCK = threading.Lock()


def subject_pool(lm: LoadedModel, spec: str) -> SubjectPool | None:
    """The subjects of dataset ``spec`` (a name or a file), indexed with ``lm``'s tokenizer;
    None, with a warning, when the dataset cannot be found. Kept in memory per file (path,
    size, modification time) and tokenizer, since an evaluation asks once per case."""
    try:
        path = dataset_path(spec)
    except DataError as exc:
        warnings.warn(f"REP: no negative subject pool ({exc})", stacklevel=3)
        return None
    st = os.stat(path)
    tok = lm.tokenizer
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, tok.name_or_path, len(tok))
    with _LOCK:
        if key not in _CACHE:
            cases = load_cases(path, skip_invalid=True).cases
            _CACHE[key] = SubjectPool(NearSubjects(cases, tok), str(path))
        return _CACHE[key]
