"""R-ROME (Gupta & Anumanchipalli, 2024): ROME with one key throughout.

ROME's direction uses the context-averaged ``k*`` but its residual and denominator use the
bare-prompt ``k_o``; that mismatch causes the "disabling edits" that collapse a model under
sequential editing. R-ROME uses ``k*`` everywhere, so ``Ŵ k* = v*`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from repedit.editors.rome import Rome, RomeHparams


@dataclass
class RRomeHparams(RomeHparams):
    method: ClassVar[str] = "r-rome"


class RRome(Rome):
    name: ClassVar[str] = "r-rome"
    hparams_class = RRomeHparams
    consistent_keys: ClassVar[bool] = True
