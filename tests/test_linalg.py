"""Tests for ``kfqn_jax._src.linalg`` against independent float64 NumPy references."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfqn_jax._src import linalg

# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------

_EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Runs the test once in float32 (x64 off) and once in float64 (x64 on)."""
    ctx = jax.enable_x64(True) if request.param == "float64" else contextlib.nullcontext()
    with ctx:
        yield request.param


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _spd(rng: np.random.Generator, n: int, cond: float, scale: float = 1.0) -> np.ndarray:
    """Random SPD float64 matrix with eigenvalues log-spaced in [scale / cond, scale]."""
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    w = scale * np.logspace(0.0, -np.log10(cond), n)
    return (q * w) @ q.T


def _nonsym(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    """SPD matrix plus an antisymmetric part (which the functions must ignore)."""
    skew = rng.normal(size=(n, n))
    return _spd(rng, n, cond) + 0.3 * (skew - skew.T)


def _cast(x: np.ndarray, dtype: str) -> tuple[jax.Array, np.ndarray]:
    """The JAX input in ``dtype`` and the float64 NumPy copy of exactly that input."""
    xj = jnp.asarray(x, dtype=dtype)
    return xj, np.asarray(xj, dtype=np.float64)


def _sym(x: np.ndarray) -> np.ndarray:
    return (x + np.swapaxes(x, -1, -2)) / 2


def _np_inv_root(mat: np.ndarray, p: int, damping: float) -> np.ndarray:
    w, q = np.linalg.eigh(_sym(mat) + damping * np.eye(mat.shape[-1]))
    return (q * w ** (-1.0 / p)) @ q.T


def _rel_err(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _mean_eig(f: np.ndarray) -> np.ndarray:
    return np.trace(f, axis1=-2, axis2=-1) / f.shape[-1]


# Jitted once at module level so that parametrized cases sharing shapes reuse one compilation.
_jit_inverse = jax.jit(linalg.damped_cholesky_inverse)
_jit_solve = jax.jit(linalg.damped_cholesky_solve)
_jit_eigh = jax.jit(linalg.safe_eigh, static_argnames="clip_min")
_jit_root = jax.jit(
    linalg.inverse_pth_root, static_argnums=1, static_argnames=("method", "num_iters", "tol")
)


# ------------------------------------------------------------------------------------------------
# symmetrize / add_to_diagonal.
# ------------------------------------------------------------------------------------------------


def test_symmetrize_batched(dtype):
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 4))
    xj, x64_ = _cast(x, dtype)
    out = linalg.symmetrize(xj)
    assert out.dtype == jnp.dtype(dtype) and out.shape == x.shape
    np.testing.assert_allclose(out, (x64_ + np.swapaxes(x64_, -1, -2)) / 2, rtol=1e-6)
    np.testing.assert_array_equal(out, np.swapaxes(np.asarray(out), -1, -2))


@pytest.mark.parametrize("per_batch", [False, True])
def test_add_to_diagonal(dtype, per_batch):
    x = np.random.default_rng(1).normal(size=(3, 4, 4))
    value = np.array([0.5, 2.0, -1.0]) if per_batch else 0.7
    xj, x64_ = _cast(x, dtype)
    out = linalg.add_to_diagonal(xj, jnp.asarray(value, dtype=dtype))
    ref = x64_ + np.asarray(value)[..., None, None] * np.eye(4)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Damped Cholesky inverse and solve.
# ------------------------------------------------------------------------------------------------

_COND_CASES = [
    # (condition number of mat, damping)
    (1e1, 0.0),
    (1e3, 1e-2),
    (1e6, 1e-4),
    (1e8, 1e-4),
    (1e8, 1e-7),
]


