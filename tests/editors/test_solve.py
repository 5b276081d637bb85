"""The closed-form updates of ``repedit.editors.solve`` against brute force in float64.

Brute force may use ``torch.linalg.inv`` (fine in a test); the library must not. Shapes follow
the module: ``W`` is [d_model, d_mlp], keys ``K`` [d_mlp, n], residuals ``R`` [d_model, n].
"""

from __future__ import annotations

import warnings

import pytest
import torch

from numerics import solve_tolerance, tolerance
from repedit.editors.solve import (
    equality_constrained_update,
    least_squares_update,
    null_space_projector,
    null_space_update,
    rank_one_update,
)
from repedit.errors import EditError
from repedit.stats.second_moment import SecondMoment

F64 = torch.float64
D_MLP, D_MODEL = 12, 7
inv = torch.linalg.inv


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int = D_MLP, seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    """A random well-conditioned SPD matrix with eigenvalues spanning ``10**spread``."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    evals = torch.logspace(0, -spread, d, dtype=F64)
    return (q * evals) @ q.T


def _moment(c: torch.Tensor, layer: int = 3) -> SecondMoment:
    return SecondMoment(layer=layer, matrix=c, n_tokens=1000)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


#: the worst condition number of a system solved here: λC + KKᵀ with λ = 0.01 and C's
#: eigenvalues down to 10⁻³ is about 10⁶ (test_systems_are_as_conditioned_as_assumed checks it)
CONDITION = 1e7
#: the library's solve against a brute-force inverse, then up to three products (R Kᵀ (…)⁻¹)
TOL = solve_tolerance(F64, size=D_MLP, condition=CONDITION, products=3)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.numerics
def test_systems_are_as_conditioned_as_assumed() -> None:
    """The premise of ``TOL``: no system below is worse conditioned than ``CONDITION``."""
    systems = [_spd(seed=s) for s in (0, 4, 8, 12, 15, 20, 29, 32, 36, 39)]
    systems.append(_spd(seed=42, spread=4.0))
    c = _spd(seed=12)
    for n in (1, 3):
        k = _randn(D_MLP, n, seed=13)
        systems += [lam * c + k @ k.T for lam in (0.01, 2.0, 150.0)]
    assert max(float(torch.linalg.cond(a)) for a in systems) < CONDITION


# --------------------------------------------------------------------------- ROME / R-ROME


@pytest.mark.numerics
def test_rank_one_writes_the_residual_at_its_key() -> None:
    c = _spd()
    k_dir, k_res, r = _randn(D_MLP, seed=1), _randn(D_MLP, seed=2), _randn(D_MODEL, seed=3)
    delta = rank_one_update(_moment(c), k_dir, k_res, r)

    assert delta.shape == (D_MODEL, D_MLP) and delta.dtype == F64
    _close(delta @ k_res, r)
    # proportional to r (C⁻¹k_dir)ᵀ, scaled so that ΔW k_res = r
    u = inv(c) @ k_dir
    _close(delta, torch.outer(r, u) / (u @ k_res))
    assert torch.linalg.matrix_rank(delta) == 1


@pytest.mark.numerics
def test_rank_one_with_one_key_is_r_rome_and_ignores_the_scale_of_c() -> None:
    c = _spd(seed=4)
    k, r = _randn(D_MLP, seed=5), _randn(D_MODEL, seed=6)
    delta = rank_one_update(_moment(c), k, k, r)
    _close(delta @ k, r)
    _close(rank_one_update(_moment(123.0 * c), k, k, r), delta)
    # the response to any key is the whitened similarity share of the residual
    other = _randn(D_MLP, seed=7)
    beta = (other @ inv(c) @ k) / (k @ inv(c) @ k)
    _close(delta @ other, beta * r)


@pytest.mark.numerics
def test_rank_one_accepts_float32_inputs() -> None:
    c = _spd(seed=8)
    k, r = _randn(D_MLP, seed=9), _randn(D_MODEL, seed=10)
    delta = rank_one_update(_moment(c), k.float(), k.float(), r.float())
    assert delta.dtype == F64
    # k and r rounded to float32 once: ΔW k = r (u·k)/(u·k₃₂) with u = C⁻¹k, so the error is r's
    # rounding plus k's, amplified by the cancellation in u·k
    u = inv(c) @ k
    cancellation = float((u.abs() @ k.abs()) / (u @ k).abs())
    tol = tolerance(torch.float32, terms=D_MLP, paths=1, magnitude=cancellation)
    _close(delta @ k, r, tol=tol + TOL)


def test_rank_one_refuses_a_key_orthogonal_to_the_direction() -> None:
    c = torch.eye(D_MLP, dtype=F64)
    k_dir = torch.zeros(D_MLP, dtype=F64)
    k_dir[0] = 1.0
    k_res = torch.zeros(D_MLP, dtype=F64)
    k_res[1] = 1.0
    with pytest.raises(EditError, match="orthogonal"):
        rank_one_update(_moment(c), k_dir, k_res, _randn(D_MODEL, seed=11))


# --------------------------------------------------------------------------- MEMIT


def _memit_objective(delta, k, r, c, lam, prior=None) -> torch.Tensor:
    """‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) [+ tr(ΔW P ΔWᵀ)]: what least squares minimises."""
    fit = ((delta @ k - r) ** 2).sum()
    reg = lam * torch.trace(delta @ c @ delta.T)
    if prior is not None:
        reg = reg + torch.trace(delta @ prior @ delta.T)
    return fit + reg


@pytest.mark.numerics
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("lam", [0.01, 2.0, 150.0])
def test_least_squares_matches_brute_force_and_minimises(n: int, lam: float) -> None:
    c = _spd(seed=12)
    k, r = _randn(D_MLP, n, seed=13), _randn(D_MODEL, n, seed=14)
    delta = least_squares_update(k, r, _moment(c), lam)

    assert delta.shape == (D_MODEL, D_MLP) and delta.dtype == F64
    _close(delta, r @ k.T @ inv(lam * c + k @ k.T))
    best = _memit_objective(delta, k, r, c, lam)
    for seed in range(5):
        nudge = 1e-3 * _randn(D_MODEL, D_MLP, seed=100 + seed)
        assert _memit_objective(delta + nudge, k, r, c, lam) > best
    # the gradient of the objective vanishes at the solution
    grad = 2 * (delta @ k - r) @ k.T + 2 * lam * delta @ c
    scale = float((r.abs() @ k.abs().T).max() + lam * (delta.abs() @ c.abs()).max())
    assert grad.abs().max() < 2 * TOL * scale


@pytest.mark.numerics
def test_least_squares_with_a_prior() -> None:
    c, prior = _spd(seed=15), _spd(seed=16, spread=1.0)
    k, r = _randn(D_MLP, 2, seed=17), _randn(D_MODEL, 2, seed=18)
    delta = least_squares_update(k, r, _moment(c), 5.0, prior=prior)
    _close(delta, r @ k.T @ inv(5.0 * c + k @ k.T + prior))
    best = _memit_objective(delta, k, r, c, 5.0, prior)
    nudge = 1e-3 * _randn(D_MODEL, D_MLP, seed=19)
    assert _memit_objective(delta + nudge, k, r, c, 5.0, prior) > best


@pytest.mark.numerics
def test_least_squares_single_key_writes_the_sherman_morrison_share() -> None:
    """At k*, MEMIT writes R·s/(λ + s) with s = k*ᵀC⁻¹k* (method reference §1.6)."""
    c = _spd(seed=20)
    k, r = _randn(D_MLP, 1, seed=21), _randn(D_MODEL, 1, seed=22)
    lam = 3.0
    delta = least_squares_update(k, r, _moment(c), lam)
    s = float(k[:, 0] @ inv(c) @ k[:, 0])
    _close(delta @ k, r * s / (lam + s))


def test_least_squares_reports_a_singular_system() -> None:
    c = torch.zeros(D_MLP, D_MLP, dtype=F64)
    c[0, 0] = 1.0  # rank one: λC + KKᵀ is singular
    k, r = _randn(D_MLP, 1, seed=23), _randn(D_MODEL, 1, seed=24)
    with pytest.raises(EditError, match="positive definite"):
        least_squares_update(k, r, _moment(c), 1.0)


def test_non_finite_residual_is_reported() -> None:
    c = _spd(seed=25)
    k, r = _randn(D_MLP, 1, seed=26), _randn(D_MODEL, 1, seed=27)
    r[0, 0] = float("nan")
    with pytest.raises(EditError, match="finite"):
        least_squares_update(k, r, _moment(c), 1.0)
    with pytest.raises(EditError, match="finite"):
        equality_constrained_update(k, r, _moment(c), 1.0, 0.0)
    with pytest.raises(EditError, match="finite"):
        rank_one_update(_moment(c), k[:, 0], k[:, 0], r[:, 0])


def test_ill_conditioned_system_warns() -> None:
    evals = torch.logspace(0, -14, D_MLP, dtype=F64)
    c = torch.diag(evals)
    k = torch.zeros(D_MLP, 1, dtype=F64)
    k[0, 0] = 1e-3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        least_squares_update(k, _randn(D_MODEL, 1, seed=28), _moment(c), 1.0)
    assert any("ill-conditioned" in str(w.message) for w in caught)


# --------------------------------------------------------------------------- EMMET


@pytest.mark.numerics
@pytest.mark.parametrize("n", [1, 3])
def test_equality_constrained_meets_its_constraints_exactly(n: int) -> None:
    c = _spd(seed=29)
    k, r = _randn(D_MLP, n, seed=30), _randn(D_MODEL, n, seed=31)
    delta = equality_constrained_update(k, r, _moment(c), scale=7.0, ridge=0.0)
    _close(delta @ k, r)
    # brute force: R (Kᵀ(λC)⁻¹K)⁻¹ Kᵀ(λC)⁻¹, independent of λ without a ridge
    cinv = inv(7.0 * c)
    _close(delta, r @ inv(k.T @ cinv @ k) @ k.T @ cinv)
    _close(equality_constrained_update(k, r, _moment(c), scale=1.0, ridge=0.0), delta)


@pytest.mark.numerics
def test_equality_constrained_is_the_minimum_norm_solution() -> None:
    """Among all ΔW with ΔW K = R, EMMET's has the smallest tr(ΔW C ΔWᵀ)."""
    c = _spd(seed=32)
    k, r = _randn(D_MLP, 2, seed=33), _randn(D_MODEL, 2, seed=34)
    delta = equality_constrained_update(k, r, _moment(c), scale=1.0, ridge=0.0)
    # a perturbation that keeps the constraints: rows orthogonal to the keys
    q, _ = torch.linalg.qr(k, mode="complete")
    free = q[:, 2:]  # [d_mlp, d_mlp - 2], ⟂ span(K)
    nudge = 1e-2 * _randn(D_MODEL, D_MLP - 2, seed=35) @ free.T
    _close((delta + nudge) @ k, r)
    energy = lambda d: torch.trace(d @ c @ d.T)  # noqa: E731
    assert energy(delta + nudge) > energy(delta)


