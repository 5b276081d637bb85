"""``repedit demo``: what the model knows about the built-in facts, then a few edits, each
undone before the next, with before/after completions and a one-line summary."""

from __future__ import annotations

import argparse
import re
import time
from typing import TYPE_CHECKING, Any

from repedit.cli import common
from repedit.errors import InvalidRequestError

if TYPE_CHECKING:
    from repedit.data import EditCase

DESCRIPTION = """\
A tour that needs no data: greedy completions of the built-in facts (does the model know
them?), then --n of them edited one at a time (edit, probe, revert). For each edit: the prompt
before and after, P(new object), a subject paraphrase (should change too), a neighbouring fact
and "The capital of France is" (both should not change).

examples:
  repedit demo
  repedit demo --method r-rome --n 3
  repedit demo --facts slovenia-continent,toyota-country --json
"""

CONTROL = "The capital of France is"
CONTROL_CASE = "france-capital"


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "demo",
        help="edit built-in facts in the embedded model and show before/after",
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
            f"unknown built-in fact(s) {unknown or spec!r}; known: {', '.join(by_id)}"
        )
    return [by_id[w] for w in wanted]


def says(completion: str, target: str) -> bool:
    """Does the completion start with ``target`` (case-insensitive, as a whole word)?"""
    text, want = completion.strip().lower(), target.strip().lower()
    return text.startswith(want) and not text[len(want) : len(want) + 1].isalnum()


def first_word(text: str) -> str:
    words = re.findall(r"\w+", text)
    return words[0].lower() if words else ""


def _short(text: str) -> str:
    return common.fmt_text(text.strip(), 30).strip("'")


def run(args: argparse.Namespace) -> int:
    from repedit.cli.edit import edit_status
    from repedit.editors import make_editor
    from repedit.evaluation.scoring import Probe, greedy_completion, score_probes

    if args.n < 0:
        raise InvalidRequestError(f"--n must be >= 0, got {args.n}")
    facts = select_facts(args.facts)
    editor = make_editor(args.method, None, common.stats_config(args))
    lm = common.load(args)
    k = args.new_tokens

    # 1. what the model knows
    common.status(f"greedy completions of {len(facts)} built-in facts…")
    known = greedy_completion(lm, [c.request.text for c in facts], k)
    fact_rows = [
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
    if not args.json:
        common.print_table(
            [
                [
                    r["subject"],
                    r["prompt"],
                    r["target_true"],
                    _short(r["completion"]),
                    "✓" if r["correct"] else "✗",
                ]
                for r in fact_rows
            ],
            ["subject", "prompt", "true object", "model says", ""],
            title=f"what {args.model} knows ({sum(r['correct'] for r in fact_rows)}"
            f"/{len(fact_rows)} correct)",
        )

    # 2. edits, one at a time
    chosen = [c for c in facts if c.case_id != CONTROL_CASE][: args.n]
    edits: list[dict[str, Any]] = []
    if chosen:
        probes_of = {
            c.case_id: [
                c.request.text,
                c.request.prompt.format(c.subject_paraphrases[0])
                if c.subject_paraphrases
                else c.request.text,
                c.neighbourhood[0].prompt if c.neighbourhood else CONTROL,
                CONTROL,
            ]
            for c in chosen
        }
        common.status(f"probing {len(chosen)} facts before editing…")
        flat = [p for c in chosen for p in probes_of[c.case_id]]
        before_all = greedy_completion(lm, flat, k)
        before_p = score_probes(lm, [Probe(c.request.text, c.request.target_new) for c in chosen])
        edit_status(lm, editor)
        for i, case in enumerate(chosen):
            req = case.request
            common.status(
                f"[{i + 1}/{len(chosen)}] {req.text} → {req.target_new} (was {req.target_true})"
            )
            t0 = time.perf_counter()
            result = editor.edit(lm, req)
            seconds = time.perf_counter() - t0
            try:
                after = greedy_completion(lm, probes_of[case.case_id], k)
                p_after = score_probes(lm, [Probe(req.text, req.target_new)])[0].prob
            finally:
                result.revert(lm)
            before = before_all[4 * i : 4 * i + 4]
            prompt, para, neigh, control = probes_of[case.case_id]
            edits.append(
                {
                    "case_id": case.case_id,
                    "prompt": prompt,
                    "target_true": req.target_true,
                    "target_new": req.target_new,
                    "before": before[0],
                    "after": after[0],
                    "p_new_before": before_p[i].prob,
                    "p_new_after": p_after,
                    "took_effect": says(after[0], req.target_new),
                    "paraphrase": {
                        "prompt": para,
                        "after": after[1],
                        "took_effect": says(after[1], req.target_new),
                    },
                    "neighbour": {
                        "prompt": neigh,
                        "before": before[2],
                        "after": after[2],
                        "unchanged": first_word(before[2]) == first_word(after[2]),
                    },
                    "control": {
                        "prompt": control,
                        "before": before[3],
                        "after": after[3],
                        "unchanged": first_word(before[3]) == first_word(after[3]),
                    },
                    "layers": result.layers,
                    "seconds": seconds,
                }
            )

    n = len(edits)
    summary = {
        "edits": n,
        "took_effect": sum(e["took_effect"] for e in edits),
        "paraphrases": sum(e["paraphrase"]["took_effect"] for e in edits),
        "neighbours_unchanged": sum(e["neighbour"]["unchanged"] for e in edits),
        "control_unchanged": sum(e["control"]["unchanged"] for e in edits),
        "seconds_per_edit": sum(e["seconds"] for e in edits) / n if n else None,
    }
    if args.json:
        common.print_json(
            {
                "model": args.model,
                "fingerprint": lm.fingerprint,
                "method": editor.name,
                "facts": fact_rows,
                "edits": edits,
                "summary": summary,
            }
        )
        return 0
    if not edits:
        return 0

    def mark(ok: bool) -> str:
        return "✓" if ok else "✗"

    common.print_table(
        [
            [
                e["prompt"],
                _short(e["before"]),
                f"{_short(e['after'])} {mark(e['took_effect'])}",
                e["target_new"],
                f"{common.fmt_prob(e['p_new_before'])} → {common.fmt_prob(e['p_new_after'])}",
                f"{e['paraphrase']['prompt']}\n→ {_short(e['paraphrase']['after'])} "
                f"{mark(e['paraphrase']['took_effect'])}",
                f"{e['neighbour']['prompt']}\n→ {_short(e['neighbour']['after'])} "
                f"{'(unchanged)' if e['neighbour']['unchanged'] else '(CHANGED)'}",
                f"{_short(e['control']['after'])} "
                f"{'(unchanged)' if e['control']['unchanged'] else '(CHANGED)'}",
            ]
            for e in edits
        ],
        [
            "prompt",
            "before",
            "after",
            "target",
            "P(new)",
            "subject paraphrase (after)",
            "neighbour (after)",
            f"{CONTROL} (after)",
        ],
        title=f"{editor.name.upper()} edits, one at a time (each reverted before the next)",
    )
    common.out.print(
        f"[bold]{summary['took_effect']}/{n}[/] edits took effect, "
        f"{summary['paraphrases']}/{n} carried over to a subject paraphrase, "
        f"{summary['neighbours_unchanged']}/{n} neighbours and "
        f"{summary['control_unchanged']}/{n} France controls unchanged; "
        f"{summary['seconds_per_edit']:.1f} s per edit (the first includes one-off setup)"
    )
    return 0