@pytest.mark.parametrize(("cond", "damping"), _COND_CASES)
def test_damped_cholesky_inverse_matches_numpy(dtype, cond, damping):
    rng = np.random.default_rng(2)
    matj, mat = _cast(_nonsym(rng, 5, cond), dtype)
    ref_mat = _sym(mat) + damping * np.eye(5)
    ref = np.linalg.inv(ref_mat)
    out = _jit_inverse(matj, damping)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(out, np.swapaxes(np.asarray(out), -1, -2))
    kappa = np.linalg.cond(ref_mat)
    if _EPS[dtype] * kappa > 1e-2:  # float32 with no meaningful digits left: only check NaN-free.
        pytest.skip("problem too ill-conditioned for this dtype")
    assert _rel_err(out, ref) < 50 * _EPS[dtype] * kappa


def test_damped_cholesky_inverse_float32_undamped_ill_conditioned_is_finite_or_nan():
    # cond 1e8 in float32 may be numerically indefinite: the result is either a finite matrix
    # or NaN-flagged, never an exception.
    mat = jnp.asarray(_spd(np.random.default_rng(3), 5, 1e8), jnp.float32)
    out = _jit_inverse(mat, 0.0)
    flag = bool(linalg.is_finite(out))
    assert flag or bool(jnp.all(jnp.isnan(out)))


@pytest.mark.parametrize("damping", [1e-3, 0.5, 4.0])
def test_damped_cholesky_inverse_zero_matrix(dtype, damping):
    out = _jit_inverse(jnp.zeros((5, 5), dtype), damping)
    np.testing.assert_allclose(out, np.eye(5) / damping, rtol=10 * _EPS[dtype])


def test_damped_cholesky_inverse_batched_per_matrix_damping(dtype):
    rng = np.random.default_rng(4)
    mats = np.stack([_nonsym(rng, 5, c) for c in (1e1, 1e3, 1e5)])
    damping = np.array([1e-1, 1e-2, 1e-3])
    matsj, mats64 = _cast(mats, dtype)
    out = linalg.damped_cholesky_inverse(matsj, jnp.asarray(damping, dtype))
    assert out.shape == (3, 5, 5)
    for i in range(3):
        single = _jit_inverse(matsj[i], damping[i])
        np.testing.assert_allclose(out[i], single, rtol=1e-5 if dtype == "float32" else 1e-12)
        ref = np.linalg.inv(_sym(mats64[i]) + damping[i] * np.eye(5))
        assert _rel_err(out[i], ref) < 1e3 * _EPS[dtype] * np.linalg.cond(ref)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_damped_cholesky_inverse_nonfinite_input_gives_nan(dtype, bad):
    rng = np.random.default_rng(5)
    mats = np.stack([_spd(rng, 5, 10.0) for _ in range(3)])
    mats[1, 2, 0] = bad
    matsj, mats64 = _cast(mats, dtype)
    out = _jit_inverse(matsj, 0.1)
    assert bool(jnp.all(jnp.isnan(out[1])))
    assert not bool(linalg.is_finite(out))
    for i in (0, 2):  # the finite neighbours in the batch are untouched.
        ref = np.linalg.inv(mats64[i] + 0.1 * np.eye(5))
        assert _rel_err(out[i], ref) < 1e3 * _EPS[dtype]
    old = jnp.zeros_like(out)
    np.testing.assert_array_equal(linalg.where_finite(out, old), old)


def test_damped_cholesky_inverse_nonfinite_damping_gives_nan():
    out = _jit_inverse(jnp.eye(5), jnp.nan)
    assert bool(jnp.all(jnp.isnan(out)))


def test_damped_cholesky_inverse_indefinite_gives_nan(dtype):
    # diag(1, -1, ...) + 0.5 I is indefinite: Cholesky fails and must report NaN, not garbage.
    diag = np.array([1.0, -1.0, 2.0, 0.5, 3.0])
    mat = jnp.diag(jnp.asarray(diag, dtype))
    out = _jit_inverse(mat, 0.5)
    assert not bool(linalg.is_finite(out))
    # Enough damping makes it positive definite again.
    ref = np.linalg.inv(np.diag(diag) + 1.5 * np.eye(5))
    np.testing.assert_allclose(_jit_inverse(mat, 1.5), ref, rtol=1e-5)


