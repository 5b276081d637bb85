"""``repedit stats``: compute (or find cached) key statistics ``C = E[kkᵀ]`` for some layers."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from repedit.cli import common

if TYPE_CHECKING:
    from repedit.models import LoadedModel
    from repedit.stats.corpus import Corpus

DESCRIPTION = """\
Compute the second moment C = E[kkᵀ] of the MLP keys at some layers (the matrix every editor
solves against), or report that it is already cached. Files are keyed by model fingerprint,
layer, corpus, token count and window length, so a second run is a cache hit.

examples:
  repedit stats --layers 5 --corpus $REPEDIT_DATA/wikitext/wiki.test.raw --tokens 20000
  repedit stats --layers 4-8 --tokens 100000 --json
"""


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "stats",
        help="compute or look up cached key statistics for some layers",
        description=DESCRIPTION,
    )
    p.add_argument("--layers", required=True, help="layers, e.g. 5 or 4,5,6 or 4-8 (0-based)")
    common.add_model_options(p)
    common.add_stats_options(p, tokens_flags=("--tokens", "--stats-tokens"))
    p.add_argument("--seq-len", type=common.positive_int, default=256, help="window length")
    p.add_argument(
        "--batch-tokens", type=common.positive_int, default=4096, help="tokens per forward pass"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--cond", action="store_true", help="also print each C's condition number")
    common.add_json_option(p)


def run(args: argparse.Namespace) -> int:
    from repedit.stats import resolve_corpus

    layers = common.parse_layers(args.layers)
    lm = common.load(args)
    for layer in layers:
        lm.arch.check_layer(layer)
    corpus = resolve_corpus(args.corpus, lm)
    rows = layer_rows(args, lm, layers, corpus)
    if args.json:
        common.print_json(
            {
                "model": args.model,
                "fingerprint": lm.fingerprint,
                "corpus": corpus.identity,
                "seq_len": args.seq_len,
                "layers": rows,
            }
        )
        return 0
    print_rows(rows, cond=args.cond, title=f"key statistics · {args.model} · {corpus.identity}")
    return 0


def layer_rows(
    args: argparse.Namespace, lm: LoadedModel, layers: list[int], corpus: Corpus
) -> list[dict[str, Any]]:
    """Compute (or find cached) ``C`` for ``layers``; one output row per layer: token count,
    cache hit or computed, speed, seconds, cache file and (``--cond``) condition number."""
    from repedit.paths import cache_dir
    from repedit.stats import StatsKey, second_moments

    root = cache_dir(args.cache_dir)
    paths = {
        layer: StatsKey.of(
            lm, layer, corpus.identity, args.stats_tokens, args.seq_len, args.precision
        ).path(root)
        for layer in layers
    }
    todo = [layer for layer in layers if args.no_cache or not paths[layer].exists()]
    if todo:
        common.status(
            f"computing key statistics for layer{'s' if len(todo) > 1 else ''} "
            f"{', '.join(map(str, todo))} from {corpus.identity} ({args.stats_tokens} tokens"
            f"{'' if args.no_cache else ', one-off, cached'})…"
        )
    report: dict[str, Any] = {}
    moments = second_moments(
        lm,
        layers,
        corpus,
        args.stats_tokens,
        seq_len=args.seq_len,
        batch_tokens=args.batch_tokens,
        cache=args.cache_dir,
        use_cache=not args.no_cache,
        progress=not args.json,
        precision=args.precision,
        report=report,
    )
    cached = set(report.get("cached_layers", []))
    rows = []
    for layer, moment in moments.items():
        hit = layer in cached
        row: dict[str, Any] = {
            "layer": layer,
            "tokens": moment.n_tokens,
            "cache": "hit" if hit else "computed",
            "tokens_per_s": None if hit else report.get("tokens_per_s"),
            "seconds": None if hit else report.get("seconds"),
            "path": None if args.no_cache else str(paths[layer]),
        }
        if hit:
            row["computed_tokens_per_s"] = moment.meta.get("tokens_per_s")
        if args.cond:
            row["condition_number"] = moment.condition_number()
        rows.append(row)
    return rows


def print_rows(rows: list[dict[str, Any]], *, cond: bool, title: str) -> None:
    """The rows of :func:`layer_rows` as a table."""
    columns = ["layer", "tokens", "cache", "tokens/s", "seconds"]
    if cond:
        columns.append("cond(C)")
    columns.append("file")
    table = []
    for r in rows:
        rate = r["tokens_per_s"]
        if rate is not None:
            rate_text = f"{rate:,.0f}"
        elif r.get("computed_tokens_per_s"):
            rate_text = f"(was {r['computed_tokens_per_s']:,.0f})"
        else:
            rate_text = None
        line = [
            r["layer"],
            r["tokens"],
            "hit" if r["cache"] == "hit" else "computed",
            rate_text,
            None if r["seconds"] is None else f"{r['seconds']:.1f}",
        ]
        if cond:
            line.append(f"{r['condition_number']:.3g}")
        line.append(r["path"] or "(not cached: --no-cache)")
        table.append(line)
    common.print_table(table, columns, title=title)
