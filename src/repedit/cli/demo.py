"""``repedit demo``: what the model knows about the built-in facts, then each edited on its
own, plain and with REP, on its prompt, a paraphrase, a scramble and a long context (the
pipeline is :mod:`repedit.demo`; this module parses and prints)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from repedit.cli import common
from repedit.demo import CONTROL, CONTROL_CASE, PROBE_KINDS
from repedit.errors import InvalidRequestError

if TYPE_CHECKING:
    from repedit.data import EditCase
    from repedit.demo import StoryResult
    from repedit.models import LoadedModel

DESCRIPTION = """\
A tour that needs no data: greedy completions of the built-in facts (does the model know
them?), then --n of them edited one at a time (edit, probe, revert). Each edit is scored on
its prompt, a held-out subject paraphrase, a held-out scramble of the subject's tokens and a
long-context prompt, first plain, then with REP adapters trained on top: ✓ when the model
gives the new object by the evaluation's rule (teacher-forced exact match of the target).
--no-rep shows the plain edits' completions instead, with a neighbouring fact and
"The capital of France is" (both should not change).

Without a data folder ($REPEDIT_DATA), the key statistics, REP's long-context passages and
the long-context probes come from text sampled from the model (one-off, cached).

examples:
  repedit demo
  repedit demo --no-rep --method r-rome --n 3
  repedit demo --facts slovenia-continent,toyota-country --json
"""


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "demo",
        help="edit built-in facts in the embedded model: plain edits against REP",
        description=DESCRIPTION,
    )
    p.add_argument("--method", default="rome", help="editing method (default: %(default)s)")
    p.add_argument(
        "--n", type=int, default=5, help="how many facts to edit, one at a time (default: 5)"
    )
    p.add_argument(
        "--facts",
        default="all",
        help="'all' or a comma-separated list of built-in case ids (default: all)",
    )
    p.add_argument(
        "--no-rep",
        action="store_true",
        help="plain edits only: completions, a neighbour and a control (the short tour)",
    )
    p.add_argument(
        "--new-tokens", type=common.positive_int, default=5, help="greedy completion length"
    )
    common.add_model_options(p)
    common.add_stats_options(p)
    common.add_json_option(p)


def select_facts(spec: str) -> list[EditCase]:
    from repedit.data import builtin_facts

    facts = builtin_facts()
    if spec.strip() == "all":
        return facts
    by_id = {c.case_id: c for c in facts}
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in by_id]
    if unknown or not wanted:
        raise InvalidRequestError(
            f"unknown built-in fact(s) {unknown or spec!r}; known: {', '.join(map(str, by_id))}"
        )
    return [by_id[w] for w in wanted]


def _short(text: str) -> str:
    return common.fmt_text(text.strip(), 30).strip("'")


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else ("✓" if ok else "✗")


def print_known(rows: list[dict[str, Any]], model: str) -> None:
    common.print_table(
        [
            [
                r["subject"],
                r["prompt"],
                r["target_true"],
                _short(r["completion"]),
                _mark(r["correct"]),
            ]
            for r in rows
        ],
        ["subject", "prompt", "true object", "model says", ""],
        title=f"what {model} knows ({sum(r['correct'] for r in rows)}/{len(rows)} correct)",
    )


def print_tour(edits: list[dict[str, Any]], summary: dict[str, Any], method: str) -> None:
    def kept(e: dict[str, Any], what: str) -> str:
        return "(unchanged)" if e[what]["unchanged"] else "(CHANGED)"

    rows = [
        [
            e["prompt"],
            _short(e["before"]),
            f"{_short(e['after'])} {_mark(e['took_effect'])}",
            e["target_new"],
            f"{common.fmt_prob(e['p_new_before'])} → {common.fmt_prob(e['p_new_after'])}",
            f"{e['paraphrase']['prompt']}\n→ {_short(e['paraphrase']['after'])} "
            f"{_mark(e['paraphrase']['took_effect'])}",
            f"{e['neighbour']['prompt']}\n→ {_short(e['neighbour']['after'])} "
            f"{kept(e, 'neighbour')}",
            f"{_short(e['control']['after'])} {kept(e, 'control')}",
        ]
        for e in edits
    ]
    heads = ["prompt", "before", "after", "target", "P(new)", "subject paraphrase (after)"]
    heads += ["neighbour (after)", f"{CONTROL} (after)"]
    common.print_table(
        rows, heads, title=f"{method.upper()} edits, one at a time (each reverted before the next)"
    )
    n = summary["edits"]
    common.out.print(
        f"[bold]{summary['took_effect']}/{n}[/] edits took effect, "
        f"{summary['paraphrases']}/{n} carried over to a subject paraphrase, "
        f"{summary['neighbours_unchanged']}/{n} neighbours and "
        f"{summary['control_unchanged']}/{n} France controls unchanged; "
        f"{summary['seconds_per_edit']:.1f} s per edit (the first includes one-off setup)"
    )


def print_story(story: StoryResult) -> None:
    rows = []
    for f in story.facts:
        cells = [f"{_mark(f.plain.get(k))} / {_mark((f.rep or {}).get(k))}" for k in PROBE_KINDS]
        rows.append([f"{f.subject} → {f.target_new}", *cells])
    common.print_table(
        rows,
        ["edit", *[f"{k}\nplain / REP" for k in PROBE_KINDS]],
        title=f"{story.method.upper()} alone vs with REP (✓ = exact match of the new object)",
    )
    (plain, n), (rep, n_rep) = story.counts()["plain"], story.counts()["rep"]
    common.out.print(
        f"[bold]plain edit {plain}/{n}[/] probes, [bold]with REP {rep}/{n_rep}[/] "
        "(prompt, held-out paraphrase, held-out scramble, long context; each edit reverted "
        "before the next)"
    )
    if story.note:
        common.out.print(f"[dim]{story.note}[/]")


def _edits(
    args: argparse.Namespace, lm: LoadedModel, cases: list[EditCase]
) -> tuple[str, dict[str, Any]]:
    """Run the chosen pipeline; ``(method, JSON part)``, printing tables unless --json."""
    from dataclasses import replace

    from repedit import demo
    from repedit.editors import make_editor

    sources = demo.text_sources(lm, common.stats_config(args), common.status)
    editor = make_editor(args.method, None, replace(sources.stats, progress=not args.json))
    if args.no_rep:
        edits = demo.tour_edits(lm, editor, cases, args.new_tokens, common.status)
        summary = demo.tour_summary(edits)
        if not args.json and edits:
            print_tour(edits, summary, editor.name)
        return editor.name, {"edits": edits, "summary": summary, "note": sources.note}
    story = demo.run_story(lm, editor, cases, sources, status=common.status)
    if not args.json and cases:
        print_story(story)
    return editor.name, {"story": story.to_dict(), "note": sources.note}


def run(args: argparse.Namespace) -> int:
    from repedit.demo import known_facts

    if args.n < 0:
        raise InvalidRequestError(f"--n must be >= 0, got {args.n}")
    facts = select_facts(args.facts)
    lm = common.load(args)
    common.status(f"greedy completions of {len(facts)} built-in facts…")
    known = known_facts(lm, facts, args.new_tokens)
    if not args.json:
        print_known(known, args.model)
    chosen = [c for c in facts if c.case_id != CONTROL_CASE][: args.n]
    method, part = _edits(args, lm, chosen)
    if args.json:
        head = {"model": args.model, "fingerprint": lm.fingerprint, "method": method}
        common.print_json({**head, "facts": known, **part})
    return 0