@pytest.mark.parametrize("rhs_kind", ["vector", "matrix"])
@pytest.mark.parametrize("batched", [False, True])
def test_damped_cholesky_solve_matches_numpy(dtype, rhs_kind, batched):
    rng = np.random.default_rng(6)
    n, k = 5, 3
    batch = (3,) if batched else ()
    mats = np.stack([_nonsym(rng, n, 1e4) for _ in range(3)])
    mats = mats if batched else mats[0]
    rhs_shape = batch + ((n,) if rhs_kind == "vector" else (n, k))
    rhs = rng.normal(size=rhs_shape)
    damping = 1e-2
    matsj, mats64 = _cast(mats, dtype)
    rhsj, rhs64 = _cast(rhs, dtype)
    out = _jit_solve(matsj, rhsj, damping)
    assert out.shape == rhs.shape and out.dtype == jnp.dtype(dtype)
    a = _sym(mats64) + damping * np.eye(n)
    ref = np.linalg.solve(a, rhs64[..., None])[..., 0] if rhs_kind == "vector" else None
    if ref is None:
        ref = np.linalg.solve(a, rhs64)
    tol = 100 * _EPS[dtype] * np.max(np.linalg.cond(a))
    assert _rel_err(out, ref) < tol


def test_damped_cholesky_solve_broadcasts_and_flags_nan(x64):
    rng = np.random.default_rng(7)
    mats = np.stack([_spd(rng, 4, 1e2) for _ in range(3)])
    rhs = rng.normal(size=(4, 2))  # unbatched rhs shared by all three matrices.
    out = _jit_solve(mats, rhs[None], 0.1)
    assert out.shape == (3, 4, 2)
    for i in range(3):
        ref = np.linalg.solve(mats[i] + 0.1 * np.eye(4), rhs)
        np.testing.assert_allclose(out[i], ref, rtol=1e-10)
    mats[0, 0, 0] = np.nan
    out = _jit_solve(mats, rhs[None], 0.1)
    assert bool(jnp.all(jnp.isnan(out[0]))) and bool(linalg.is_finite(out[1:]))


def test_damped_cholesky_solve_bad_rank_raises():
    with pytest.raises(ValueError, match="rank"):
        linalg.damped_cholesky_solve(jnp.eye(3), jnp.ones((2, 2, 3, 1)), 0.1)


