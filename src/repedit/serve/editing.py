"""One edit as the server makes it: probes, stages with progress, REP, and the page's views."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from repedit.edit_report import ProbeSpec, edit_report, measure, probe_specs, rep_items

if TYPE_CHECKING:
    from repedit.data import EditCase, EditRequest
    from repedit.serve.limits import EditParams
    from repedit.serve.session import Current, Playground


def request_of(params: EditParams) -> EditRequest:
    from repedit.data import EditRequest

    record = {
        "prompt": params.prompt,
        "subject": params.subject,
        "target_new": params.target,
        "target_true": params.target_true,
    }
    return EditRequest.from_dict(record, where="request")


def page_probes(pg: Playground, req: EditRequest, case: EditCase | None) -> list[ProbeSpec]:
    """Generated scrambles, a long-context prompt, and a case's paraphrases and neighbours."""
    from repedit.data.variants import long_context_prompt, scrambled_subjects

    specs = []
    for s in scrambled_subjects(req.subject, pg.lm.tokenizer, n_max=2, key="playground"):
        specs.append(
            ProbeSpec("scramble", req.with_subject(s).text, req.target_new, req.target_true)
        )
    if pg.sampler is not None:
        passage = pg.sampler.passages(f"{req.text}:playground", 1)[0]
        specs.append(
            ProbeSpec(
                "long-context",
                long_context_prompt(passage, req.text),
                req.target_new,
                req.target_true,
            )
        )
    if case is not None:
        for text in case.prompt_paraphrases[:2]:
            specs.append(ProbeSpec("paraphrase", text, req.target_new, req.target_true))
        for n in case.neighbourhood[:2]:
            specs.append(ProbeSpec("neighbour", n.prompt, req.target_new, n.target))
    return specs


def _stage(pg: Playground, stage: str, message: str) -> None:
    pg.progress.say(stage, message)


def _train_rep(pg: Playground, editor: Any, result: Any, req: EditRequest, specs: list[ProbeSpec]):
    from repedit.rep import train_rep_after

    cfg = pg.sources.rep_config()
    _stage(pg, "rep", f"training REP adapters at layers {result.layers} ({cfg.steps} steps)…")
    trained = train_rep_after(pg.lm, editor, result, rep_items([req], specs), cfg=cfg)
    _stage(pg, "rep", f"REP trained in {trained.seconds:.1f} s")
    return trained


def _rep_info(trained: Any, gate_rates: dict[int, Any]) -> dict[str, Any]:
    """The ``rep`` entry of ``repedit edit --json`` for adapters trained here."""
    return {
        "trained": True,
        "loaded": None,
        "seconds": trained.seconds,
        "tau": trained.cfg.tau,
        "config": trained.cfg.to_dict(),
        "training": trained.summary(),
        "pool": trained.info.get("pool"),
        "saved": None,
        "gate": {str(k): v for k, v in gate_rates.items()},
        "layers": sorted(trained.adapters),
    }


def run_edit(pg: Playground, params: EditParams) -> Current:
    """Make the edit on ``pg.lm`` (the caller holds the model lock and has reverted any
    previous edit); on failure the model is left unedited."""
    from repedit.rep import rep_applied
    from repedit.serve.session import Current
    from repedit.serve.views import beta_series, gate_strip

    req = request_of(params)
    case = pg.cases.get(params.case) if params.case else None
    specs = probe_specs([req], params.probe)
    if params.variants:
        specs += page_probes(pg, req, case)
    editor = pg.editor(params.method, params.layer)
    editor.validate(pg.lm, [req])
    layers = editor.layers(pg.lm, editor.resolved(pg.lm))
    _stage(pg, "probe", f"probing {len(specs)} prompts before the edit…")
    before = measure(pg.lm, specs, params.new_tokens)
    _stage(pg, "stats", f"key statistics for layer(s) {layers} (computed once, then cached)…")
    editor.second_moment(pg.lm, layers)
    _stage(pg, "edit", f"{editor.name.upper()}: optimising the value and writing the edit…")
    t0 = time.perf_counter()
    result = editor.edit(pg.lm, req)
    seconds = time.perf_counter() - t0
    try:
        after = measure(pg.lm, specs, params.new_tokens)
        after_rep, rep, adapters, gates, beta = None, None, None, [], []
        if params.rep:
            trained = _train_rep(pg, editor, result, req, specs)
            adapters = trained.adapters
            with rep_applied(pg.lm, adapters, count=True) as inj:
                after_rep = measure(pg.lm, specs, params.new_tokens)
            rep = _rep_info(trained, inj.gate_rates())
            gates = [gate_strip(pg.lm, adapters, s.prompt) for s in specs]
            beta = beta_series(trained.alignment_before, trained.alignment_after)
    except BaseException:
        result.revert(pg.lm)
        raise
    _stage(pg, "done", f"edit made in {seconds:.1f} s")
    report = edit_report(
        method=editor.name,
        model=pg.model_name,
        lm=pg.lm,
        seconds=seconds,
        layers=result.layers,
        requests=[req],
        specs=specs,
        before=before,
        after=after,
        after_rep=after_rep,
        rep=rep,
    )
    return Current(params, req, editor, result, report, adapters, gates=gates, beta=beta)
