"""Where the edited model reads the subject: every probe of the suite scored with the residual
stream at its subject token(s) replaced, layer by layer, by the edit prompt's own.

For each case the edit is applied and every success probe is scored:

``plain``
    the edit alone.
``oracle_key``
    the edit's ``k*`` written into the down-projection input at the probe's last subject
    token at every edited layer (as in :mod:`~repedit.analysis.ceiling`).
``hidden@l``
    the output of layer ``l`` at the probe's last subject token replaced by the edited model's
    output of layer ``l`` at the edit prompt's last subject token.
``hidden_all@l``
    the same at every subject token, paired right to left (the last with the last); when the
    two subjects have different token counts, the probe's extra leading tokens are left as they
    are, or the edit prompt's extra leading tokens are not used.

A probe that fails ``hidden@l`` although its subject token carries exactly the edit prompt's
state from layer ``l`` on fails because of what later positions read (attention from the
prompt's tail, the readout at the final token), not because of the subject's representation.
The output of the last layer at the subject token is read by no other position, so the sweep
stops one layer below it. Locality probes hold no edited subject and are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repedit.analysis.ceiling import (
    Install,
    Item,
    Positions,
    case_items,
    mean_keys,
    mean_rates,
    oracle_rates,
    patched_rates,
    plain_rates,
    reference_ids,
    token_writer,
)
from repedit.data.case import EditCase
from repedit.data.loaders import load_cases
from repedit.editors import make_editor
from repedit.errors import InvalidRequestError
from repedit.evaluation.probes import LOCALITY_TESTS, SuiteConfig, case_keys, passage_sampler
from repedit.io import atomic_path, write_json
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.tokens import prompt_ids

#: how ``hidden_all@l`` pairs the probe's subject tokens with the edit prompt's
ALIGNMENT = "right-to-left: last with last; unpaired leading subject tokens are left as they are"


@dataclass
class ReadoutConfig:
    """Cases, editor, suite and layer sweep of a readout run.

    ``layers``: the layers whose output is patched (None: :func:`sweep_layers` with ``step``);
    ``all_tokens``: also patch every subject token (``hidden_all@l``).
    """

    data: str = "demo"
    data_dir: str | None = None
    n: int | None = None
    id_split: int = 5
    method: str = "rome"
    hparams: dict[str, Any] = field(default_factory=dict)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    layers: tuple[int, ...] | None = None
    step: int = 2
    all_tokens: bool = True
    out: str = "runs/readout"


def sweep_layers(n_layers: int, edited: Sequence[int], step: int = 2) -> list[int]:
    """Every ``step``-th layer counting from the first edited one up to the last layer another
    position reads (``n_layers - 2``, always included), plus the layer just below the first
    edited one when there is one."""
    if step < 1:
        raise InvalidRequestError(f"layer step must be at least 1, got {step}")
    first, top = min(edited), n_layers - 2
    layers = set(range(first, top + 1, step)) | {top}
    if first > 0:
        layers.add(first - 1)
    return sorted(x for x in layers if 0 <= x <= top)


def check_layers(n_layers: int, layers: Sequence[int]) -> list[int]:
    """``layers`` sorted and unique; an error names a layer outside the model."""
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise InvalidRequestError(
                f"readout layer {layer} is outside the model's layers 0..{n_layers - 1}"
            )
    if not layers:
        raise InvalidRequestError("no readout layers given")
    return sorted(set(layers))


def donor_states(lm: LoadedModel, edit: Item, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The current (edited) model's output of each layer at the edit prompt's subject tokens:
    ``{layer: [n_subject_tokens, d_model]}``, first token to last."""
    if edit.every is None:
        raise InvalidRequestError(f"no subject tokens located in {edit.probe.prompt!r}")
    ids = torch.tensor([prompt_ids(lm.tokenizer, edit.probe.prompt)], device=lm.device)
    with Hooks() as hooks, torch.no_grad():
        for layer in layers:
            hooks.capture(str(layer), lm.arch.layer(layer), which="output")
        hooks.stop_after(lm.arch.layer(max(layers)))
        hooks.run(lm.model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        pos = torch.tensor(edit.every)
        return {layer: hooks[str(layer)][0, pos.to(lm.device)].float().cpu() for layer in layers}


def hidden_oracle(
    lm: LoadedModel, layer: int, donor: torch.Tensor, all_tokens: bool
) -> tuple[Callable[[Item], Positions | None], Install]:
    """The rewrite of ``hidden@layer`` (or ``hidden_all@layer``): ``donor`` ([n, d_model], the
    edit prompt's subject tokens) written into the layer's output at the probe's subject
    token(s), paired right to left. For ``hidden_all``, probes where only one pair forms
    (one-token subjects) get no positions: their rewrite is ``hidden@layer``'s."""

    def where(item: Item) -> Positions | None:
        if not all_tokens:
            return item.last
        if item.every is None or min(len(item.every), donor.shape[0]) < 2:
            return None
        return item.every

    def install(hooks: Hooks, pos: Positions) -> None:
        n = min(len(pos), donor.shape[0]) if all_tokens else 1
        write = token_writer(torch.tensor(pos[-n:]), donor[-n:])
        hooks.rewrite(lm.arch.layer(layer), write, which="output")

    return where, install


def oracle_names(layers: Sequence[int], all_tokens: bool) -> list[str]:
    """The score columns in report order."""
    names = ["plain", "oracle_key", *(f"hidden@{x}" for x in layers)]
    return names + ([f"hidden_all@{x}" for x in layers] if all_tokens else [])


def score_case(
    lm: LoadedModel,
    editor: Any,
    case: EditCase,
    edit: Item,
    items: Sequence[Item],
    layers: Sequence[int],
    cfg: ReadoutConfig,
) -> dict[str, list[float]]:
    """Every item scored plain, with the key oracle and with each hidden-state patch (the model
    is unedited again on return). ``edit``: the item of the case's edit prompt, the donor."""
    bs = cfg.suite.batch_size
    reference = reference_ids(lm, items, bs)
    result = editor.edit(lm, [case.edit_request])
    try:
        k_stars = mean_keys(result)
        plain = plain_rates(lm, items, reference, bs)
        scores = {
            "plain": plain,
            "oracle_key": oracle_rates(lm, items, reference, k_stars, "oracle_key", bs, plain),
        }
        donors = donor_states(lm, edit, layers)
        for layer in layers:
            where, install = hidden_oracle(lm, layer, donors[layer], all_tokens=False)
            last = patched_rates(lm, items, reference, where, install, bs, plain)
            scores[f"hidden@{layer}"] = last
            if cfg.all_tokens:
                where, install = hidden_oracle(lm, layer, donors[layer], all_tokens=True)
                every = patched_rates(lm, items, reference, where, install, bs, last)
                scores[f"hidden_all@{layer}"] = every
    finally:
        result.revert(lm)
    return scores


def readout_markdown(doc: dict[str, Any], title: str = "Where the subject is read") -> str:
    """``readout.md``: tests as rows, plain / oracle key / hidden@l columns in percent (and a
    second table for hidden_all@l when present)."""
    layers = doc["layers"]
    lines = [f"# {title}", ""]
    tables = [("hidden", "the last subject token")]
    if any(f"hidden_all@{layers[0]}" in t for t in doc["tests"].values()):
        tables.append(("hidden_all", f"every subject token (paired {doc['alignment']})"))
    for prefix, what in tables:
        head = ["test", "n", "plain", "oracle key", *(f"{prefix}@{x}" for x in layers)]
        lines += [f"Layer output patched at {what}:", ""]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for name, t in doc["tests"].items():
            cols = ["plain", "oracle_key", *(f"{prefix}@{x}" for x in layers)]
            cells = [name, str(t["n"]), *(f"{100 * t[c]:.1f}" for c in cols)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _edit_item(items: Sequence[Item], key: str) -> Item:
    for item in items:
        if item.probe.test == "efficacy":
            return item
    raise InvalidRequestError(f"case {key}: the suite built no edit-prompt probe")


def run_readout(
    cfg: ReadoutConfig,
    lm: LoadedModel,
    editor: Any = None,
    *,
    stats_config: Any = None,
    on_case: Callable[[str], None] = lambda _key: None,
) -> dict[str, Any]:
    """Score every case's success probes plain, with the key oracle and with the hidden-state
    patches; write ``readout.json``, ``readout.md`` and ``readout.png`` under ``cfg.out``."""
    from repedit.analysis.plots import plot_readout

    editor = editor or make_editor(cfg.method, cfg.hparams, stats_config)
    edited = list(editor.layers(lm, editor.resolved(lm)))
    if cfg.layers is None:
        layers = sweep_layers(lm.n_layers, edited, cfg.step)
    else:
        layers = check_layers(lm.n_layers, cfg.layers)
    cases = load_cases(cfg.data, data_dir=cfg.data_dir, n=cfg.n, id_split=cfg.id_split).cases
    if not cases:
        raise InvalidRequestError(f"no cases in {cfg.data}")
    sampler = passage_sampler(lm, cfg.suite)
    rows: list[tuple[str, dict[str, float]]] = []
    for case, key in zip(cases, case_keys(cases), strict=True):
        every = case_items(lm, case, key, cfg.suite, sampler, None)
        wanted = set(cfg.suite.tests) - set(LOCALITY_TESTS)
        items = [i for i in every if i.probe.test in wanted]
        scores = score_case(lm, editor, case, _edit_item(every, key), items, layers, cfg)
        for j, item in enumerate(items):
            rows.append((item.test, {m: s[j] for m, s in scores.items()}))
        on_case(key)
    names = oracle_names(layers, cfg.all_tokens)
    doc = {
        "method": editor.name,
        "data": cfg.data,
        "n_cases": len(cases),
        "edited_layers": edited,
        "layers": layers,
        "oracles": names,
        "alignment": ALIGNMENT,
        "tests": mean_rates(rows, names),
    }
    out = Path(cfg.out)
    write_json(out / "readout.json", doc)
    with atomic_path(out / "readout.md") as tmp:
        title = f"Where the subject is read: {editor.name}, {cfg.data}"
        tmp.write_text(readout_markdown(doc, title))
    plot_readout(doc, out / "readout.png")
    return doc
