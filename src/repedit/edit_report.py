"""What ``repedit edit --json`` reports about one edit: its probes and the report object.

The command line and the playground server (``POST /api/edit``) both build their answer here,
so a script gets the same object from either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from repedit.data import EditRequest
    from repedit.models import LoadedModel

GENERIC_PREFIXES = ("Here is a fact: ", "As everyone knows, ")


def _as_sentence_start(text: str) -> str:
    first, _, rest = text.partition(" ")
    return f"{first.lower()} {rest}" if first in ("The", "A", "An") and rest else text


def rephrasings(request: EditRequest) -> list[str]:
    """Two rephrasings: the built-in fact's paraphrases when the subject is a built-in one."""
    from repedit.data import builtin_facts

    same = [c for c in builtin_facts() if c.request.subject.lower() == request.subject.lower()]
    same.sort(key=lambda c: c.request.prompt != request.prompt)  # same relation first
    if same:
        case = same[0]
        forms = list(case.prompt_paraphrases) if case.request.prompt == request.prompt else []
        forms += [request.prompt.format(s) for s in case.subject_paraphrases]
        forms = [f for f in dict.fromkeys(forms) if f != request.text]
        if len(forms) >= 2:
            return forms[:2]
    return [prefix + _as_sentence_start(request.text) for prefix in GENERIC_PREFIXES]


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # prompt | rephrase | probe
    prompt: str
    target_new: str
    target_true: str | None


def probe_specs(requests: list[EditRequest], extra: list[str]) -> list[ProbeSpec]:
    """Each request's prompt and two rephrasings, then ``extra`` (scored as the first one)."""
    specs = []
    for req in requests:
        specs.append(ProbeSpec("prompt", req.text, req.target_new, req.target_true))
        specs += [
            ProbeSpec("rephrase", text, req.target_new, req.target_true)
            for text in rephrasings(req)
        ]
    first = requests[0]
    specs += [ProbeSpec("probe", text, first.target_new, first.target_true) for text in extra]
    return specs


def measure(lm: LoadedModel, specs: list[ProbeSpec], new_tokens: int) -> list[dict[str, Any]]:
    """Greedy completion, P(target_new) and P(target_true) (whole targets) per probe."""
    from repedit.evaluation.scoring import Probe, greedy_completion, score_probes

    completions = greedy_completion(lm, [s.prompt for s in specs], new_tokens)
    scores = score_probes(lm, [Probe(s.prompt, s.target_new, alt=s.target_true) for s in specs])
    rows = []
    for completion, score in zip(completions, scores, strict=True):
        p_true = None if score.alt_logprob is None else math.exp(score.alt_logprob)
        rows.append({"top1": completion, "p_new": math.exp(score.logprob), "p_true": p_true})
    return rows


def rep_items(requests: list[EditRequest], specs: list[ProbeSpec]) -> list[Any]:
    """What REP trains on per request: a built-in subject's in-domain paraphrases (those not
    shown as a probe), else none (REP then trains on scrambles, contexts and passages)."""
    from repedit.data import builtin_facts
    from repedit.rep.variants import RepItem, item_key

    probed = {s.prompt for s in specs}
    facts = builtin_facts()
    items = []
    for req in requests:
        same = [c for c in facts if c.request.subject.lower() == req.subject.lower()]
        paraphrases = [
            p
            for p in (same[0].id_paraphrases if same else [])
            if req.with_subject(p).text not in probed
        ]
        items.append(RepItem(req, paraphrases, [], item_key(req)))
    return items


def edit_report(
    *,
    method: str,
    model: str,
    lm: LoadedModel,
    seconds: float,
    layers: list[int],
    requests: list[EditRequest],
    specs: list[ProbeSpec],
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    after_rep: list[dict[str, Any]] | None = None,
    loaded: str | None = None,
    saved: str | None = None,
    exported: str | None = None,
    rep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The object ``repedit edit --json`` prints (and ``POST /api/edit`` returns)."""
    probes = [
        {
            "prompt": s.prompt,
            "kind": s.kind,
            "target_new": s.target_new,
            "target_true": s.target_true,
            "before": b,
            "after": a,
        }
        for s, b, a in zip(specs, before, after, strict=True)
    ]
    if after_rep is not None:
        for p, ar in zip(probes, after_rep, strict=True):
            p["after_rep"] = ar
    return {
        "method": method,
        "model": model,
        "fingerprint": lm.fingerprint,
        "seconds": seconds,
        "layers": layers,
        "requests": [r.to_dict() for r in requests],
        "loaded": loaded,
        "probes": probes,
        "saved": saved,
        "exported": exported,
        "rep": rep,
    }