# ------------------------------------------------------------------------------------------------
# safe_eigh.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1e1, 1e6, 1e8])
def test_safe_eigh_matches_numpy(dtype, cond):
    rng = np.random.default_rng(8)
    matj, mat = _cast(_nonsym(rng, 5, cond), dtype)
    w, q = _jit_eigh(matj, clip_min=None)
    assert w.dtype == jnp.dtype(dtype) and q.dtype == jnp.dtype(dtype)
    w_ref = np.linalg.eigvalsh(_sym(mat))
    scale = np.max(np.abs(w_ref))
    np.testing.assert_allclose(w, w_ref, atol=50 * _EPS[dtype] * scale)
    q64, w64 = np.asarray(q, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(q64.T @ q64, np.eye(5), atol=50 * _EPS[dtype])
    np.testing.assert_allclose((q64 * w64) @ q64.T, _sym(mat), atol=50 * _EPS[dtype] * scale)


@pytest.mark.parametrize("clip_min", [0.0, 0.25, None])
def test_safe_eigh_clipping(dtype, clip_min):
    rng = np.random.default_rng(9)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    w_true = np.array([-2.0, -0.1, 0.1, 1.0, 3.0])
    matj, mat = _cast((q * w_true) @ q.T, dtype)
    w, _ = _jit_eigh(matj, clip_min=clip_min)
    ref = np.linalg.eigvalsh(mat)
    if clip_min is not None:
        ref = np.maximum(ref, clip_min)
    np.testing.assert_allclose(w, ref, atol=100 * _EPS[dtype])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_safe_eigh_nonfinite_batched(dtype, bad):
    rng = np.random.default_rng(10)
    mats = np.stack([_spd(rng, 5, 1e2) for _ in range(3)])
    mats[2, 1, 3] = bad
    matsj, mats64 = _cast(mats, dtype)
    w, q = _jit_eigh(matsj)
    assert bool(jnp.all(jnp.isnan(w[2])))
    np.testing.assert_array_equal(q[2], np.eye(5))
    assert not bool(linalg.is_finite((w, q)))
    for i in (0, 1):
        np.testing.assert_allclose(w[i], np.linalg.eigvalsh(mats64[i]), atol=50 * _EPS[dtype])
        single_w, _ = _jit_eigh(matsj[i])
        np.testing.assert_allclose(w[i], single_w, atol=10 * _EPS[dtype])


def test_safe_eigh_zero_matrix(dtype):
    w, q = _jit_eigh(jnp.zeros((5, 5), dtype))
    np.testing.assert_array_equal(w, np.zeros(5))
    np.testing.assert_allclose(np.asarray(q).T @ np.asarray(q), np.eye(5), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# inverse_pth_root.
# ------------------------------------------------------------------------------------------------

_ROOT_CASES = [
    # (cond, damping)
    (1e1, 0.0),
    (1e3, 1e-3),
    (1e6, 1e-4),
    (1e8, 1e-6),
]


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize(("cond", "damping"), _ROOT_CASES)
def test_inverse_pth_root_matches_numpy(dtype, method, p, cond, damping):
    rng = np.random.default_rng(11)
    matj, mat = _cast(_nonsym(rng, 5, cond), dtype)
    ref_mat = _sym(mat) + damping * np.eye(5)
    kappa = np.linalg.cond(ref_mat)
    if dtype == "float32" and kappa > 1e5:
        pytest.skip("float32 eigenvalues below eps * max are not resolved")
    ref = _np_inv_root(mat, p, damping)
    tol = 1e-14 if dtype == "float64" else 1e-6
    out = _jit_root(matj, p, damping, method=method, tol=tol)
    assert out.dtype == jnp.dtype(dtype) and out.shape == (5, 5)
    np.testing.assert_array_equal(out, np.swapaxes(np.asarray(out), -1, -2))
    # Perturbation of an inverse p-th root: relative error ~ eps * kappa / p.
    bound = 100 * _EPS[dtype] * kappa / p
    assert _rel_err(out, ref) < max(bound, 1e-10)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_pth_root_batched_and_jit(dtype, method):
    rng = np.random.default_rng(12)
    mats = np.stack([_spd(rng, 5, c, scale=s) for c, s in ((1e1, 1.0), (1e3, 1e3), (1e2, 1e-3))])
    damping = np.array([1e-2, 1e-1, 1e-6])
    matsj, mats64 = _cast(mats, dtype)
    tol = 1e-14 if dtype == "float64" else 1e-6
    out = _jit_root(matsj, 2, jnp.asarray(damping, dtype), method=method, tol=tol)
    assert out.shape == (3, 5, 5)
    rtol = 1e-10 if dtype == "float64" else 2e-4
    for i in range(3):
        ref = _np_inv_root(mats64[i], 2, damping[i])
        assert _rel_err(out[i], ref) < rtol
        single = _jit_root(matsj[i], 2, damping[i], method=method, tol=tol)
        assert _rel_err(out[i], np.asarray(single, np.float64)) < rtol


@pytest.mark.parametrize("method", ["eigh", "newton"])
@pytest.mark.parametrize("p", [1, 3])
def test_inverse_pth_root_zero_matrix_with_damping(dtype, method, p):
    damping = 0.3
    out = _jit_root(jnp.zeros((5, 5), dtype), p, damping, method=method)
    np.testing.assert_allclose(out, damping ** (-1.0 / p) * np.eye(5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_pth_root_zero_matrix_undamped_is_flagged(dtype, method):
    # No inverse root exists: the result must be flagged non-finite (like Cholesky), not a
    # silently huge matrix.
    out = _jit_root(jnp.zeros((5, 5), dtype), 2, 0.0, method=method)
    assert not bool(linalg.is_finite(out))
    assert not bool(linalg.is_finite(linalg.damped_cholesky_inverse(jnp.zeros((2, 2), dtype), 0)))


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_pth_root_nonfinite(dtype, method):
    rng = np.random.default_rng(13)
    mats = np.stack([_spd(rng, 5, 1e2) for _ in range(3)])
    mats[0, 0, 0] = np.nan
    mats[1, 2, 3] = np.inf
    matsj, mats64 = _cast(mats, dtype)
    out = _jit_root(matsj, 2, 0.1, method=method)
    assert bool(jnp.all(jnp.isnan(out[:2])))
    assert not bool(linalg.is_finite(out))
    rtol = 1e-5 if dtype == "float32" else 1e-6  # Newton's default tol is 1e-6.
    np.testing.assert_allclose(out[2], _np_inv_root(mats64[2], 2, 0.1), rtol=rtol, atol=rtol)


def test_inverse_pth_root_newton_respects_num_iters(x64):
    mat = _spd(np.random.default_rng(14), 5, 1e4)
    ref = _np_inv_root(mat, 2, 0.0)
    few = _jit_root(mat, 2, method="newton", num_iters=3, tol=0.0)
    many = _jit_root(mat, 2, method="newton", num_iters=100, tol=1e-14)
    assert _rel_err(many, ref) < 1e-10
    assert _rel_err(few, ref) > 1e-3  # stopped early: three steps cannot resolve cond 1e4.
    zero = _jit_root(mat, 2, method="newton", num_iters=0)
    z = 3 / (2 * np.linalg.norm(mat))  # X_0 = z^{1/p} I.
    np.testing.assert_allclose(zero, np.sqrt(z) * np.eye(5), rtol=1e-12)


def test_inverse_pth_root_methods_agree_float32():
    mat = jnp.asarray(_spd(np.random.default_rng(15), 5, 1e3), jnp.float32)
    a = _jit_root(mat, 4, 1e-3, method="eigh")
    b = _jit_root(mat, 4, 1e-3, method="newton")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"p": 0}, "p"), ({"p": 2.0}, "p"), ({"p": 2, "method": "qr"}, "method")],
)
def test_inverse_pth_root_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linalg.inverse_pth_root(jnp.eye(2), **kwargs)