@pytest.mark.numerics
def test_equality_constrained_single_edit_equals_r_rome() -> None:
    c = _spd(seed=36)
    k, r = _randn(D_MLP, 1, seed=37), _randn(D_MODEL, 1, seed=38)
    emmet = equality_constrained_update(k, r, _moment(c), scale=1e5, ridge=0.0)
    r_rome = rank_one_update(_moment(c), k[:, 0], k[:, 0], r[:, 0])
    _close(emmet, r_rome)


@pytest.mark.numerics
def test_equality_constrained_with_ridge_matches_brute_force() -> None:
    c = _spd(seed=39)
    k, r = _randn(D_MLP, 3, seed=40), _randn(D_MODEL, 3, seed=41)
    lam, rho = 50.0, 0.1
    delta = equality_constrained_update(k, r, _moment(c), scale=lam, ridge=rho)
    cinv = inv(lam * c)
    _close(delta, r @ inv(k.T @ cinv @ k + rho * torch.eye(3, dtype=F64)) @ k.T @ cinv)
    # one edit: it writes r·s/(s + ρ) at k, with s = kᵀ(λC)⁻¹k (method reference §1.6)
    k1, r1 = k[:, :1], r[:, :1]
    s = float(k1[:, 0] @ cinv @ k1[:, 0])
    one = equality_constrained_update(k1, r1, _moment(c), scale=lam, ridge=rho)
    _close(one @ k1, r1 * s / (s + rho))


