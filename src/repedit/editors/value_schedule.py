"""Which requests share a batched value-optimisation step, and a row-wise Adam for them.

Every request's delta is optimised on its own loss alone (its rows see only its delta, and the
batch's loss is a sum), so which requests share a step changes only float rounding. That
freedom keeps each step's batch full of requests that still need steps: requests of similar
width join while the batch stays under a budget of padded tokens, and leave once they
converge or use up their steps; then the batch is rebuilt from the ones still running plus
queued ones (at once when the rebuild only selects recorded rows, else once enough have left).
Requests therefore join at different times, and ``RowAdam`` keeps one step count per row
where ``torch.optim.Adam`` keeps one per tensor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

#: where a rebuild runs the model over the whole batch again (no recorded rows to select
#: from): rebuild once at most this fraction of its requests are still running, since such a
#: rebuild costs about one step (a forward over the rows, without the backward) and dropping
#: a quarter of the rows pays for itself within a few steps
REBUILD_AT = 0.75


def suffix_shape(subject_pos: torch.Tensor, lengths: torch.Tensor) -> tuple[int, int]:
    """A request's rows and the widest of them from the subject token on: what it adds to a
    step (rows are aligned at the subject token and padded to the batch's widest)."""
    return int(subject_pos.numel()), int((lengths - subject_pos).max())


class Schedule:
    """A queue of requests (by index) admitted into batches of at most ``budget`` tokens.

    A batch's cost is its rows times its widest row (``suffix_shape``), the padded tokens each
    step runs forward and backward. The queue is ordered by width (stable), so requests of
    similar width share a batch and little of it is padding. A request larger than the budget
    still gets a batch of its own.
    """

    def __init__(
        self, shapes: Sequence[tuple[int, int]], budget: int, rebuild_at: float = REBUILD_AT
    ):
        if budget < 1:
            raise ValueError(f"token budget must be positive, not {budget}")
        self.shapes = list(shapes)
        self.budget = budget
        self.rebuild_at = rebuild_at
        self.queue: deque[int] = deque(sorted(range(len(shapes)), key=lambda i: shapes[i][1]))

    def cost(self, batch: Sequence[int]) -> int:
        """Padded tokens of one step over ``batch``."""
        if not batch:
            return 0
        return sum(self.shapes[i][0] for i in batch) * max(self.shapes[i][1] for i in batch)

    def finished(self, live: Sequence[int]) -> bool:
        return not live and not self.queue

    def should_rebuild(
        self, live: Sequence[int], batch: Sequence[int], *, cheap: bool = True
    ) -> bool:
        """True when the batch has no rows yet, or when a request has left it and a rebuild is
        ``cheap`` (rows are selected, not recomputed) or too many have left."""
        if not batch:
            return True
        left = len(live) < len(batch)
        return left and (cheap or len(live) <= self.rebuild_at * len(batch))

    def admit(self, live: Sequence[int]) -> list[int]:
        """``live`` (in order) plus queued requests while the batch stays within the budget."""
        batch = list(live)
        while self.queue and (not batch or self.cost([*batch, self.queue[0]]) <= self.budget):
            batch.append(self.queue.popleft())
        return batch


class RowAdam:
    """Adam over the rows of one [n, d] tensor, each row with its own step count.

    The update is ``torch.optim.Adam``'s (no weight decay, no amsgrad) applied row by row, so
    a row stepped ``t`` times follows the same iterates as under that optimiser.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        device: torch.device | str = "cpu",
    ):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = torch.zeros(shape, device=device)
        self.exp_avg_sq = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], dtype=torch.long)

    def step(self, param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update ``param[rows]`` in place given their gradient ``grad`` [len(rows), d]."""
        beta1, beta2 = self.betas
        rows_cpu = rows.cpu()
        self.t[rows_cpu] += 1
        t = self.t[rows_cpu].double()
        m = self.exp_avg[rows].lerp_(grad, 1 - beta1)
        v = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg[rows] = m
        self.exp_avg_sq[rows] = v
        step_size = (self.lr / (1 - beta1**t)).to(param.dtype).to(param.device)
        bc2_sqrt = ((1 - beta2**t) ** 0.5).to(param.dtype).to(param.device)
        denom = (v.sqrt() / bc2_sqrt[:, None]).add_(self.eps)
        param[rows] = param[rows] - step_size[:, None] * (m / denom)
