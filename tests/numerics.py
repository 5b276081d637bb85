"""Tolerances for tests that compare two floating-point computations, derived, not tuned.

Two code paths that compute the same quantity (a cached prefix and the full rows, a batch and
single rows, a solve and its reference) differ only by rounding, and how much depends on the
CPU: AVX-512, AVX2 and other kernels sum the same terms in different orders and blockings.
A tolerance read off one machine is a guess about every other one, so here it follows from the
computation: its dtype, how many roundings lie on the way to the result and how large the
summed terms are.

One sum or dot product of ``n`` terms, in any order, errs by at most (Higham, *Accuracy and
Stability of Numerical Algorithms*, §3.1)

    worst case:     |fl(s) - s| <= gamma_n * sum_i |x_i y_i|,   gamma_n = n u / (1 - n u)
    probabilistic:  |fl(s) - s| <= lambda * sqrt(n) * u * sum_i |x_i y_i|

where ``u`` is the unit roundoff (2^-24 for float32, 2^-53 for float64). The second is Higham
and Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019): with rounding errors modelled
as independent and of mean zero, it fails with probability at most ``2 n exp(-lambda^2 / 2)``,
below 1e-11 for ``lambda = 8`` (``LAMBDA``); the worst case needs every rounding to go the same
way, which no summation order does, and overstates real errors by about ``sqrt(n)``. A result
that comes through ``stages`` chained reductions (each block's norm, projections, attention and
MLP) carries ``stages * n`` roundings on its longest path, each passed on with a gain of about
one, so the same bounds apply with ``n -> stages * n``. Two paths, each within the bound of the
exact value, differ by at most twice it. Every tolerance here is thus

    paths * min(stages * gamma_n, lambda * sqrt(stages * n) * u) * magnitude

with its inputs named at the call site (``tolerance``). It stays far below what a real bug
does (a dropped term, a shifted position or a missing layer moves a result by a sizeable
fraction of its magnitude); the companion tests marked ``numerics`` assert that for each family
of comparison. Linear solves add their condition number (``solve_tolerance``).

An iterative optimisation repeats such a computation: each step's rounding moves the iterate by
at most ``per_step`` and later steps carry that on (to first order, without contraction), so its
drift after ``steps`` steps is at most ``steps * per_step * sensitivity``, ``sensitivity`` being
the gain from one step's input error to its output error. Adam divides each gradient element by
its own running RMS, so an element whose gradient crosses zero is ill-conditioned on its own
(its relative rounding error is amplified by the ratio of the largest gradient to it, without
bound); those elements are tiny in the norm and, having a near-zero gradient, barely move the
loss. The value tests therefore compare the well-conditioned quantities: the loss at every step
and the delta's norm-wise relative error, each with sensitivity one.
"""

from __future__ import annotations

import math

import torch

