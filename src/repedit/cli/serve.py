"""``repedit serve``: the playground page and its JSON API (``pip install 'repedit[serve]'``)."""

from __future__ import annotations

import argparse
from typing import Any

from repedit.cli import common
from repedit.errors import InvalidRequestError

DESCRIPTION = """\
Serve a page where you make an edit (built-in fact, a dataset case or your own), watch it
being made, compare greedy completions and P(new)/P(true) before and after (with and without
REP) on paraphrases, scrambles, a long context, neighbours and your own prompts, see REP's
gate over every token, revert, and download the edit, the adapters or the edited model.

Single-user by design: one model, one current edit; every open tab shows the same state.
Binds 127.0.0.1 unless --host says otherwise. The same server answers a JSON API:
POST /api/edit (repedit edit's options as fields; returns what `repedit edit --json`
prints), POST /api/probe, POST /api/revert (see docs/playground.md).

examples:
  repedit serve
  repedit serve --port 9000 --data counterfact --n 50
"""


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "serve",
        help="a playground page (and JSON API) for making and probing edits",
        description=DESCRIPTION,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=common.positive_int, default=8765, help="default: %(default)s")
    p.add_argument("--data", help="also offer the cases of this dataset (name or JSON file)")
    p.add_argument("--n", type=common.positive_int, default=100, help="dataset cases offered")
    common.add_model_options(p)
    common.add_stats_options(p)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from repedit.serve.app import create_app
    except ImportError as exc:
        raise InvalidRequestError(
            f"repedit serve needs its extra ({exc.name} is missing): pip install 'repedit[serve]'"
        ) from None
    from repedit.data import builtin_facts, load_cases
    from repedit.demo import text_sources
    from repedit.serve.session import Playground

    cases = builtin_facts()
    if args.data:
        cases += load_cases(args.data, n=args.n).cases
    lm = common.load(args)
    sources = text_sources(lm, common.stats_config(args), common.status)
    pg = Playground(lm, args.model, sources, cases)
    common.status(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)")
    uvicorn.run(create_app(pg), host=args.host, port=args.port, log_level="warning")
    return 0
