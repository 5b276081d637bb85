"""Step 3 of every editor: the closed-form weight updates, in float64.

Shapes: ``W`` is [d_model, d_mlp] (``v = W k``); keys ``K`` are [d_mlp, n]; residuals ``R``
are [d_model, n]. Solves use Cholesky or LU on the regularised matrix, never an inverse, and
report ill-conditioning instead of returning garbage.
"""

from __future__ import annotations

import warnings

import torch

from repedit.errors import EditError
from repedit.stats.second_moment import SecondMoment

F64 = torch.float64
COND_WARN = 1e10


def _check(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise EditError(f"{what} is not finite (NaN/inf): the solve is ill-conditioned")
    return x


def _spd_solve(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive-definite ``a``, warning when ill-conditioned."""
    factor, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0:
        raise EditError(f"{what}: matrix is not positive definite (is C rank-deficient?)")
    diag = factor.diagonal()
    cond_est = float((diag.max() / diag.min().clamp_min(1e-300)) ** 2)
    if cond_est > COND_WARN:
        warnings.warn(f"{what}: ill-conditioned (condition number ≈ {cond_est:.2e})", stacklevel=3)
    return _check(torch.cholesky_solve(b, factor), what)


def rank_one_update(
    stats: SecondMoment,
    k_dir: torch.Tensor,
    k_res: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """ROME's ``ΔW = r uᵀ / (uᵀ k_r)`` with ``u = C⁻¹ k_dir``, so that ``ΔW k_r = r``.

    ``r = v* − W k_r`` is the change the edit must make at ``k_r``. ROME uses ``k_dir = k*``
    (context-averaged) and ``k_r = k_o`` (bare prompt); R-ROME uses ``k*`` for both.
    Returns [d_model, d_mlp] in float64 on the residual's device.
    """
    device = residual.device
    u = stats.solve(k_dir.to(stats.matrix.device, F64)).to(device)
    k_r = k_res.to(device, F64)
    denom = torch.dot(u, k_r)
    if denom.abs() < 1e-12 * u.norm() * k_r.norm():
        raise EditError("rank-one update: the key is (nearly) orthogonal to C⁻¹k*")
    return _check(torch.outer(residual.to(F64) / denom, u), "rank-one update")


def least_squares_update(
    keys: torch.Tensor,
    residual: torch.Tensor,
    stats: SecondMoment,
    weight: float,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """MEMIT's ``ΔW = R Kᵀ (λC + K Kᵀ [+ prior])⁻¹`` (minimises ‖ΔW K − R‖² + λ‖ΔW‖²_C)."""
    k = keys.to(F64).cpu()
    r = residual.to(F64).cpu()
    a = weight * stats.matrix.cpu() + k @ k.T
    if prior is not None:
        a = a + prior.to(F64).cpu()
    return _spd_solve(a, k @ r.T, "MEMIT least squares").T


def equality_constrained_update(
    keys: torch.Tensor,
    residual: torch.Tensor,
    stats: SecondMoment,
    scale: float,
    ridge: float,
) -> torch.Tensor:
    """EMMET's ``ΔW = R (Kᵀ(λC)⁻¹K + ρI)⁻¹ Kᵀ(λC)⁻¹`` (ΔW K = R exactly when ρ = 0)."""
    k = keys.to(F64).cpu()
    r = residual.to(F64).cpu()
    cinv_k = stats.solve(k) / scale  # [d_mlp, n]
    gram = k.T @ cinv_k + ridge * torch.eye(k.shape[1], dtype=F64)
    coeff = _spd_solve(gram, r.T, "EMMET constraint system")  # [n, d_model]
    return _check(coeff.T @ cinv_k.T, "EMMET update")


def null_space_projector(stats: SecondMoment, rel_threshold: float) -> torch.Tensor:
    """AlphaEdit's projector onto directions where preserved keys have (almost) no energy.

    Eigenvectors of ``C`` whose eigenvalue is below ``rel_threshold × λ_max`` span the null space.
    """
    evals, evecs = torch.linalg.eigh(stats.matrix.to(F64).cpu())
    basis = evecs[:, evals < rel_threshold * evals.max()]
    if basis.shape[1] == 0:
        raise EditError(
            f"AlphaEdit: no eigenvalue of C below {rel_threshold}·λ_max at layer "
            f"{stats.layer}; raise nullspace_threshold"
        )
    return basis @ basis.T


def null_space_update(
    keys: torch.Tensor,
    residual: torch.Tensor,
    projector: torch.Tensor,
    past_kkt: torch.Tensor | None,
    l2: float,
) -> torch.Tensor:
    """AlphaEdit's ``ΔW = R Kᵀ P (P(K Kᵀ + K_p K_pᵀ) + l2·I)⁻¹`` (non-symmetric: LU solve)."""
    k = keys.to(F64).cpu()
    r = residual.to(F64).cpu()
    kkt = k @ k.T if past_kkt is None else k @ k.T + past_kkt.to(F64).cpu()
    a = projector @ kkt + l2 * torch.eye(k.shape[0], dtype=F64)
    x = torch.linalg.solve(a, projector @ k @ r.T)  # [d_mlp, d_model]
    return _check(x.T, "AlphaEdit update")
