"""The two record types everything else speaks: an edit request and an evaluation case.

Kept free of torch so datasets can be read, validated and split without loading a model.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from repedit.errors import InvalidRequestError

SUBJECT_SLOT = "{}"


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should be completed by ``target_new``.

    ``prompt`` holds exactly one ``{}`` where the subject goes, e.g. ``"{} is located in"``;
    any other brace in it must be doubled (``{{``), so filling the slot can never fail later.
    ``subject_forms`` are other surface forms of the subject the edit may train on (a case's
    in-domain paraphrases, :attr:`EditCase.edit_request`); only an option of the value step
    reads them, so a request is edited the same with or without them.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | None = None
    subject_forms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f" (case {self.case_id})" if self.case_id is not None else ""
        if not isinstance(self.prompt, str) or not _one_slot(self.prompt):
            raise InvalidRequestError(
                f"prompt must contain exactly one '{{}}' for the subject (other braces "
                f"doubled){where}: {self.prompt!r}"
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise InvalidRequestError(f"empty subject{where}")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise InvalidRequestError(f"empty target_new{where}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise InvalidRequestError(f"target_true must be a string{where}")
        if self.target_true is not None and not self.target_true.strip():
            object.__setattr__(self, "target_true", None)
        forms = self.subject_forms
        if isinstance(forms, str) or not all(isinstance(f, str) and f.strip() for f in forms):
            raise InvalidRequestError(f"subject_forms must be non-empty strings{where}")
        object.__setattr__(self, "subject_forms", tuple(forms))

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def with_subject(self, subject: str) -> EditRequest:
        return EditRequest(self.prompt, subject, self.target_new, self.target_true, self.case_id)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (``subject_forms`` as a list, left out when empty)."""
        d = {k: v for k, v in asdict(self).items() if v is not None and v != ()}
        if "subject_forms" in d:
            d["subject_forms"] = list(d["subject_forms"])
        return d

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without ``subject_forms``: what names the fact (matching a stored
        edit's requests against asked ones)."""
        return request_identity(self.to_dict())

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str = "") -> EditRequest:
        """Build from a JSON record; accepts a prompt that contains the subject verbatim."""
        if not isinstance(record, dict):
            raise InvalidRequestError(f"{where}: a request must be an object, not {record!r:.60}")
        try:
            prompt, subject = record["prompt"], record["subject"]
            target_new = record.get("target_new", record.get("target"))
        except KeyError as exc:
            raise InvalidRequestError(f"{where}: missing field {exc}") from None
        if target_new is None:
            raise InvalidRequestError(f"{where}: missing field 'target_new'")
        if not isinstance(subject, str):
            raise InvalidRequestError(f"{where}: subject must be a string, not {subject!r:.60}")
        if isinstance(prompt, str) and SUBJECT_SLOT not in prompt:
            prompt = template_from_prompt(prompt, subject, where)
        return cls(
            prompt=prompt,
            subject=subject,
            target_new=target_new,
            target_true=record.get("target_true", record.get("ground_truth")),
            case_id=None if record.get("case_id") is None else str(record["case_id"]),
            subject_forms=_forms(record.get("subject_forms", ()), where),
        )


def request_identity(record: dict[str, Any]) -> dict[str, Any]:
    """A request record (:meth:`EditRequest.to_dict`) without ``subject_forms``."""
    return {k: v for k, v in record.items() if k != "subject_forms"}


def _forms(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"{where}: subject_forms must be a list of strings")
    return tuple(value)


def _one_slot(template: str) -> bool:
    """True if ``template`` has exactly one replacement field and it is a bare ``{}``."""
    try:
        fields = [(f, s, c) for _, f, s, c in string.Formatter().parse(template) if f is not None]
    except ValueError:  # a lone "{" or "}"
        return False
    return fields == [("", "", None)]


def template_from_prompt(prompt: str, subject: str, where: str = "") -> str:
    """Turn ``"Slovenia is located in"`` + ``"Slovenia"`` into ``"{} is located in"``.

    The first occurrence is the slot (as in CounterFact), also when the subject occurs again
    or overlaps itself (``"aa"`` in ``"aaa"``): editing targets that position's tokens. Braces
    already in the text are escaped so that ``.format`` leaves them alone.
    """
    if not subject or subject not in prompt:
        raise InvalidRequestError(
            f"{where}: subject {subject!r} does not occur in prompt {prompt!r}"
        )
    i = prompt.index(subject)
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return esc(prompt[:i]) + SUBJECT_SLOT + esc(prompt[i + len(subject) :])


@dataclass(frozen=True)
class Neighbour:
    """An unrelated prompt the edit must not change, with the dataset's answer."""

    prompt: str
    target: str


@dataclass
class EditCase:
    """An edit request plus everything needed to probe it.

    ``subject_paraphrases`` are surface forms to substitute for the subject in ``request.prompt``;
    the first ``id_split`` are "in-domain" (REP may train on them), the rest are held out.
    ``prompt_paraphrases`` are complete texts (the subject already inside) that should also
    yield ``target_new`` after the edit.
    """

    request: EditRequest
    prompt_paraphrases: list[str] = field(default_factory=list)
    subject_paraphrases: list[str] = field(default_factory=list)
    neighbourhood: list[Neighbour] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    source: str = ""
    id_split: int = 5

    @property
    def case_id(self) -> str | None:
        return self.request.case_id

    @property
    def id_paraphrases(self) -> list[str]:
        return self.subject_paraphrases[: self.id_split]

    @property
    def ood_paraphrases(self) -> list[str]:
        return self.subject_paraphrases[self.id_split :]

    @property
    def edit_request(self) -> EditRequest:
        """The request to edit with: :attr:`request` carrying the in-domain paraphrases as its
        ``subject_forms`` (what REP may train on too), never a held-out one."""
        forms = tuple(p for p in self.id_paraphrases if p.strip())
        return replace(self.request, subject_forms=forms)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["request"] = self.request.to_dict()
        return d
