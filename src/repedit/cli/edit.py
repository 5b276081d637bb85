"""``repedit edit``: write one fact (or a file of facts) into a model and show before / after."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from repedit.cli import common
from repedit.edit_report import ProbeSpec as ProbeSpec  # re-exported for callers of this module
from repedit.edit_report import edit_report, measure, probe_specs, rep_items
from repedit.edit_report import rephrasings as rephrasings
from repedit.errors import InvalidRequestError

if TYPE_CHECKING:
    from repedit.data import EditRequest
    from repedit.editors import Editor, EditResult
    from repedit.models import LoadedModel

DESCRIPTION = """\
Edit a model so that PROMPT (with SUBJECT in its {} slot) is completed by TARGET, then print,
before and after the edit, the greedy completion and P(target) for the prompt, two rephrasings
and every --probe. Edits can be saved (safetensors, refused by any other base model), loaded
back, or exported as a full Hugging Face model directory.

examples:
  repedit edit --subject Slovenia --prompt "{} is located in the continent of" \\
      --target Antarctica --target-true Europe --probe "Ljubljana is the capital of"
  repedit edit --method memit --requests facts.json --set value.lr=0.1 --save edit.safetensors
  repedit edit --load edit.safetensors --probe "Slovenia is a country in"

--requests FILE: a JSON list of {"prompt", "subject", "target_new", "target_true"?}; a prompt
without {} must contain the subject verbatim.

REP: --rep (or any --rep-* option) trains REP adapters on the request after the edit (on its
scrambled subjects, the editor's context templates, long-context passages and, for a built-in
subject, its in-domain paraphrases other than those probed) and adds an "after+REP" column; with
--json each probe gets "after_rep" and the output a "rep" entry (seconds, gate open rates).
Long-context passages come from RepConfig.long_context_corpus, else
$REPEDIT_DATA/wikitext/wiki.test.raw, else the --corpus file. --rep-save writes the adapters,
--rep-load applies saved ones instead of training (refused by another base model). Adapters act
through hooks and cannot be baked into weights: with REP, --export DIR writes the edited weights
plus DIR/rep_adapters.safetensors and DIR/load_with_rep.py, a loader that needs no repedit
(import load_with_rep; model, tokenizer = load_with_rep.load("DIR")).

  repedit edit --subject Slovenia --prompt "{} is located in the continent of" \\
      --target Antarctica --rep --rep-set steps=20 --save e.safetensors --rep-save e.rep.safetensors
  repedit edit --load e.safetensors --rep-load e.rep.safetensors --rep-tau 0.7
