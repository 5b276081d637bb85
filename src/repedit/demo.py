"""The demo's pipeline: plain edits against edits with REP on the probes that break them.

For each built-in fact the edit is made, then probed on its prompt, a held-out subject
paraphrase, a held-out scramble of the subject's tokens and a long-context prompt; REP is
trained on top and the same probes are scored again; the edit is reverted before the next
fact. Every cell is the evaluation's success rule (teacher-forced exact match of the target,
:func:`repedit.evaluation.scoring.score_probes`). Shown by ``repedit demo`` and reused by the
playground server, which builds the same variant probes.

On a machine with no data folder, the key statistics, REP's long-context training passages
and the long-context probe all come from one file of model-sampled text
(:func:`repedit.stats.corpus.sampled_text_file`), sampled once and cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from repedit.data import EditCase, EditRequest
    from repedit.data.variants import PassageSampler
    from repedit.editors import Editor, StatsConfig
    from repedit.models import LoadedModel
    from repedit.rep import RepConfig

ProbeKind = Literal["prompt", "paraphrase", "scramble", "long-context"]
PROBE_KINDS: tuple[ProbeKind, ...] = ("prompt", "paraphrase", "scramble", "long-context")

#: model-sampled tokens when there is no data folder: enough for a full-rank C at the demo's
#: layer (d_mlp 1536 for the embedded model), sampled in one batched decode pass
SAMPLED_TOKENS = 4_096
SAMPLED_DOC_TOKENS = 128
#: 40 documents of 128 tokens: one batched pass, with room for documents that end early
SAMPLED_BATCH = 40
#: long-context probe length in words (REP's default training length is 300 words)
LONG_WORDS = 150

Status = Callable[[str], None]


@dataclass
class TextSources:
    """Where key statistics and long-context passages come from."""

    stats: StatsConfig
    long_context_corpus: str | None  # None: RepConfig's default ($REPEDIT_DATA wikitext)
    note: str

    def rep_config(self) -> RepConfig:
        """REP's RepConfig for these sources. On model-sampled text (no data folder) its
        passages come from that text and it trains without pool negatives, since CounterFact's
        subjects are not there either (``note`` says so)."""
        from repedit.rep import RepConfig

        if self.long_context_corpus is None:
            return RepConfig()
        return RepConfig(long_context_corpus=self.long_context_corpus, pool_negatives=0)


def text_sources(lm: LoadedModel, stats: StatsConfig, status: Status | None = None) -> TextSources:
    """``stats`` unchanged when a data folder or an explicit corpus is there; else one file of
    model-sampled text feeds both the statistics and REP's passages (sampled once, cached)."""
    from dataclasses import replace

    from repedit.data.loaders import passage_corpus
    from repedit.stats.corpus import sampled_text_file

    if passage_corpus()[0] is not None or stats.corpus != "auto":
        return TextSources(stats, None, "")
    if status is not None:
        status(
            f"no data folder: sampling {SAMPLED_TOKENS} tokens of text from the model for the "
            "key statistics and long-context passages (one-off, cached)…"
        )
    path = sampled_text_file(
        lm,
        SAMPLED_TOKENS,
        cache=stats.cache,
        doc_tokens=SAMPLED_DOC_TOKENS,
        batch=SAMPLED_BATCH,
    )
    note = (
        f"no data folder: key statistics, REP's long-context passages and the long-context "
        f"probes use {SAMPLED_TOKENS} tokens of model-sampled text, and REP trains without "
        "pool negatives"
    )
    return TextSources(replace(stats, corpus=str(path), n_tokens=SAMPLED_TOKENS), str(path), note)


def passages(lm: LoadedModel, sources: TextSources) -> PassageSampler | None:
    """The sampler for long-context probes (None when no corpus is found)."""
    from repedit.data.loaders import passage_corpus
    from repedit.data.variants import PassageSampler

    path = passage_corpus(sources.long_context_corpus)[0]
    if path is None:
        return None
    return PassageSampler.from_file(path, length=LONG_WORDS, unit="words", tokenizer=lm.tokenizer)


