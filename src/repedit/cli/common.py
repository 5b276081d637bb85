"""What every command shares: option groups, model loading, consoles, tables, ``--set`` parsing.

Two consoles: ``console`` (stderr) for status lines, warnings and progress, and ``out``
(stdout) for results only, so ``--json`` output can be piped into ``jq`` untouched.
Heavy imports (torch, transformers) happen inside functions, so ``repedit --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from repedit.errors import InvalidRequestError
from repedit.methods import METHOD_NAMES

if TYPE_CHECKING:
    from repedit.editors import StatsConfig
    from repedit.models import LoadedModel

#: status lines, logs, warnings and progress bars
console = Console(stderr=True, highlight=False)
#: results (tables; JSON goes through ``print_json``)
out = Console(highlight=False)

#: table width when stdout is not a terminal (a file or a pipe): wide enough not to wrap
PIPE_WIDTH = 160
#: ``--method`` help: the editor registry's names
METHOD_HELP = f"{' | '.join(METHOD_NAMES)} (default: %(default)s)"


# ----------------------------------------------------------------------------- parsers


def add_command(
    subparsers: Any, name: str, *, help: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    """A sub-command parser with the shared formatting and ``-v/--verbose``."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log details; show tracebacks on errors"
    )
    return parser


def add_hparam_options(parser: argparse.ArgumentParser, *, example: str = "value.lr=0.1") -> None:
    """``--layer``, ``--hparams FILE`` and repeatable ``--set KEY=VALUE`` for an editor."""
    h = parser.add_argument_group("hyper-parameters")
    h.add_argument(
        "--layer",
        help="edited layer (ROME, R-ROME) or layers, e.g. 4,5,6 or 4-8 (MEMIT, EMMET, AlphaEdit)",
    )
    h.add_argument("--hparams", metavar="FILE", help="JSON/YAML mapping of hyper-parameters")
    h.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one hyper-parameter (repeatable), e.g. --set {example}",
    )


def hparam_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--hparams FILE, then --set, then --layer; validated against the method's fields."""
    from repedit.editors import make_editor

    overrides: dict[str, Any] = {}
    if args.hparams:
        values = read_mapping(args.hparams, "hyper-parameters")
        if not isinstance(values, dict):
            raise InvalidRequestError(f"{args.hparams}: expected a mapping of hyper-parameters")
        overrides.update(values)
    overrides.update(parse_overrides(args.overrides))
    if getattr(args, "layer", None) is not None:
        layers = parse_layers(args.layer)
        fields = make_editor(args.method).hparams_class.field_names()
        if "layer" in fields:
            if len(layers) != 1:
                raise InvalidRequestError(
                    f"{args.method} edits one layer; --layer {args.layer} names {len(layers)}"
                )
            overrides["layer"] = layers[0]
        else:
            overrides["layers"] = tuple(layers)
    make_editor(args.method, dict(overrides))  # unknown fields fail here, before loading
    return overrides


REP_HELP = """\
REP (Robust Edit Pathway): after the edit, train a small gated low-rank adapter on the key
path of every edited layer so that paraphrased, scrambled and long-context forms of the subject
retrieve the edit, then score with the adapters attached (through hooks; the weights hold only
the plain edit). Any --rep-* option implies --rep."""


def add_rep_options(parser: argparse.ArgumentParser, *, sweep: bool) -> argparse._ArgumentGroup:
    """``--rep``, ``--rep-config FILE``, ``--rep-set KEY=VALUE``, ``--rep-ablation NAME`` and
    ``--rep-tau`` (a comma-separated sweep with ``sweep``, one value otherwise)."""
    from repedit.rep.ablations import ABLATIONS

    ablations = "\n".join(
        f"  {name:<16} {', '.join(f'{k}={v}' for k, v in fields.items())}"
        for name, fields in ABLATIONS.items()
    )
    g = parser.add_argument_group("REP", f"{REP_HELP}\n\n--rep-ablation NAME:\n{ablations}")
    g.add_argument(
        "--rep", action="store_true", help="train and apply REP adapters (RepConfig defaults)"
    )
    g.add_argument(
        "--rep-config",
        metavar="FILE",
        help="JSON/YAML mapping of RepConfig fields (rank, alpha, steps, lr, tau, use_gate, "
        "consistency_weight, negatives, long_context, shared, ...)",
    )
    g.add_argument(
        "--rep-set",
        dest="rep_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one RepConfig field (repeatable; applied after --rep-config and "
        "--rep-ablation; values are converted to the field's type), e.g. --rep-set steps=20 "
        "--rep-set use_gate=false",
    )
    g.add_argument(
        "--rep-ablation",
        dest="rep_ablations",
        action="append",
        default=[],
        metavar="NAME",
        help="an ablation, applied as the RepConfig fields listed above (repeatable or "
        "comma-separated, e.g. --rep-ablation no-gate,no-norm)",
    )
    if sweep:
        g.add_argument(
            "--rep-tau",
            metavar="TAUS",
            help="hard-gate threshold τ in (0, 1) (default 0.9). Several comma-separated "
            "values (e.g. 0.5,0.7,0.9,0.95) run a τ sweep: REP is trained once per case and "
            "evaluated once per τ, into one run directory per τ, OUT/tau-0.5/, OUT/tau-0.7/, ... "
            "(compare them with: repedit report OUT)",
        )
    else:
        g.add_argument(
            "--rep-tau",
            type=float,
            metavar="TAU",
            help="hard-gate threshold τ in (0, 1) applied at inference (default: the "
            "config's, 0.9)",
        )
    return g