# ------------------------------------------------------------------------------------------------
# is_finite / where_finite.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({"a": np.ones(3), "b": (np.zeros((2, 2)), np.arange(3))}, True),
        ({"a": np.ones(3), "b": (np.array([[0.0, np.nan]]), np.arange(3))}, False),
        ([np.array(np.inf)], False),
        ([np.array(-np.inf), np.ones(2)], False),
        ({}, True),
        ([np.array([True, False])], True),
    ],
)
def test_is_finite(tree, expected):
    tree = jax.tree.map(jnp.asarray, tree)
    out = jax.jit(linalg.is_finite)(tree)
    assert out.shape == () and out.dtype == jnp.bool_
    assert bool(out) is expected
    all_leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    assert expected is all(bool(np.all(np.isfinite(x))) for x in all_leaves)


@pytest.mark.parametrize("poison", [None, "a", "b"])
def test_where_finite_uses_one_global_flag(poison):
    new = {"a": jnp.ones(3), "b": jnp.full((2, 2), 2.0), "c": jnp.arange(3)}
    old = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2)), "c": -jnp.arange(3)}
    if poison == "b":
        new["b"] = new["b"].at[0, 1].set(jnp.nan)
    elif poison == "a":
        new["a"] = new["a"].at[2].set(-jnp.inf)
    out = jax.jit(linalg.where_finite)(new, old)
    expected = old if poison else new
    for key in new:
        assert out[key].dtype == new[key].dtype
        np.testing.assert_array_equal(out[key], expected[key])


