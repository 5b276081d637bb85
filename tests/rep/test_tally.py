"""``tally.measure`` counts as negatives exactly the tokens the gate was trained to refuse."""

from __future__ import annotations

import torch
from torch import nn

from repedit.rep.adapter import RepConfig
from repedit.rep.tally import measure
from repedit.rep.variants import RepExample


class _Gate(nn.Module):
    """An adapter stand-in whose gate reads the key's first coordinate."""

    def __init__(self, subject_tokens: str):
        super().__init__()
        self.cfg = RepConfig(gate_subject_tokens=subject_tokens)
        self.tau = 0.5

    def gate(self, k: torch.Tensor) -> torch.Tensor:
        return k[:, 0]


def _gates(subject_tokens: str) -> dict[str, dict[str, float]]:
    # tokens: "The", "Sl", "oven", "ia"(subject's last: positive), "is"; the gate opens on
    # the subject's earlier tokens and on "is"
    g = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    keys = {3: [torch.stack([g, torch.zeros(5)], dim=1)]}
    ex = RepExample((1, 2, 3, 4, 5), 3, "paraphrase", 0, "The Slovenia is", subject_start=1)
    return measure({3: _Gate(subject_tokens)}, [ex], keys, None).gate_dict()[3]


def test_ignored_subject_tokens_are_not_negatives() -> None:
    ignore = _gates("ignore")
    assert ignore["positive"]["open"] == 1.0
    assert ignore["negative"]["n"] == 2 and ignore["negative"]["open"] == 0.5  # "The", "is"
    assert ignore["subject_other"]["n"] == 2 and ignore["subject_other"]["open"] == 1.0
    negative = _gates("negative")
    assert negative["negative"]["n"] == 4 and negative["negative"]["open"] == 0.75
    assert "subject_other" not in negative