def rep_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """RepConfig overrides from --rep-config, --rep-ablation, --rep-set (in that order), or
    None when no REP option was given. Validated (names and types) before any model loads."""
    from repedit.rep.ablations import ablation_overrides, idle_ablations
    from repedit.rep.adapter import RepConfig

    wanted = (
        args.rep
        or args.rep_config
        or args.rep_overrides
        or args.rep_ablations
        or args.rep_tau is not None
    )
    if not wanted:
        return None
    overrides: dict[str, Any] = {}
    if args.rep_config:
        values = read_mapping(args.rep_config, "REP config")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise InvalidRequestError(f"{args.rep_config}: expected a mapping of RepConfig fields")
        overrides.update(values)
    overrides.update(ablation_overrides(args.rep_ablations))
    overrides.update(parse_overrides(args.rep_overrides, "--rep-set", "steps=20"))
    resolved = RepConfig().replace(**overrides)  # unknown fields / bad values fail here
    for msg in idle_ablations(args.rep_ablations, resolved):
        warnings.warn(f"REP ablation changes nothing: {msg}", stacklevel=2)
    return {k: getattr(resolved, k) for k in sorted(overrides)}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default="smollm2-135m",
        help="alias (smollm2-135m, gemma3-270m), .gguf file, local HF directory or hub id "
        "(default: %(default)s, embedded, works offline)",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if found)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="weights dtype (default: auto = float32 on CPU, bfloat16 on CUDA)",
    )
    g.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's own choice)",
    )


def add_stats_options(
    parser: argparse.ArgumentParser, tokens_flags: Sequence[str] = ("--stats-tokens",)
) -> None:
    g = parser.add_argument_group("key statistics (C = E[kkᵀ], computed once per layer, cached)")
    g.add_argument(
        "--corpus",
        default="auto",
        help="text file or folder, 'wikitext' (hub), 'model' (text sampled from the model) or "
        "'auto' ($REPEDIT_DATA/wikitext, else the hub, else model-sampled; default)",
    )
    g.add_argument(
        *tokens_flags,
        dest="stats_tokens",
        type=positive_int,
        default=100_000,
        metavar="N",
        help="tokens to accumulate (default: %(default)s)",
    )
    g.add_argument(
        "--cache-dir", default=None, help="cache root (default: $REPEDIT_CACHE or ~/.cache/repedit)"
    )
    g.add_argument(
        "--precision",
        choices=("model", "bfloat16"),
        default="model",
        help="'bfloat16' runs the key-statistics forwards (and, in eval, every scoring and "
        "generation forward) under bfloat16 autocast: about 2x faster on CPUs with AVX-512 "
        "BF16/AMX and on CUDA, results then depend on the machine. Part of the statistics "
        "cache key and of a run's identity; the edit's optimisation is unaffected "
        "(default: %(default)s = the weights' dtype)",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (logs stay on stderr)"
    )


def positive_int(text: str) -> int:
    """``type=`` for argparse options that must be > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_layers(text: str) -> list[int]:
    """``"4"``, ``"4,5,6"`` or ``"4-8"`` (inclusive) into a sorted list of layer indices."""
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            if dash:
                layers.update(range(int(lo), int(hi) + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise InvalidRequestError(f"bad layer list {text!r}: use e.g. 4 or 4,5,6 or 4-8") from None
    if not layers:
        raise InvalidRequestError(f"bad layer list {text!r}: no layers given")
    return sorted(layers)


# ----------------------------------------------------------------------------- library calls


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise InvalidRequestError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def load(args: argparse.Namespace) -> LoadedModel:
    """Set threads, then ``repedit.models.load_model`` with the command's model options."""
    set_threads(getattr(args, "threads", None))
    if not getattr(args, "verbose", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    from repedit.models import load_model

    status(f"loading model {args.model}…")
    lm = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cache=getattr(args, "cache_dir", None),
    )
    log(
        f"  {lm.arch.model_type}, {lm.n_layers} layers, d_mlp {lm.arch.d_mlp}, "
        f"{lm.device}, {str(lm.dtype).removeprefix('torch.')}, fingerprint {lm.fingerprint}"
    )
    return lm