# ------------------------------------------------------------------------------------------------
# pi damping.
# ------------------------------------------------------------------------------------------------


def test_pi_damping_matches_formula(dtype):
    rng = np.random.default_rng(16)
    a = _spd(rng, 4, 1e2, scale=30.0)
    g = _spd(rng, 6, 1e3, scale=0.02)
    aj, a64 = _cast(a, dtype)
    gj, g64 = _cast(g, dtype)
    damping = 1e-3
    da, dg = jax.jit(linalg.pi_damping)(aj, gj, damping)
    pi = np.sqrt((np.trace(a64) / 4) / (np.trace(g64) / 6))
    rtol = 1e-6 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(da, pi * np.sqrt(damping), rtol=rtol)
    np.testing.assert_allclose(dg, np.sqrt(damping) / pi, rtol=rtol)
    # Defining properties: the product is the total damping and each factor is damped in
    # proportion to its average eigenvalue.
    np.testing.assert_allclose(float(da) * float(dg), damping, rtol=rtol)
    np.testing.assert_allclose(float(da) / _mean_eig(a64), float(dg) / _mean_eig(g64), rtol=rtol)


@pytest.mark.parametrize("zero", ["a", "g", "both"])
def test_pi_damping_zero_trace_guard(zero):
    a = jnp.zeros((3, 3)) if zero in ("a", "both") else 5.0 * jnp.eye(3)
    g = jnp.zeros((2, 2)) if zero in ("g", "both") else 0.1 * jnp.eye(2)
    da, dg = linalg.pi_damping(a, g, 0.04)
    np.testing.assert_allclose([da, dg], [0.2, 0.2], rtol=1e-6)


def test_pi_damping_nan_propagates():
    a = jnp.eye(3).at[0, 0].set(jnp.nan)
    assert not bool(linalg.is_finite(linalg.pi_damping(a, jnp.eye(2), 0.1)))


def test_pi_damping_batched(x64):
    rng = np.random.default_rng(17)
    a = np.stack([_spd(rng, 3, 10.0, scale=s) for s in (1.0, 10.0, 0.0)])
    g = np.stack([_spd(rng, 2, 10.0, scale=s) for s in (1.0, 0.5, 3.0)])
    damping = np.array([0.1, 0.01, 0.5])
    da, dg = linalg.pi_damping(a, g, damping)
    assert da.shape == dg.shape == (3,)
    for i in range(3):
        ta, tg = _mean_eig(a[i]), _mean_eig(g[i])
        pi = np.sqrt(ta / tg) if ta > 1e-12 and tg > 1e-12 else 1.0
        np.testing.assert_allclose([da[i], dg[i]], [pi * damping[i] ** 0.5, damping[i] ** 0.5 / pi])


def test_pi_adjusted_damping_two_factors_equals_pi_damping(dtype):
    rng = np.random.default_rng(18)
    aj, _ = _cast(_spd(rng, 5, 1e2, scale=7.0), dtype)
    gj, _ = _cast(_spd(rng, 3, 1e2, scale=1e-3), dtype)
    da, dg = linalg.pi_damping(aj, gj, 0.3)
    out = linalg.pi_adjusted_damping([aj, gj], 0.3)
    assert len(out) == 2
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out[0], da, rtol=rtol)
    np.testing.assert_allclose(out[1], dg, rtol=rtol)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_pi_adjusted_damping_matches_formula(dtype, k):
    rng = np.random.default_rng(19)
    factors = [
        _spd(rng, d, 10.0, scale=s)
        for d, s in zip((2, 3, 4, 5), (1e2, 1e-3, 5.0, 0.2), strict=True)
    ]
    pairs = [_cast(f, dtype) for f in factors[:k]]
    damping = 0.05
    out = jax.jit(linalg.pi_adjusted_damping)([p[0] for p in pairs], damping)
    t = np.array([_mean_eig(p[1]) for p in pairs])
    c = np.prod(t) ** (1.0 / k)
    ref = damping ** (1.0 / k) * t / c
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(np.stack(out), ref, rtol=rtol)
    np.testing.assert_allclose(np.prod(np.asarray(out, np.float64)), damping, rtol=rtol)