def held_out_scramble(lm: LoadedModel, request: EditRequest, scramble_max: int = 10) -> str | None:
    """A scramble of the subject REP never trains on (the held-out half of its draw)."""
    from repedit.data.variants import scrambled_subjects, split_half
    from repedit.rep.variants import item_key

    drawn = scrambled_subjects(
        request.subject, lm.tokenizer, n_max=scramble_max, key=item_key(request)
    )
    train, held = split_half(drawn)
    if held:
        return held[0]
    return train[0] if train else None


def variant_probes(
    lm: LoadedModel, case: EditCase, sampler: PassageSampler | None
) -> dict[str, str]:
    """The four probes of one fact (a kind is left out when the fact has no such variant)."""
    from repedit.data.variants import long_context_prompt

    req = case.request
    out: dict[str, str] = {"prompt": req.text}
    held = case.ood_paraphrases or case.subject_paraphrases
    if held:
        out["paraphrase"] = req.with_subject(held[0]).text
    scramble = held_out_scramble(lm, req)
    if scramble is not None:
        out["scramble"] = req.with_subject(scramble).text
    if sampler is not None:
        passage = sampler.passages(f"{case.case_id or req.text}:demo-probe", 1)[0]
        out["long-context"] = long_context_prompt(passage, req.text)
    return out


def exact(lm: LoadedModel, prompts: list[str], target: str) -> list[bool]:
    """The evaluation's success rule for each prompt: teacher-forced exact match of target."""
    from repedit.evaluation.scoring import Probe, score_probes

    return [s.exact for s in score_probes(lm, [Probe(p, target) for p in prompts])]


@dataclass
class FactResult:
    case_id: str
    subject: str
    target_new: str
    probes: dict[str, str]
    plain: dict[str, bool]
    rep: dict[str, bool] | None
    seconds: float
    rep_seconds: float | None = None


@dataclass
class StoryResult:
    method: str
    note: str
    facts: list[FactResult] = field(default_factory=list)

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{"plain": (successes, cells), "rep": (...)}`` over every probe of every fact."""
        out = {}
        for arm in ("plain", "rep"):
            cells = [ok for f in self.facts for ok in (getattr(f, arm) or {}).values()]
            out[arm] = (sum(cells), len(cells))
        return out

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "method": self.method,
            "note": self.note,
            "facts": [asdict(f) for f in self.facts],
            "counts": {k: list(v) for k, v in self.counts().items()},
        }


def edit_fact(
    lm: LoadedModel,
    editor: Editor,
    case: EditCase,
    probes: dict[str, str],
    rep_cfg: RepConfig,
    with_rep: bool = True,
) -> FactResult:
    """Edit, score the probes, train REP and score them again, then revert everything."""
    from repedit.edit_report import ProbeSpec, rep_items
    from repedit.rep import rep_applied, train_rep_after

    req = case.request
    prompts = list(probes.values())
    t0 = time.perf_counter()
    result = editor.edit(lm, req)
    seconds = time.perf_counter() - t0
    try:
        plain = dict(zip(probes, exact(lm, prompts, req.target_new), strict=True))
        rep, rep_seconds = None, None
        if with_rep:
            specs = [ProbeSpec("probe", p, req.target_new, req.target_true) for p in prompts]
            trained = train_rep_after(lm, editor, result, rep_items([req], specs), cfg=rep_cfg)
            rep_seconds = trained.seconds
            with rep_applied(lm, trained.adapters):
                rep = dict(zip(probes, exact(lm, prompts, req.target_new), strict=True))
    finally:
        result.revert(lm)
    return FactResult(
        str(case.case_id),
        req.subject,
        req.target_new,
        dict(probes),
        plain,
        rep,
        seconds,
        rep_seconds,
    )


def run_story(
    lm: LoadedModel,
    editor: Editor,
    facts: list[EditCase],
    sources: TextSources,
    *,
    with_rep: bool = True,
    status: Status | None = None,
) -> StoryResult:
    """Each fact edited on its own (reverted before the next), plain and with REP."""
    sampler = passages(lm, sources)
    story = StoryResult(editor.name, sources.note)
    for i, case in enumerate(facts):
        req = case.request
        if status is not None:
            rep = " and training REP" if with_rep else ""
            status(f"[{i + 1}/{len(facts)}] editing {req.text} → {req.target_new}{rep}…")
        probes = variant_probes(lm, case, sampler)
        story.facts.append(edit_fact(lm, editor, case, probes, sources.rep_config(), with_rep))
    return story


# ----------------------------------------------------------------------------- --no-rep tour

CONTROL = "The capital of France is"
CONTROL_CASE = "france-capital"


def says(completion: str, target: str) -> bool:
    """Does the completion start with ``target`` (case-insensitive, as a whole word)?"""
    text, want = completion.strip().lower(), target.strip().lower()
    return text.startswith(want) and not text[len(want) : len(want) + 1].isalnum()


def first_word(text: str) -> str:
    import re

    words = re.findall(r"\w+", text)
    return words[0].lower() if words else ""


def known_facts(lm: LoadedModel, facts: list[EditCase], new_tokens: int) -> list[dict[str, Any]]:
    """Greedy completion of each fact's prompt, and whether it names the true object."""
    from repedit.evaluation.scoring import greedy_completion

    known = greedy_completion(lm, [c.request.text for c in facts], new_tokens)
    return [
        {
            "case_id": c.case_id,
            "subject": c.request.subject,
            "prompt": c.request.text,
            "target_true": c.request.target_true,
            "completion": comp,
            "correct": says(comp, c.request.target_true or ""),
        }
        for c, comp in zip(facts, known, strict=True)
    ]