def stats_config(args: argparse.Namespace) -> StatsConfig:
    from repedit.editors import StatsConfig

    return StatsConfig(
        corpus=args.corpus,
        n_tokens=args.stats_tokens,
        cache=args.cache_dir,
        progress=True,
        precision=args.precision,
    )


def stats_cached(
    lm: LoadedModel, layers: Sequence[int], cfg: StatsConfig
) -> tuple[str, list[int]] | None:
    """``(corpus identity, layers with a cache file)`` when ``cfg.corpus`` is a local path.

    ``None`` for ``auto``/hub/model corpora: the library resolves those (it may probe the hub
    or fall back to model-sampled text with its own token budget), so the CLI does not guess.
    """
    from repedit.paths import cache_dir
    from repedit.stats import StatsKey, resolve_corpus

    spec = cfg.corpus
    if not isinstance(spec, str) or spec in ("auto", "wikitext", "model") or spec.startswith("hf:"):
        return None
    identity = resolve_corpus(spec, lm).identity
    root = cache_dir(cfg.cache)
    return identity, [
        layer
        for layer in layers
        if StatsKey.of(lm, layer, identity, cfg.n_tokens, cfg.seq_len, cfg.precision)
        .path(root)
        .exists()
    ]


# ----------------------------------------------------------------------------- printing


def status(message: str) -> None:
    """A status line on stderr (before a long step)."""
    console.print(f"[cyan]›[/] {escape(message)}", soft_wrap=True)


def log(message: str) -> None:
    console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)


def error(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def print_json(obj: Any) -> None:
    """Exactly one JSON document on stdout."""
    out.file.write(json.dumps(obj, indent=2, default=str) + "\n")
    out.file.flush()


def print_table(
    rows: Sequence[Sequence[Any]], columns: Sequence[str], title: str | None = None
) -> None:
    """A rich table of results on stdout (``None`` cells print as ``—``)."""
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("—" if cell is None else escape(str(cell)) for cell in row))
    if not out.is_terminal and out.width < PIPE_WIDTH:
        out.width = PIPE_WIDTH  # a file or pipe: no terminal to fit, don't fold paths
    out.print(table)


def fmt_prob(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def fmt_text(text: str, limit: int = 40) -> str:
    """A completion on one line, with its leading space kept visible."""
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return repr(flat)[1:-1] if flat else "∅"


# ----------------------------------------------------------------------------- --set values


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def parse_value(text: str) -> Any:
    """JSON if it parses (``0.1``, ``5``, ``true``, ``[4, 5]``, ``null``), else the string."""
    try:
        return _tupled(json.loads(text))
    except ValueError:
        return text


def parse_overrides(
    items: Sequence[str] | None, flag: str = "--set", example: str = "value.lr=0.1"
) -> dict[str, Any]:
    """``["value.lr=0.1", "layers=[4,5]"]`` → ``{"value.lr": 0.1, "layers": (4, 5)}``."""
    overrides: dict[str, Any] = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise InvalidRequestError(f"{flag} expects key=value (e.g. {example}), got {item!r}")
        overrides[key] = parse_value(value.strip())
    return overrides


def read_mapping(path: str | Path, what: str) -> Any:
    """A JSON or YAML file's content, with errors that name the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's common ground
        raise InvalidRequestError(f"{path}: not valid JSON/YAML ({exc})") from None
    except Exception as exc:  # yaml.YAMLError is not a ValueError
        raise InvalidRequestError(f"{path}: not valid YAML ({exc})") from None


# ----------------------------------------------------------------------------- session


@contextlib.contextmanager
def session(verbose: bool) -> Iterator[None]:
    """Route logging, warnings and rich's global console (progress bars) to stderr.

    Everything is restored on exit, so ``main`` can be called in-process (tests).
    """
    import rich

    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root = logging.getLogger()
    repedit_logger = logging.getLogger("repedit")
    saved_level = repedit_logger.level
    repedit_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    root.addHandler(handler)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    logging.captureWarnings(True)
    saved_console = rich._console  # progress bars use rich's global console (stdout)
    rich._console = console
    try:
        with warnings.catch_warnings():
            if not verbose:
                # third-party deprecation chatter is not for CLI users
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        rich._console = saved_console
        logging.captureWarnings(False)
        warnings_logger.removeHandler(handler)
        warnings_logger.propagate = True
        root.removeHandler(handler)
        repedit_logger.setLevel(saved_level)