def test_pi_adjusted_damping_log_space_avoids_overflow():
    # float32: the product of three traces of ~1e30 overflows, the log-space mean does not.
    factors = [jnp.asarray(s * np.eye(2), jnp.float32) for s in (1e30, 3e30, 2e30)]
    out = linalg.pi_adjusted_damping(factors, 1e-3)
    t = np.array([1e30, 3e30, 2e30])
    ref = 1e-3 ** (1 / 3) * t / np.exp(np.mean(np.log(t)))
    np.testing.assert_allclose(np.stack(out), ref, rtol=1e-5)


def test_pi_adjusted_damping_zero_guard_and_batch(x64):
    rng = np.random.default_rng(20)
    f1 = np.stack([_spd(rng, 3, 10.0, scale=s) for s in (2.0, 0.0)])
    f2 = np.stack([_spd(rng, 2, 10.0, scale=s) for s in (0.5, 1.0)])
    f3 = np.stack([_spd(rng, 4, 10.0, scale=s) for s in (9.0, 1.0)])
    out = linalg.pi_adjusted_damping([f1, f2, f3], 8e-3)
    assert all(o.shape == (2,) for o in out)
    t = np.array([_mean_eig(f[0]) for f in (f1, f2, f3)])
    np.testing.assert_allclose([o[0] for o in out], 0.2 * t / np.prod(t) ** (1 / 3))
    np.testing.assert_allclose([o[1] for o in out], [0.2, 0.2, 0.2])  # zero-trace batch entry.


def test_pi_adjusted_damping_empty_raises():
    with pytest.raises(ValueError):
        linalg.pi_adjusted_damping([], 0.1)


# ------------------------------------------------------------------------------------------------
# kron_mvp.
# ------------------------------------------------------------------------------------------------


def test_kron_mvp_matches_np_kron(dtype):
    rng = np.random.default_rng(21)
    d_in, d_out = 4, 3
    aj, a = _cast(_spd(rng, d_in, 10.0), dtype)
    gj, g = _cast(_spd(rng, d_out, 10.0), dtype)
    mj, m = _cast(rng.normal(size=(d_in, d_out)), dtype)
    out = jax.jit(linalg.kron_mvp)(aj, gj, mj)
    ref = (np.kron(a, g) @ m.reshape(-1)).reshape(d_in, d_out)
    assert out.shape == (d_in, d_out) and out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(out, ref, rtol=100 * _EPS[dtype], atol=100 * _EPS[dtype])


def test_kron_mvp_nonsymmetric_is_a_m_g(x64):
    rng = np.random.default_rng(22)
    a, g, m = rng.normal(size=(3, 3)), rng.normal(size=(2, 2)), rng.normal(size=(3, 2))
    out = linalg.kron_mvp(a, g, m)
    np.testing.assert_allclose(out, a @ m @ g, rtol=1e-12)
    np.testing.assert_allclose(out.reshape(-1), np.kron(a, g.T) @ m.reshape(-1), rtol=1e-12)


def test_kron_mvp_batched(x64):
    rng = np.random.default_rng(23)
    a = np.stack([_spd(rng, 3, 10.0) for _ in range(3)])
    g = np.stack([_spd(rng, 5, 10.0) for _ in range(3)])
    m = rng.normal(size=(3, 3, 5))
    out = linalg.kron_mvp(a, g, m)
    shared = linalg.kron_mvp(a[0], g[0], m)  # one pair of factors broadcast over a batch of m.
    for i in range(3):
        ref = (np.kron(a[i], g[i]) @ m[i].reshape(-1)).reshape(3, 5)
        np.testing.assert_allclose(out[i], ref, rtol=1e-12)
        ref0 = (np.kron(a[0], g[0]) @ m[i].reshape(-1)).reshape(3, 5)
        np.testing.assert_allclose(shared[i], ref0, rtol=1e-12)