def tour_probes(case: EditCase) -> list[str]:
    """Prompt, a subject paraphrase, a neighbouring fact and the France control."""
    req = case.request
    para = req.prompt.format(case.subject_paraphrases[0]) if case.subject_paraphrases else req.text
    neigh = case.neighbourhood[0].prompt if case.neighbourhood else CONTROL
    return [req.text, para, neigh, CONTROL]


def _tour_row(
    case: EditCase, prompts: list[str], before: list[str], after: list[str], p: tuple[float, float]
) -> dict[str, Any]:
    req = case.request

    def kept(i: int) -> dict[str, Any]:
        same = first_word(before[i]) == first_word(after[i])
        return {"prompt": prompts[i], "before": before[i], "after": after[i], "unchanged": same}

    return {
        "case_id": case.case_id,
        "prompt": prompts[0],
        "target_true": req.target_true,
        "target_new": req.target_new,
        "before": before[0],
        "after": after[0],
        "p_new_before": p[0],
        "p_new_after": p[1],
        "took_effect": says(after[0], req.target_new),
        "paraphrase": {
            "prompt": prompts[1],
            "after": after[1],
            "took_effect": says(after[1], req.target_new),
        },
        "neighbour": kept(2),
        "control": kept(3),
    }


def tour_edits(
    lm: LoadedModel,
    editor: Editor,
    cases: list[EditCase],
    new_tokens: int,
    status: Status | None = None,
) -> list[dict[str, Any]]:
    """Each case edited alone (reverted before the next): greedy completions of its tour
    probes before and after, and P(new object) on its prompt."""
    from repedit.evaluation.scoring import Probe, greedy_completion, score_probes

    probes_of = [tour_probes(c) for c in cases]
    before_all = greedy_completion(lm, [p for ps in probes_of for p in ps], new_tokens)
    before_p = score_probes(lm, [Probe(c.request.text, c.request.target_new) for c in cases])
    rows = []
    for i, (case, prompts) in enumerate(zip(cases, probes_of, strict=True)):
        req = case.request
        if status is not None:
            status(f"[{i + 1}/{len(cases)}] {req.text} → {req.target_new} (was {req.target_true})")
        t0 = time.perf_counter()
        result = editor.edit(lm, req)
        seconds = time.perf_counter() - t0
        try:
            after = greedy_completion(lm, prompts, new_tokens)
            p_after = score_probes(lm, [Probe(req.text, req.target_new)])[0].prob
        finally:
            result.revert(lm)
        before = before_all[4 * i : 4 * i + 4]
        row = _tour_row(case, prompts, before, after, (before_p[i].prob, p_after))
        rows.append({**row, "layers": result.layers, "seconds": seconds})
    return rows


def tour_summary(edits: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(edits)
    return {
        "edits": n,
        "took_effect": sum(e["took_effect"] for e in edits),
        "paraphrases": sum(e["paraphrase"]["took_effect"] for e in edits),
        "neighbours_unchanged": sum(e["neighbour"]["unchanged"] for e in edits),
        "control_unchanged": sum(e["control"]["unchanged"] for e in edits),
        "seconds_per_edit": sum(e["seconds"] for e in edits) / n if n else None,
    }