# --------------------------------------------------------------------------- AlphaEdit


def _projector_case(threshold: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = _spd(seed=42, spread=4.0)
    evals, evecs = torch.linalg.eigh(c)
    p = null_space_projector(_moment(c), threshold)
    return p, evals, evecs


@pytest.mark.numerics
def test_null_space_projector_is_an_orthogonal_projector() -> None:
    p, evals, evecs = _projector_case()
    _close(p @ p, p)
    _close(p, p.T)
    small = evals < 1e-2 * evals.max()
    assert 0 < int(small.sum()) < D_MLP
    assert round(float(torch.trace(p))) == int(small.sum())
    # it keeps the small-eigenvalue directions and removes the preserved (large) ones
    _close(p @ evecs[:, small], evecs[:, small])
    assert (p @ evecs[:, ~small]).abs().max() < TOL


def test_null_space_projector_without_a_null_space_raises() -> None:
    c = torch.eye(D_MLP, dtype=F64)
    with pytest.raises(EditError, match="nullspace_threshold"):
        null_space_projector(_moment(c), 1e-2)


@pytest.mark.numerics
@pytest.mark.parametrize("with_past", [False, True])
def test_null_space_update_leaves_preserved_keys_alone(with_past: bool) -> None:
    p, evals, evecs = _projector_case()
    preserved = evecs[:, evals >= 1e-2 * evals.max()]  # keys C says general text uses
    n = 2
    k, r = _randn(D_MLP, n, seed=43), _randn(D_MODEL, n, seed=44)
    past = None
    if with_past:
        kp = _randn(D_MLP, 3, seed=45)
        past = kp @ kp.T
    l2 = 0.5
    delta = null_space_update(k, r, p, past, l2)

    assert delta.shape == (D_MODEL, D_MLP) and delta.dtype == F64
    # rows lie in the null space: ΔW·k0 = 0 for every preserved key, and ΔW P = ΔW
    k0 = preserved @ _randn(preserved.shape[1], 5, seed=46)
    assert (delta @ k0).abs().max() < TOL * float(delta.abs().max() * k0.abs().sum(0).max())
    _close(delta @ p, delta)
    # brute force, in the paper's form: R Kᵀ P (KKᵀP [+ K_pK_pᵀP] + l2·I)⁻¹
    kkt = k @ k.T + (past if past is not None else 0)
    _close(delta, r @ k.T @ p @ inv(kkt @ p + l2 * torch.eye(D_MLP, dtype=F64)))


@pytest.mark.numerics
def test_null_space_update_with_full_projector_is_ridge_regression() -> None:
    """With P = I AlphaEdit is plain ridge least squares: ΔW = R Kᵀ(KKᵀ + l2·I)⁻¹."""
    k, r = _randn(D_MLP, 2, seed=47), _randn(D_MODEL, 2, seed=48)
    eye = torch.eye(D_MLP, dtype=F64)
    delta = null_space_update(k, r, eye, None, 0.3)
    _close(delta, least_squares_update(k, r, _moment(eye), 0.3))


@pytest.mark.numerics
def test_null_space_update_writes_the_edit_when_the_key_is_in_the_null_space() -> None:
    """A key inside range(P) with a small l2 gets (almost) its whole residual."""
    p, evals, evecs = _projector_case()
    k = evecs[:, evals < 1e-2 * evals.max()][:, :1] * 3.0  # in the null space
    r = _randn(D_MODEL, 1, seed=49)
    delta = null_space_update(k, r, p, None, 1e-6)
    _close(delta @ k, r, tol=1e-5)


# --------------------------------------------------------------------------- companions


@pytest.mark.numerics
def test_solve_comparison_catches_a_dropped_prior() -> None:
    """MEMIT with the prior left out of the system differs by far more than ``TOL``."""
    c, prior = _spd(seed=15), _spd(seed=16, spread=1.0)
    k, r = _randn(D_MLP, 2, seed=17), _randn(D_MODEL, 2, seed=18)
    delta = least_squares_update(k, r, _moment(c), 5.0)  # the bug: no prior
    with pytest.raises(AssertionError):
        _close(delta, r @ k.T @ inv(5.0 * c + k @ k.T + prior))


@pytest.mark.numerics
def test_solve_comparison_catches_the_wrong_key() -> None:
    """A rank-one update scaled at the direction key instead of the residual key is caught."""
    c = _spd()
    k_dir, k_res, r = _randn(D_MLP, seed=1), _randn(D_MLP, seed=2), _randn(D_MODEL, seed=3)
    delta = rank_one_update(_moment(c), k_dir, k_dir, r)  # the bug: k_dir where k_res belongs
    u = inv(c) @ k_dir
    with pytest.raises(AssertionError):
        _close(delta, torch.outer(r, u) / (u @ k_res))
