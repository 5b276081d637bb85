"""The server's input limits and the checked form of an edit or probe request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from repedit.errors import InvalidRequestError

MAX_TEXT = 400  # characters of a typed prompt, subject or target
MAX_PROBES = 12  # typed probes per request
MAX_NEW_TOKENS = 20  # greedy completion length
METHODS = ("rome", "r-rome", "memit", "emmet", "alphaedit")


def _text(body: dict[str, Any], name: str, *, required: bool, limit: int = MAX_TEXT) -> str | None:
    value = body.get(name)
    if value is None or (value == "" and not required):
        if required:
            raise InvalidRequestError(f"'{name}' is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"'{name}' must be a non-empty string")
    if len(value) > limit:
        raise InvalidRequestError(f"'{name}' is longer than {limit} characters")
    return value


def _prompts(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise InvalidRequestError(f"'{name}' must be a list of strings")
    value = [p for p in value if p.strip()]
    if len(value) > MAX_PROBES:
        raise InvalidRequestError(f"at most {MAX_PROBES} prompts in '{name}'")
    for p in value:
        if len(p) > MAX_TEXT:
            raise InvalidRequestError(f"a prompt in '{name}' is longer than {MAX_TEXT} characters")
    return value


def _new_tokens(body: dict[str, Any]) -> int:
    n = body.get("new_tokens", 5)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
        raise InvalidRequestError(f"'new_tokens' must be an integer from 1 to {MAX_NEW_TOKENS}")
    return n


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


@dataclass(frozen=True)
class EditParams:
    """``POST /api/edit``: ``repedit edit``'s options as JSON fields."""

    subject: str
    prompt: str
    target: str
    target_true: str | None = None
    method: str = "rome"
    layer: int | None = None
    probe: list[str] = field(default_factory=list)
    rep: bool = False
    new_tokens: int = 5
    #: add the page's probes: generated scrambles, a long-context prompt, the case's
    #: paraphrases and neighbours (``case`` names a built-in or dataset case for the last two)
    variants: bool = False
    case: str | None = None

    @classmethod
    def parse(cls, body: Any) -> EditParams:
        body = _object(body)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(body) - known)
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {unknown}; known: {sorted(known)}")
        method = body.get("method", "rome")
        if method not in METHODS:
            raise InvalidRequestError(f"'method' must be one of {list(METHODS)}")
        layer = body.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise InvalidRequestError("'layer' must be an integer or null")
        for flag in ("rep", "variants"):
            if not isinstance(body.get(flag, False), bool):
                raise InvalidRequestError(f"'{flag}' must be true or false")
        subject = _text(body, "subject", required=True)
        prompt = _text(body, "prompt", required=True)
        assert subject is not None and prompt is not None
        if "{}" not in prompt and subject not in prompt:
            raise InvalidRequestError("'prompt' must contain {} where the subject goes")
        return cls(
            subject=subject,
            prompt=prompt,
            target=_text(body, "target", required=True) or "",
            target_true=_text(body, "target_true", required=False),
            method=method,
            layer=layer,
            probe=_prompts(body, "probe"),
            rep=bool(body.get("rep", False)),
            new_tokens=_new_tokens(body),
            variants=bool(body.get("variants", False)),
            case=_text(body, "case", required=False, limit=200),
        )


@dataclass(frozen=True)
class ProbeParams:
    """``POST /api/probe``: prompts scored on the current model (targets: the edit's)."""

    prompts: list[str]
    target: str | None = None
    target_true: str | None = None
    new_tokens: int = 5

    @classmethod
    def parse(cls, body: Any) -> ProbeParams:
        body = _object(body)
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {unknown}")
        prompts = _prompts(body, "prompts")
        if not prompts:
            raise InvalidRequestError("'prompts' must hold at least one prompt")
        return cls(
            prompts,
            _text(body, "target", required=False),
            _text(body, "target_true", required=False),
            _new_tokens(body),
        )