#: chained reductions per transformer block on the way from its input to its output: the input
#: norm, the query/key/value projection, the attention scores, the softmax sum, the weighted sum
#: of values, the output projection, the MLP norm, its up (and gate) projection, its down
#: projection and the residual add
STAGES_PER_BLOCK = 10
#: after the last block: the final norm, the unembedding and the log-softmax's sum
STAGES_HEAD = 3


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of one rounding in ``dtype`` (half its epsilon)."""
    return torch.finfo(dtype).eps / 2


def gamma(terms: int, dtype: torch.dtype) -> float:
    """``gamma_n = n u / (1 - n u)``: worst relative error of an ``n``-term sum in any order."""
    nu = terms * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"{terms} terms are too many for a rounding bound in {dtype}")
    return nu / (1 - nu)


#: confidence parameter of the probabilistic bound: it fails with probability below
#: 2 n exp(-LAMBDA^2 / 2), under 1e-11 for every reduction length used here
LAMBDA = 8.0


def tolerance(
    dtype: torch.dtype,
    *,
    terms: int,
    stages: int = 1,
    magnitude: float = 1.0,
    paths: int = 2,
) -> float:
    """Largest difference between ``paths`` evaluations of a chain of ``stages`` reductions.

    ``terms``: the longest reduction in the chain; ``magnitude``: the size of the summed
    terms (1.0 gives a relative tolerance). ``paths=1`` compares one evaluation with an
    exactly known value. The smaller of the worst-case and the probabilistic bound.
    """
    worst = stages * gamma(terms, dtype)
    likely = LAMBDA * math.sqrt(stages * terms) * unit_roundoff(dtype)
    return paths * min(worst, likely) * magnitude


def forward_stages(blocks: int, *, head: bool = True) -> int:
    """Chained reductions through ``blocks`` transformer blocks (and the logits head)."""
    return STAGES_PER_BLOCK * blocks + (STAGES_HEAD if head else 0)


def forward_terms(arch: object, *, head: bool = True, seq_len: int = 0) -> int:
    """The longest reduction in a forward pass: hidden size, MLP width, sequence (attention's
    sums) and, through the logits head, the vocabulary (the log-softmax's sum)."""
    terms = max(arch.d_model, arch.d_mlp, seq_len)  # type: ignore[attr-defined]
    if head:
        terms = max(terms, int(arch.lm_head().weight.shape[0]))  # type: ignore[attr-defined]
    return terms


def forward_tolerance(
    arch: object,
    *,
    blocks: int,
    head: bool = True,
    magnitude: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seq_len: int = 0,
) -> float:
    """Two forward evaluations through ``blocks`` blocks of ``arch`` (relative unless magnitude)."""
    return tolerance(
        dtype,
        terms=forward_terms(arch, head=head, seq_len=seq_len),
        stages=forward_stages(blocks, head=head),
        magnitude=magnitude,
    )


def solve_tolerance(
    dtype: torch.dtype, *, size: int, condition: float, products: int = 1, paths: int = 2
) -> float:
    """Relative difference of ``paths`` solutions of one ``size``-square system, then products.

    A backward-stable solve (Cholesky, LU with pivoting, or an explicit inverse applied to a
    vector) has a forward error of at most about ``condition * gamma_3n`` relative to the
    solution (Higham §10.1, §9.4); each of ``products`` further matrix products of ``size``
    terms adds ``gamma_n``.
    """
    per_path = condition * gamma(3 * size, dtype) + products * gamma(size, dtype)
    return paths * per_path


def drift(*, steps: int, per_step: float, sensitivity: float = 1.0) -> float:
    """Bound on an iterate's deviation after ``steps`` steps that each err by ``per_step``."""
    return steps * per_step * sensitivity


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute element difference (float64, so the check adds no rounding)."""
    if not want.numel():
        return 0.0
    return float((got.detach().double() - want.detach().double()).abs().max())


def norm_error(got: torch.Tensor, want: torch.Tensor, dim: int = -1) -> float:
    """Largest norm-wise relative difference ``|got - want| / |want|`` along ``dim``."""
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).norm(dim=dim)
    return float((diff / want.norm(dim=dim).clamp_min(1e-300)).max())


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> float:
    """Assert every element of ``got`` is within ``tol`` of ``want``; return the max error."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = max_error(got, want)
    assert err <= tol, f"{what}: max error {err:.3g} exceeds the derived tolerance {tol:.3g}"
    return err


def assert_norm_within(
    got: torch.Tensor, want: torch.Tensor, tol: float, what: str, dim: int = -1
) -> float:
    """Assert the norm-wise relative error along ``dim`` is within ``tol``; return it."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = norm_error(got, want, dim=dim)
    assert err <= tol, f"{what}: relative error {err:.3g} exceeds the derived tolerance {tol:.3g}"
    return err


def p_tolerance(p: float, family: str = "llama") -> float:
    """Relative tolerance of a probability ``p = exp(log p)`` that two runs of the same edited
    tiny model of ``family`` report: its log-prob's absolute error, through every block and the
    head, on log-probs of size ``|log p|`` (plus one for the logits' own size)."""
    from repedit.models import Arch
    from repedit.models.tiny import tiny_model

    arch = Arch(tiny_model(family))
    return forward_tolerance(arch, blocks=arch.n_layers, magnitude=abs(math.log(p)) + 1.0)