"""


def register(subparsers: Any) -> None:
    p = common.add_command(
        subparsers,
        "edit",
        help="edit a fact into a model; print before/after; save, load or export the edit",
        description=DESCRIPTION,
    )
    g = p.add_argument_group("the edit")
    g.add_argument("--method", default="rome", help=common.METHOD_HELP)
    g.add_argument("--subject", help="the subject, e.g. Slovenia")
    g.add_argument("--prompt", help='template with {} for the subject, e.g. "{} is located in"')
    g.add_argument("--target", dest="target_new", help="the new object, e.g. Antarctica")
    g.add_argument("--target-true", help="the current object (scored as the competitor)")
    g.add_argument("--requests", metavar="FILE", help="JSON list of edit requests")
    g.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="PROMPT",
        help="extra prompt to complete before and after (repeatable); scored against the "
        "first request's targets",
    )
    g.add_argument(
        "--new-tokens", type=common.positive_int, default=5, help="greedy completion length"
    )
    common.add_hparam_options(p)
    r = common.add_rep_options(p, sweep=False)
    r.add_argument(
        "--rep-save",
        metavar="FILE",
        help="write the REP adapters (.safetensors + metadata, tied to the model's fingerprint)",
    )
    r.add_argument(
        "--rep-load",
        metavar="FILE",
        help="apply saved REP adapters instead of training them (must match the model)",
    )
    s = p.add_argument_group("save / load")
    s.add_argument("--save", metavar="FILE", help="write the edit (.safetensors + metadata)")
    s.add_argument("--export", metavar="DIR", help="write the edited model as a HF directory")
    s.add_argument(
        "--load",
        metavar="FILE",
        help="apply a saved edit instead of computing one (must match the model)",
    )
    common.add_model_options(p)
    common.add_stats_options(p)
    common.add_json_option(p)


# ----------------------------------------------------------------------------- requests


def _flag_request(args: argparse.Namespace) -> EditRequest | None:
    from repedit.data import EditRequest
    from repedit.data.case import SUBJECT_SLOT

    given = [args.subject, args.prompt, args.target_new]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise InvalidRequestError(
            "an edit from flags needs all of --subject, --prompt and --target"
        )
    if SUBJECT_SLOT not in args.prompt and args.subject not in args.prompt:
        raise InvalidRequestError(
            f"--prompt must contain {{}} where the subject goes (or the subject itself): "
            f"{args.prompt!r}"
        )
    record = {
        "prompt": args.prompt,
        "subject": args.subject,
        "target_new": args.target_new,
        "target_true": args.target_true,
    }
    return EditRequest.from_dict(record, where="command line")


def _file_requests(path: str) -> list[EditRequest]:
    from repedit.data import EditRequest

    data = common.read_mapping(path, "requests")
    if isinstance(data, dict):
        data = data.get("requests", [data])
    if not isinstance(data, list) or not data:
        raise InvalidRequestError(f"{path}: expected a non-empty JSON list of edit requests")
    requests = []
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise InvalidRequestError(f"{path}: record #{i} is not an object")
        requests.append(EditRequest.from_dict(record, where=f"{path} record #{i}"))
    return requests


def build_requests(args: argparse.Namespace, loaded: EditResult | None) -> list[EditRequest]:
    from repedit.data import EditRequest

    requests = []
    flag = _flag_request(args)
    if flag is not None:
        requests.append(flag)
    if args.requests:
        requests.extend(_file_requests(args.requests))
    if not requests and loaded is not None:
        requests = [
            EditRequest.from_dict(r, where=f"{args.load} request #{i}")
            for i, r in enumerate(loaded.requests)
        ]
    if not requests:
        raise InvalidRequestError(
            "nothing to edit: give --subject, --prompt and --target, or --requests FILE, "
            "or --load FILE"
        )
    return requests


# ----------------------------------------------------------------------------- probing


# ----------------------------------------------------------------------------- editor


def build_editor(args: argparse.Namespace) -> Editor:
    from repedit.editors import make_editor

    return make_editor(args.method, common.hparam_overrides(args), common.stats_config(args))


def edit_status(lm: LoadedModel, editor: Editor) -> None:
    """Say what the next (long) step will do, and whether key statistics must be computed."""
    cfg = editor.stats_config
    layers = editor.layers(lm, editor.resolved(lm))
    where = f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
    name = editor.name.upper()
    found = common.stats_cached(lm, layers, cfg)
    if found is None:
        common.status(
            f"editing with {name} at {where} (key statistics: computed on first use from "
            f"--corpus {cfg.corpus}, then cached)…"
        )
    elif len(found[1]) < len(layers):
        common.status(
            f"computing key statistics for {where} from {found[0]} ({cfg.n_tokens} tokens; "
            f"one-off, cached), then editing with {name}…"
        )
    else:
        common.status(f"editing with {name} at {where} (key statistics cached)…")


# ----------------------------------------------------------------------------- REP


def rep_request(args: argparse.Namespace) -> dict[str, Any] | None:
    """RepConfig overrides when REP is asked for (``{}``: defaults), else None; refuses the
    combinations that cannot work, before any model is loaded."""
    overrides = common.rep_overrides(args)
    if overrides is None and not (args.rep_load or args.rep_save):
        return None
    if args.rep_load and (args.rep_config or args.rep_overrides or args.rep_ablations):
        raise InvalidRequestError(
            "--rep-load applies saved adapters with the configuration they were trained with; "
            "--rep-config, --rep-set and --rep-ablation only shape training (--rep-tau still "
            "applies)"
        )
    return overrides or {}


def _rep_corpus(args: argparse.Namespace) -> dict[str, Any]:
    """``long_context_corpus`` = the --corpus file when $REPEDIT_DATA has no WikiText."""
    from pathlib import Path

    from repedit.data.loaders import passage_corpus

    if passage_corpus()[0] is not None:
        return {}
    if args.corpus in ("auto", "wikitext", "model") or args.corpus.startswith("hf:"):
        return {}
    path = Path(args.corpus).expanduser()
    return {"long_context_corpus": str(path)} if path.is_file() else {}


def _rep_editor(args: argparse.Namespace, loaded: EditResult) -> Editor:
    """The editor a loaded edit was made with (its contexts, statistics and key position)."""
    from repedit.editors import make_editor

    hparams = {k: v for k, v in (loaded.hparams or {}).items() if k != "method"}
    try:
        return make_editor(loaded.method, hparams, common.stats_config(args))
    except Exception as exc:
        raise InvalidRequestError(
            f"cannot rebuild the {loaded.method} editor of {args.load} to train REP ({exc}); "
            "train REP when computing the edit, or pass --rep-load"
        ) from None


def apply_rep(
    args: argparse.Namespace,
    lm: LoadedModel,
    editor: Editor | None,
    result: EditResult,
    items: list[Any],
    overrides: dict[str, Any],
) -> tuple[dict[int, Any], dict[str, Any]]:
    """Train (or ``--rep-load``) the adapters; ``(adapters, info for the output)``."""
    from repedit.rep import RepConfig, load_adapters, read_adapter_metadata, train_rep_after
    from repedit.rep.ablations import set_tau

    if args.rep_load:
        adapters = load_adapters(args.rep_load, lm)
        if args.rep_tau is not None:
            set_tau(adapters, args.rep_tau)
        if sorted(adapters) != result.layers:
            common.log(
                f"warning: the REP adapters in {args.rep_load} adapt layers {sorted(adapters)}, "
                f"the edit changed {result.layers}"
            )
        meta = read_adapter_metadata(args.rep_load)
        tau = next(iter(adapters.values())).tau
        info = {"trained": False, "loaded": args.rep_load, "seconds": None, "tau": tau}
        info["config"] = meta.get("config")
        info["training"] = meta.get("info") or None  # the summary saved with the adapters
        return adapters, info
    values = {**_rep_corpus(args), **overrides}
    if args.rep_tau is not None:
        values["tau"] = args.rep_tau
    cfg = RepConfig().replace(**values)
    assert editor is not None
    layers = result.layers
    common.status(
        f"training REP adapters at layer{'s' if len(layers) > 1 else ''} "
        f"{', '.join(map(str, layers))} ({cfg.steps} steps)…"
    )
    rep = train_rep_after(lm, editor, result, items, cfg=cfg, layers=layers)
    saved = str(rep.save(args.rep_save, fingerprint=lm.fingerprint)) if args.rep_save else None
    info = {
        "trained": True,
        "loaded": None,
        "seconds": rep.seconds,
        "tau": cfg.tau,
        "config": cfg.to_dict(),
        "training": rep.summary(),
        "pool": rep.info.get("pool"),
        "saved": saved,
    }
    return rep.adapters, info


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from repedit.editors import EditResult

    rep_overrides = rep_request(args)
    loaded = EditResult.load(args.load) if args.load else None
    editor = None if loaded else build_editor(args)
    requests = build_requests(args, loaded)
    specs = probe_specs(requests, args.probe)
    lm = common.load(args)
    if loaded is not None:
        loaded.check_model(lm)
    common.status(f"probing {len(specs)} prompts before the edit…")
    before = measure(lm, specs, args.new_tokens)
    result, method, seconds = _edit(lm, editor, loaded, requests)
    after = measure(lm, specs, args.new_tokens)
    saved = str(result.save(args.save)) if args.save else None
    exported = None
    if args.export and rep_overrides is None:
        exported = str(result.export(lm, args.export))
    after_rep, rep = None, None
    if rep_overrides is not None:
        after_rep, rep, rep_exported = _with_rep(
            args, lm, editor, loaded, result, requests, specs, rep_overrides
        )
        exported = rep_exported or exported
    report = edit_report(
        method=method,
        model=args.model,
        lm=lm,
        seconds=seconds,
        layers=result.layers,
        requests=requests,
        specs=specs,
        before=before,
        after=after,
        after_rep=after_rep,
        loaded=args.load,
        saved=saved,
        exported=exported,
        rep=rep,
    )
    probes = report["probes"]
    if args.json:
        common.print_json(report)
        return 0
    how = f"loaded from {args.load}" if loaded is not None else f"{seconds:.1f} s"
    layers = ", ".join(map(str, result.layers))
    _print_table(args, requests, probes, rep, f"{method} · layers {layers} · {how}")
    if saved:
        common.out.print(f"saved edit: {escape(saved)}")
    if exported:
        common.out.print(f"exported edited model: {escape(exported)}")
    if rep is not None:
        _print_rep(rep)
    return 0


def _edit(
    lm: LoadedModel,
    editor: Editor | None,
    loaded: EditResult | None,
    requests: list[EditRequest],
) -> tuple[EditResult, str, float]:
    """Compute and apply the edit (or apply the loaded one): ``(result, method, seconds)``."""
    t0 = time.perf_counter()
    if loaded is not None:
        result = loaded.apply(lm)
        method = loaded.method
    else:
        assert editor is not None
        edit_status(lm, editor)
        result = editor.edit(lm, requests)
        method = editor.name
    return result, method, time.perf_counter() - t0


def _with_rep(
    args: argparse.Namespace,
    lm: LoadedModel,
    editor: Editor | None,
    loaded: EditResult | None,
    result: EditResult,
    requests: list[EditRequest],
    specs: list[ProbeSpec],
    overrides: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """Train (or load) REP on the applied edit and probe with the adapters attached:
    ``(probe rows, rep info, exported directory or None)``."""
    from repedit.rep import export_with_rep, rep_applied, save_adapters

    rep_editor = editor
    if rep_editor is None and not args.rep_load:
        assert loaded is not None
        rep_editor = _rep_editor(args, loaded)
    items = rep_items(requests, specs)
    adapters, rep = apply_rep(args, lm, rep_editor, result, items, overrides)
    if args.rep_load and args.rep_save:
        rep["saved"] = str(save_adapters(args.rep_save, adapters, fingerprint=lm.fingerprint))
    exported = str(export_with_rep(lm, result, adapters, args.export)) if args.export else None
    with rep_applied(lm, adapters, count=True) as inj:
        after_rep = measure(lm, specs, args.new_tokens)
    rep["gate"] = {str(k): v for k, v in inj.gate_rates().items()}
    rep["layers"] = sorted(adapters)
    return after_rep, rep, exported


def _print_table(
    args: argparse.Namespace,
    requests: list[EditRequest],
    probes: list[dict[str, Any]],
    rep: dict[str, Any] | None,
    title: str,
) -> None:
    for req in requests:
        was = f" (was {escape(req.target_true)})" if req.target_true else ""
        common.out.print(f"[bold]{escape(req.text)}[/] → {escape(req.target_new)}{was}")
    whens = ["before", "after", *(["after_rep"] if rep is not None else [])]

    def probs(p: dict[str, Any], key: str) -> str:
        return " → ".join(common.fmt_prob(p[w][key]) for w in whens)

    rows = [
        [
            p["prompt"],
            *(common.fmt_text(p[w]["top1"]) for w in whens),
            probs(p, "p_new"),
            probs(p, "p_true") if p["target_true"] else None,
        ]
        for p in probes
    ]
    if rep is not None:
        title += f" · REP τ={rep['tau']:g}, " + (
            f"trained {rep['seconds']:.1f} s" if rep["trained"] else f"loaded from {args.rep_load}"
        )
    columns = ["prompt", "before", "after", *(["after+REP"] if rep is not None else [])]
    common.print_table(rows, [*columns, "P(new)", "P(true)"], title=title)


def _print_rep(rep: dict[str, Any]) -> None:
    rates = ", ".join(
        f"layer {k}: " + ("—" if v["rate"] is None else f"{100 * v['rate']:.1f} %")
        for k, v in rep["gate"].items()
    )
    common.out.print(f"REP gate open on probe tokens: {rates}")
    if rep.get("saved"):
        common.out.print(f"saved REP adapters: {escape(rep['saved'])}")
