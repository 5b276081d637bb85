"""REP ablations by name, run labels, and τ changes on trained adapters.

``ablation_overrides(["no-gate", "no-norm"])`` → ``{"use_gate": False, "use_norm": False}``:
the :class:`~repedit.rep.adapter.RepConfig` overrides behind ``repedit eval --rep-ablation``.
``ablation_names`` goes the other way (for run labels such as ``rome+rep(no-gate)``), and
``set_tau`` changes the inference threshold of trained adapters (τ only matters at inference, so
a τ sweep trains once and evaluates once per τ).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from repedit.errors import InvalidRequestError
from repedit.rep.adapter import LISTED_FORMS

#: ablation name → the RepConfig fields it sets
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-gate": {"use_gate": False},
    "no-consistency": {"consistency_weight": 0.0},
    "no-norm": {"use_norm": False},
    "no-negatives": {"negatives": False},
    "no-long-context": {"long_context": False},
    "no-guard": {"beta_guard": None},
    "no-prompt-key": {"keep_prompt_key": False},
    "coupled-gate": {"decouple_gate": False},
    "all-tokens": {"prompt_only": False},
    #: the defaults before the generalisation setting: REP learns only the forms listed for it
    "listed-forms": LISTED_FORMS,
}


def _names(names: str | Iterable[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        out += [n.strip().lower() for n in str(item).split(",") if n.strip()]
    return out


def ablation_overrides(names: str | Iterable[str]) -> dict[str, Any]:
    """The RepConfig overrides of the named ablations (comma-separated strings allowed).

    An unknown name is an ``InvalidRequestError`` listing the valid ones.
    """
    out: dict[str, Any] = {}
    for name in _names(names):
        if name not in ABLATIONS:
            raise InvalidRequestError(
                f"unknown REP ablation {name!r}; choose from {', '.join(ABLATIONS)}"
            )
        out.update(ABLATIONS[name])
    return out


def idle_ablations(names: str | Iterable[str], cfg: Any) -> list[str]:
    """The named ablations that change nothing under ``cfg`` (a resolved RepConfig), with why.

    ``no-norm`` acts on the paper's direction loss: repedit's default ``agg="match"`` does not
    normalise k̂. ``no-negatives`` only differs from a run with ``negatives=true``.
    """
    out = []
    for name in _names(names):
        if name == "no-norm" and cfg.agg == "match":
            out.append(f"{name}: agg='match' does not normalise k̂ (use --rep-set agg=direction)")
        elif name == "no-negatives" and not type(cfg)().negatives:
            out.append(
                f"{name}: negatives are off by default (compare with --rep-set negatives=true)"
            )
    return out


def ablation_names(overrides: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """``(ablations, rest)``: the ablations whose every field is set in ``overrides`` (in
    :data:`ABLATIONS` order), and the overrides they do not explain."""
    rest = dict(overrides)
    found = []
    for name, fields in ABLATIONS.items():
        if all(k in overrides and overrides[k] == v for k, v in fields.items()):
            found.append(name)
            for k in fields:
                rest.pop(k, None)
    return found, rest


#: overrides left out of run labels (paths, not settings)
LABEL_SKIP = frozenset({"long_context_corpus"})


def rep_label(
    method: str, rep: Mapping[str, Any] | None, taus: Iterable[float] | None = None
) -> str:
    """``rome``, ``rome+rep``, ``rome+rep(no-gate)``, ``rome+rep(rank=8) τ=0.7``, ...

    ``rep``: the run's RepConfig overrides (None: no REP); ``taus``: a τ sweep's values.
    """
    if rep is None:
        return method
    overrides = {k: v for k, v in rep.items() if k not in LABEL_SKIP}
    tau = overrides.pop("tau", None)
    names, rest = ablation_names(overrides)
    parts = names + [f"{k}={_short(v)}" for k, v in sorted(rest.items())]
    label = f"{method}+rep" + (f"({', '.join(parts)})" if parts else "")
    taus = list(taus or [])
    if tau is not None:
        label += f" τ={float(tau):g}"
    elif taus:
        label += " τ∈{" + ",".join(f"{float(t):g}" for t in taus) + "}"
    return label


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def set_tau(adapters: Mapping[int, Any], tau: float) -> None:
    """Set the hard-gate threshold of every adapter (and every member of a ``RepStack``)."""
    if not 0.0 < float(tau) < 1.0:
        raise InvalidRequestError(f"tau must be in (0, 1), got {tau}")
    for adapter in adapters.values():
        adapter.tau = float(tau)  # a RepStack passes it on to its members


def parse_taus(text: str | Iterable[Any]) -> tuple[float, ...]:
    """``"0.5,0.7,0.9"`` (or a list) → ``(0.5, 0.7, 0.9)``: distinct values in (0, 1), in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[float] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            tau = float(item)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"bad τ value {item!r}: expected numbers in (0, 1)") from None
        if not 0.0 < tau < 1.0:
            raise InvalidRequestError(f"τ must be in (0, 1), got {tau:g}")
        if tau not in out:
            out.append(tau)
    if not out:
        raise InvalidRequestError(f"no τ value given in {text!r}")
    return tuple(out)