def test_kron_mvp_shape_mismatch_raises():
    with pytest.raises(ValueError):
        linalg.kron_mvp(jnp.eye(3), jnp.eye(2), jnp.ones((2, 3)))


# ------------------------------------------------------------------------------------------------
# Gradients through the guarded ops.
# ------------------------------------------------------------------------------------------------


def test_damped_cholesky_inverse_gradient(x64):
    rng = np.random.default_rng(24)
    mat = _spd(rng, 4, 1e2)
    damping = 0.1

    def f(m):
        return jnp.sum(linalg.damped_cholesky_inverse(m, damping))

    grad = jax.jit(jax.grad(f))(mat)
    # d/dM 1^T (sym(M) + dI)^{-1} 1 = -u u^T with u = (M + dI)^{-1} 1 (M symmetric).
    u = np.linalg.solve(mat + damping * np.eye(4), np.ones(4))
    np.testing.assert_allclose(grad, -np.outer(u, u), rtol=1e-9)


def test_inverse_pth_root_eigh_gradient_is_finite(x64):
    mat = _spd(np.random.default_rng(25), 4, 1e2)
    grad = jax.jit(jax.grad(lambda m: jnp.sum(linalg.inverse_pth_root(m, 2, 0.1))))(mat)
    assert bool(linalg.is_finite(grad))
    # Central finite difference in a random symmetric direction.
    rng = np.random.default_rng(26)
    d = _sym(rng.normal(size=(4, 4)))
    h = 1e-6
    fd = (np.sum(_np_inv_root(mat + h * d, 2, 0.1)) - np.sum(_np_inv_root(mat - h * d, 2, 0.1))) / (
        2 * h
    )
    np.testing.assert_allclose(np.sum(np.asarray(grad) * d), fd, rtol=1e-6)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_pth_root_under_vmap_equals_batched(x64, method):
    rng = np.random.default_rng(27)
    mats = np.stack([_spd(rng, 5, c) for c in (1e1, 1e4, 1e2)])
    mats[1, 0, 0] = np.nan
    fn = functools.partial(linalg.inverse_pth_root, p=2, damping=1e-3, method=method, tol=1e-14)
    vmapped = jax.jit(jax.vmap(fn))(mats)
    batched = fn(mats)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-10)
    assert bool(jnp.all(jnp.isnan(vmapped[1])))
    for i in (0, 2):
        assert _rel_err(vmapped[i], _np_inv_root(mats[i], 2, 1e-3)) < 1e-10


@pytest.mark.parametrize("d", [5, 300, 700])
def test_gram_equals_plain_product_and_is_symmetric(d):
    x = np.random.default_rng(d).standard_normal((40, d))
    with jax.enable_x64(True):
        g = np.asarray(linalg.gram(jnp.asarray(x), block=128))
    np.testing.assert_allclose(g, x.T @ x, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(g, g.T)


@pytest.mark.parametrize("d", [5, 300, 700])
@pytest.mark.parametrize("append_one", [False, True])
def test_gram_with_diagonal_and_appended_ones_match_the_explicit_product(d, append_one):
    x = np.random.default_rng(d + 1).standard_normal((40, d))
    xh = np.concatenate([x, np.ones((40, 1))], axis=1) if append_one else x
    with jax.enable_x64(True):
        g, diag = linalg.gram(jnp.asarray(x), block=128, with_diagonal=True, append_one=append_one)
        plain = linalg.gram(jnp.asarray(x), block=128, append_one=append_one)
    g, diag = np.asarray(g), np.asarray(diag)
    assert g.shape == (d + append_one, d + append_one)
    np.testing.assert_allclose(g, xh.T @ xh, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_array_equal(diag, np.diagonal(g))
    np.testing.assert_array_equal(plain, g)
