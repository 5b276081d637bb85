"""REP (Robust Edit Pathway): a gated low-rank adapter on the key path of edited layers.

``k̂ = k + g(k)·P(k)`` on the input of each edited down-projection, trained after the edit so
that the keys of paraphrased, scrambled and long-context versions of the subject align with
the edit's key (:mod:`repedit.rep.train`), attached through hooks only
(:mod:`repedit.rep.inject`), saved next to the edit (``save_adapters``/``load_adapters``) or
exported with the edited weights and a loader that needs no repedit (``export_with_rep``)::

    result, rep = train_rep_for_editor(lm, editor, [case], RepConfig())
    with rep_applied(lm, rep.adapters, count=True) as inj:
        ...                      # score probes with the adapters on
    print(rep.summary(), inj.gate_rates())
"""

from repedit.rep.adapter import (
    RepAdapter,
    RepConfig,
    RepStack,
    make_adapters,
    released_config,
)
from repedit.rep.adapter_file import load_adapters, read_adapter_metadata, save_adapters
from repedit.rep.export import export_with_rep
from repedit.rep.inject import RepInjection, attach, rep_applied
from repedit.rep.reader import read_keys
from repedit.rep.tally import gate_rates
from repedit.rep.targets import edit_targets
from repedit.rep.train import RepTrainResult, train_rep, train_rep_after, train_rep_for_editor
from repedit.rep.variants import (
    RepExample,
    RepItem,
    RepPool,
    build_pool,
    heldout_examples,
    passage_sampler,
    rep_items,
)

__all__ = [
    "RepAdapter",
    "RepConfig",
    "RepExample",
    "RepInjection",
    "RepItem",
    "RepPool",
    "RepStack",
    "RepTrainResult",
    "attach",
    "build_pool",
    "edit_targets",
    "export_with_rep",
    "gate_rates",
    "heldout_examples",
    "load_adapters",
    "make_adapters",
    "passage_sampler",
    "read_adapter_metadata",
    "read_keys",
    "released_config",
    "rep_applied",
    "rep_items",
    "save_adapters",
    "train_rep",
    "train_rep_after",
    "train_rep_for_editor",
]
