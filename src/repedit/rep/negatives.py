"""Gate negatives made of other subjects from a pool disjoint from the evaluation.

``RepConfig.pool_negatives`` puts that many subjects per request, drawn from the
``RepConfig.negative_pool`` dataset, into the edit's prompt and contexts; the gate learns to stay
shut on their tokens. ``RepConfig.pool_kinds`` says which: subjects with the same true answer as
the edit (``kin``: the facts an edit must leave alone, such as other speakers of the language an
edit changes), look-alikes (a shared subword token or word beginning, as the ``near_subject``
test's), or random ones. Why: a gate
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
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from repedit.data.augment import fold
from repedit.data.case import EditCase
from repedit.data.loaders import dataset_path, load_cases
from repedit.data.variants import NearSubjects, stable_rng
from repedit.errors import DataError, InvalidRequestError
from repedit.models.loading import LoadedModel
from repedit.rep.adapter import POOL_KINDS, PoolKind


@dataclass(frozen=True)
class SubjectPool:
    """A dataset's subjects with their look-alike index; ``source``: the file they came from."""

    index: NearSubjects
    source: str

    @cached_property
    def by_answer(self) -> dict[str, list[EditCase]]:
        """The pool's cases by folded true answer."""
        out: dict[str, list[EditCase]] = {}
        for c in self.index.cases:
            out.setdefault(fold(c.request.target_true or ""), []).append(c)
        return out

    def draw(
        self,
        case: EditCase,
        n: int,
        *,
        kinds: Sequence[PoolKind] = ("lookalike", "random"),
        excluded: Collection[str] = (),
        others: Collection[str] = (),
        texts: Iterable[str] = (),
        key: str = "",
        seed: int = 0,
    ) -> list[str]:
        """Up to ``n`` pool subjects for ``case``, an equal share of each of ``kinds`` in turn
        (a kind that runs short leaves its share to the next): ``kin``, subjects with the same
        true answer as the case (the facts an edit must leave alone look like this);
        ``lookalike``, subjects sharing a token piece, most shared characters first;
        ``random``. Seeded by ``key`` and ``seed``.

        ``excluded``: folded subjects never drawn. ``others``: folded subject forms of other
        edits sharing the adapter set, kept out like the case's own (with what begins with
        them). ``texts``: folded texts no drawn subject may occur in (the probes).
        """
        unknown = set(kinds) - set(POOL_KINDS)
        if unknown:
            raise InvalidRequestError(f"unknown pool kind(s) {sorted(unknown)}; use {POOL_KINDS}")
        texts = list(texts)
        own = {fold(s) for s in [case.request.subject, *case.subject_paraphrases]} | set(others)
        out: list[str] = []
        seen: set[str] = set()

        def usable(subject: str) -> bool:
            f = fold(subject)
            if f in seen or f in excluded or any(f.startswith(o) for o in own):
                return False  # a causal model's key at a shared prefix is the positive's own
            return not any(f in t for t in texts)

        for i, kind in enumerate(kinds):
            quota = n if i == len(kinds) - 1 else len(out) + -(-(n - len(out)) // (len(kinds) - i))
            for other in self._candidates(case, kind, 4 * n, key, seed):
                if len(out) >= quota:
                    break
                if usable(other.request.subject):
                    seen.add(fold(other.request.subject))
                    out.append(other.request.subject)
        return out

    def _candidates(
        self, case: EditCase, kind: PoolKind, n: int, key: str, seed: int
    ) -> Sequence[EditCase]:
        """The kind's candidates in the order they are taken."""
        if kind == "lookalike":
            return [other for other, _ in self.index.lookalikes(case, n, key=key, seed=seed)]
        if kind == "kin":
            answer = case.request.target_true
            pool = list(self.by_answer.get(fold(answer), [])) if answer else []
            stable_rng("pool-negative", kind, seed, key).shuffle(pool)
            return pool
        pool = list(self.index.cases)
        stable_rng("pool-negative", seed, key).shuffle(pool)
        return pool


#: ``negative_pool`` that uses this dataset when it is found and no pool otherwise
AUTO_POOL = "auto"
AUTO_DATASET = "counterfact"

_CACHE: dict[tuple[object, ...], SubjectPool] = {}
_LOCK = threading.Lock()


def find_pool(lm: LoadedModel, spec: str) -> SubjectPool | None:
    """:func:`subject_pool` of ``spec``; for ``"auto"``, CounterFact's subjects when the data
    folder has them, else None with a warning (REP then trains without pool negatives, as
    ``--rep`` must work without a data folder). Any other missing pool is a DataError."""
    if spec != AUTO_POOL:
        return subject_pool(lm, spec)
    try:
        return subject_pool(lm, AUTO_DATASET)
    except DataError:
        warnings.warn(
            f"REP: no {AUTO_DATASET} subjects for pool negatives (set REPEDIT_DATA to the data "
            "folder); training without them. --rep-set negative_pool=PATH names a pool, "
            "pool_negatives=0 turns them off",
            stacklevel=2,
        )
        return None


def subject_pool(lm: LoadedModel, spec: str) -> SubjectPool:
    """The subjects of dataset ``spec`` (a name or a file), indexed with ``lm``'s tokenizer.
    Kept in memory per file (path, size, modification time) and model, since an evaluation
    asks once per case. A pool that cannot be found is a :class:`DataError`: training without
    the negatives a configuration asks for would be a silent change of method."""
    try:
        path = dataset_path(spec)
    except DataError as exc:
        raise DataError(
            f"REP pool_negatives needs its negative_pool {spec!r}: {exc}; give a file with "
            "--rep-set negative_pool=PATH or set pool_negatives=0"
        ) from None
    st = os.stat(path)
    tok = lm.tokenizer
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, lm.fingerprint, len(tok))
    with _LOCK:
        if key not in _CACHE:
            cases = load_cases(path, skip_invalid=True).cases
            _CACHE[key] = SubjectPool(NearSubjects(cases, tok), str(path))
        return _CACHE[key]
