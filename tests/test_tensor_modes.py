"""The tensor-mode machinery shared by TNT and Shampoo (``tensor_modes.py``), the per-leaf
blocks of both methods, and the aliases' coupled ``l2_reg`` against decoupled
``weight_decay``, each against an independent dense float64 reference in numpy (explicit
unfoldings, ``np.kron`` on the row-major vectorisation, eigendecompositions)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfqn_jax
from kfqn_jax._src import extra_args
from kfqn_jax._src import shampoo as shampoo_lib
from kfqn_jax._src import tensor_modes as tm
from kfqn_jax._src import tnt as tnt_lib

# ------------------------------------------------------------------------------------------------
# Dense float64 references.
# ------------------------------------------------------------------------------------------------


def _rng(seed):
    return np.random.default_rng(seed)


def np_unfold(x, i):
    """The mode-``i`` unfolding ``X_(i)`` (``d_i × N/d_i``)."""
    return np.moveaxis(x, i, 0).reshape(x.shape[i], -1)


def np_fold(mat, i, shape):
    moved = [shape[i]] + [d for j, d in enumerate(shape) if j != i]
    return np.moveaxis(mat.reshape(moved), 0, i)


def np_kron(mats):
    out = np.ones((1, 1))
    for m in mats:
        out = np.kron(out, m)
    return out


def np_inv_root(mat, eps, p):
    w, q = np.linalg.eigh(0.5 * (mat + mat.T) + eps * np.eye(len(mat)))
    return (q * w ** (-1.0 / p)) @ q.T


def np_tnt_inverses(stats, modes, eps):
    """``(U_i + ε I)^{-1}`` with the same-trace normalisation written from the paper."""
    k, n = len(modes), math.prod(modes)
    c = (np.trace(stats[0]) / n) ** (1.0 / k)
    us = [s / (c ** (k - 1) * (n // d)) for s, d in zip(stats, modes, strict=True)]
    return [np.linalg.inv(u + eps * np.eye(len(u))) for u in us]


# ------------------------------------------------------------------------------------------------
# Layouts, contractions, mode products.
# ------------------------------------------------------------------------------------------------


def test_layouts_with_a_callable_reshape_and_max_dim():
    tree = {"a": jnp.zeros((2, 3, 4, 5)), "b": jnp.zeros((1, 6)), "c": jnp.zeros(())}
    layouts = tm.layouts_of(tree, "filter_flattening", max_dim=5)
    assert [lo.modes for lo in layouts] == [(6, 4, 5), (6,), (1,)]
    assert [lo.full for lo in layouts] == [(False, True, True), (False,), (True,)]
    assert [lo.shape for lo in layouts] == [(2, 3, 4, 5), (1, 6), ()]
    seen = []

    def split(path, shape):
        seen.append(path)
        return (math.prod(shape),)

    flat = tm.layouts_of(tree, split, max_dim=None)
    assert [lo.modes for lo in flat] == [(120,), (6,), (1,)] and len(seen) == 3
    with pytest.raises(ValueError, match="whose product"):
        tm.mode_sizes((), (2, 3), lambda p, s: (5,))


@pytest.mark.parametrize(
    "shape,full",
    [((4, 3, 5), (True, True, True)), ((6, 2, 3), (True, False, True)), ((7,), (False,))],
)
def test_mode_contractions_match_unfoldings(shape, full):
    with jax.enable_x64(True):
        x = _rng(0).standard_normal(shape)
        layout = tm.ModeLayout(shape, shape, full)
        cs, ds = tm.mode_contractions(jnp.asarray(x), layout, with_diagonals=True)
        moments = tm.mode_moments(jnp.asarray(x, jnp.float32), layout, jnp.float64)
        for i, f in enumerate(full):
            xi = np_unfold(x, i)
            ref = xi @ xi.T if f else np.sum(xi * xi, axis=1)
            np.testing.assert_allclose(cs[i], ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(ds[i], np.diag(ref) if f else ref, rtol=1e-12)
            assert moments[i].value.dtype == jnp.float64
            np.testing.assert_allclose(moments[i].value, ref, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(
                moments[i].diagonal, jnp.diagonal(moments[i].value) if f else moments[i].value
            )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mode_product_matches_the_unfolding(axis):
    with jax.enable_x64(True):
        shape = (3, 4, 5)
        x = _rng(1).standard_normal(shape)
        mat = _rng(2).standard_normal((shape[axis], shape[axis]))  # not symmetric
        got = tm.mode_product(jnp.asarray(x), jnp.asarray(mat), axis, True)
        ref = np_fold(mat.T @ np_unfold(x, axis), axis, shape)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
        vec = _rng(3).standard_normal(shape[axis])
        got = tm.mode_product(jnp.asarray(x), jnp.asarray(vec), axis, False)
        ref = np_fold(np.diag(vec) @ np_unfold(x, axis), axis, shape)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_precondition_of_a_three_mode_tensor_is_the_kronecker_product():
    with jax.enable_x64(True):
        shape = (2, 3, 4)
        full = (True, False, True)
        x = _rng(4).standard_normal((4, 6))  # a leaf reshaped to the modes
        mats = [_rng(5 + i).standard_normal((d, d)) for i, d in enumerate(shape)]
        args = [jnp.asarray(m if f else np.diag(m)) for m, f in zip(mats, full, strict=True)]
        dense = [m if f else np.diag(np.diag(m)) for m, f in zip(mats, full, strict=True)]
        layout = tm.ModeLayout((4, 6), shape, full)
        got = tm.precondition(jnp.asarray(x), args, layout)
        assert got.shape == (4, 6)
        ref = np_kron([m.T for m in dense]) @ x.reshape(-1)  # row-major vec
        np.testing.assert_allclose(np.asarray(got).reshape(-1), ref, rtol=1e-12, atol=1e-12)


def test_init_factors_and_traces():
    layout = tm.ModeLayout((3, 5), (3, 5), (True, False))
    zeros = tm.init_factors(layout, jnp.float32, "zeros")
    eye = tm.init_factors(layout, jnp.float32, "eye")
    assert [z.shape for z in zeros] == [(3, 3), (5,)] and not any(np.any(z) for z in zeros)
    np.testing.assert_array_equal(eye[0], np.eye(3))
    np.testing.assert_array_equal(eye[1], np.ones(5))
    m = _rng(6).standard_normal((3, 3))
    np.testing.assert_allclose(tm.trace_of(jnp.asarray(m), True), np.trace(m), rtol=1e-6)
    np.testing.assert_allclose(tm.trace_of(jnp.asarray(m[0]), False), m[0].sum(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Moving averages and the per-step loops.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm_start", [False, True])
def test_ema_weight_and_fold(warm_start):
    with jax.enable_x64(True):
        beta = 0.75
        for n in range(6):
            w = tm.ema_weight(beta, jnp.asarray(n), jnp.float64, warm_start)
            ref = 1 / (n + 1) if warm_start else max(1 - beta, 1 / (n + 1))
            np.testing.assert_allclose(w, ref, rtol=1e-15)
        old = (jnp.asarray(_rng(7).standard_normal((3, 3))), jnp.asarray(_rng(8).random(4)))
        new = [_rng(9).standard_normal((3, 3)), _rng(10).random(4)]
        moments = tuple(
            tm.Moment(jnp.asarray(c), jnp.asarray(np.diag(c) if c.ndim == 2 else c)) for c in new
        )
        w = 0.3
        assert bool(tm.ema_fold_ok(old, moments, w))
        folded = tm.ema_fold(old, moments, w, jnp.asarray(True))
        for f, o, c in zip(folded, old, new, strict=True):
            np.testing.assert_allclose(f, 0.7 * np.asarray(o) + 0.3 * c, rtol=1e-14)
        kept = tm.ema_fold(old, moments, w, jnp.asarray(False))
        for f, o in zip(kept, old, strict=True):
            np.testing.assert_array_equal(f, o)
        bad = (moments[0], tm.Moment(moments[1].value, moments[1].diagonal.at[2].set(np.inf)))
        assert not bool(tm.ema_fold_ok(old, bad, w))


def test_refresh_due_schedule():
    t2 = 4
    for count in range(13):
        for do_stats in (False, True):
            ref = count % t2 == 0 or (count < t2 and do_stats)
            got = tm.refresh_due(jnp.asarray(count), t2, jnp.asarray(do_stats))
            assert bool(got) == ref, (count, do_stats)


class _ScaleBlock:
    """A block whose roots are ``scale * factors`` and whose direction is ``roots[0] * x``."""

    def __init__(self, scale):
        self.scale = scale

    def refresh(self, factors, damping):
        return tuple(self.scale * f + damping for f in factors)

    def precondition(self, roots, x):
        return roots[0] * x


@pytest.mark.parametrize("always", [False, True])
def test_refresh_leaves_keeps_old_roots_unless_due_and_finite(always):
    blocks = [_ScaleBlock(2.0), _ScaleBlock(jnp.nan)]
    factors = [(jnp.full((2,), 3.0),), (jnp.full((2,), 5.0),)]
    roots = [(jnp.ones(2),), (jnp.ones(2),)]
    for due in (True, False):
        out = tm.refresh_leaves(blocks, factors, roots, jnp.asarray(due), 0.5, always)
        want0 = 6.5 if (due or always) else 1.0
        np.testing.assert_array_equal(out[0][0], np.full(2, want0))
        np.testing.assert_array_equal(out[1][0], np.ones(2))  # non-finite refresh rejected


def test_precondition_leaves_momentum_and_gating():
    blocks = [_ScaleBlock(1.0), _ScaleBlock(1.0)]
    leaves = [jnp.asarray([1.0, 2.0], jnp.bfloat16), jnp.asarray([3.0])]
    roots = [(jnp.asarray([2.0, 3.0]),), (jnp.asarray([0.5]),)]
    mom = {"a": jnp.asarray([1.0, -1.0]), "b": jnp.asarray([4.0])}
    dirs, new = tm.precondition_leaves(blocks, leaves, roots, mom, 0.5)
    np.testing.assert_allclose(dirs[0], [2.0 * 1.5, 3.0 * 1.5])
    np.testing.assert_allclose(dirs[1], [0.5 * 5.0])
    assert dirs[0].dtype == jnp.float32
    np.testing.assert_allclose(new[0], [1.5, 1.5])
    _, kept = tm.precondition_leaves(blocks, leaves, roots, mom, 0.5, jnp.asarray(False))
    np.testing.assert_array_equal(kept[1], mom["b"])
    dirs, none = tm.precondition_leaves(blocks, leaves, roots, mom, 0.0)
    assert none == [] and np.allclose(dirs[1], [1.5])
    assert tm.every(1, jnp.asarray(False), lambda x: x + 1, lambda x: x, 1) == 2
    assert int(tm.every(2, jnp.asarray(False), lambda x: x + 1, lambda x: x, 1)) == 1


# ------------------------------------------------------------------------------------------------
# The methods' blocks.
# ------------------------------------------------------------------------------------------------


def test_tnt_block_against_dense_reference():
    with jax.enable_x64(True):
        shape, eps = (3, 2, 4), 0.2
        g = _rng(11).standard_normal(shape)
        block = tnt_lib.TNTBlock(tm.ModeLayout(shape, shape, (True,) * 3), "constant")
        init = block.init(jnp.float64)
        assert init.grad_shape == shape and not any(np.any(f) for f in init.factors)
        moments = block.statistics(jnp.asarray(g), jnp.float64)
        stats = block.accumulate(init.factors, moments, jnp.asarray(1.0), jnp.asarray(True))
        inv = block.refresh(stats, eps)
        ref = np_tnt_inverses([np_unfold(g, i) @ np_unfold(g, i).T for i in range(3)], shape, eps)
        for a, b in zip(inv, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        x = _rng(12).standard_normal(shape)
        got = block.precondition(inv, jnp.asarray(x))
        np.testing.assert_allclose(
            np.asarray(got).reshape(-1), np_kron(ref) @ x.reshape(-1), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("ema_decay", [None, 0.6])
def test_shampoo_block_against_dense_reference(ema_decay):
    with jax.enable_x64(True):
        shape, eps, p = (4, 3), 1e-2, 4
        gs = [_rng(13 + i).standard_normal(shape) for i in range(3)]
        block = shampoo_lib.ShampooBlock(
            tm.ModeLayout(shape, shape, (True, True)), ema_decay, p, "eigh", 100, 1e-6
        )
        stats = block.init(jnp.float64).factors
        ref = [np.zeros((4, 4)), np.zeros((3, 3))]
        for n, g in enumerate(gs):
            moments = block.statistics(jnp.asarray(g), jnp.float64)
            stats = block.accumulate(stats, moments, jnp.asarray(n))
            w = 1.0 if ema_decay is None else max(1 - ema_decay, 1 / (n + 1))
            keep = 1.0 if ema_decay is None else 1 - w
            ref = [keep * r + w * np_unfold(g, i) @ np_unfold(g, i).T for i, r in enumerate(ref)]
        for a, b in zip(stats, ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12)
        roots = block.refresh(stats, eps)
        for a, b in zip(roots, ref, strict=True):
            np.testing.assert_allclose(a, np_inv_root(b, eps, p), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# The aliases: coupled l2_reg against decoupled weight_decay, warm starts, requirements.
# ------------------------------------------------------------------------------------------------


def _problem(seed):
    r = _rng(seed)
    theta = r.standard_normal((3, 4))
    return theta, r.standard_normal((3, 4)), r.standard_normal((3, 4))


def test_tnt_l2_reg_against_weight_decay_by_hand():
    with jax.enable_x64(True):
        theta, g, gs = _problem(20)
        lr, lam, eps = 0.1, 0.3, 0.2
        stats = [gs @ gs.T, gs.T @ gs]
        p1, p2 = np_tnt_inverses(stats, (3, 4), eps)

        def direction(m):  # Δ = m ×_1 P_1 ×_2 P_2 = P_1 m P_2 (symmetric P_i)
            return p1 @ m @ p2

        def first_update(**kw):
            tx = kfqn_jax.tnt(lr, eps, momentum=0.0, **kw)
            params = {"w": jnp.asarray(theta)}
            upd, state = tx.update(
                {"w": jnp.asarray(g)}, tx.init(params), params, sampled_grads={"w": jnp.asarray(gs)}
            )
            return np.asarray(upd["w"]), state

        coupled, state = first_update(l2_reg=lam)
        np.testing.assert_allclose(coupled, -lr * direction(g + lam * theta), rtol=1e-10)
        assert isinstance(state[1], kfqn_jax.ScaleByTNTState) and len(state) == 3
        decoupled, state = first_update(weight_decay=lam)
        np.testing.assert_allclose(
            decoupled, -lr * (direction(g) + lam * theta), rtol=1e-10, atol=1e-12
        )
        assert isinstance(state[0], kfqn_jax.ScaleByTNTState) and len(state) == 3
        plain, state = first_update()
        np.testing.assert_allclose(plain, -lr * direction(g), rtol=1e-10)
        assert isinstance(state[0], kfqn_jax.ScaleByTNTState) and len(state) == 2
        assert not np.allclose(coupled, decoupled)


def test_tnt_warm_start_reaches_the_method_behind_l2_reg():
    theta, g, gs = _problem(21)
    tx = kfqn_jax.tnt(0.1, 0.1, l2_reg=0.5)
    params = {"w": jnp.asarray(theta, jnp.float32)}
    grads, sampled = {"w": jnp.asarray(g, jnp.float32)}, {"w": jnp.asarray(gs, jnp.float32)}
    upd, state = tx.update(grads, tx.init(params), params, sampled_grads=sampled, warm_start=True)
    assert not np.any(np.asarray(upd["w"]))
    assert int(state[1].stats_count) == 1 and int(state[1].count) == 0
    np.testing.assert_allclose(state[1].factors["w"][0], gs @ gs.T, rtol=1e-5)


def test_shampoo_l2_reg_and_warm_start_by_hand():
    with jax.enable_x64(True):
        theta, g, g0 = _problem(22)
        lr, lam, eps = 0.1, 0.3, 1e-2
        tx = kfqn_jax.shampoo(lr, eps, l2_reg=lam, momentum=0.0, ema_decay=0.9)
        params = {"w": jnp.asarray(theta)}
        upd, state = tx.update({"w": jnp.asarray(g0)}, tx.init(params), params, warm_start=True)
        assert not np.any(np.asarray(upd["w"]))
        assert int(state[1].count) == 0 and int(state[1].stats_count) == 1
        np.testing.assert_allclose(state[1].factors["w"][0], g0 @ g0.T, rtol=1e-12)
        upd, state = tx.update({"w": jnp.asarray(g)}, state, params)
        c = g + lam * theta  # coupled: the statistics and the direction see g + λ θ
        w = max(1 - 0.9, 1 / 2)
        left = (1 - w) * g0 @ g0.T + w * c @ c.T
        right = (1 - w) * g0.T @ g0 + w * c.T @ c
        ref = np_inv_root(left, eps, 4) @ c @ np_inv_root(right, eps, 4)
        np.testing.assert_allclose(upd["w"], -lr * ref, rtol=1e-8, atol=1e-10)


def test_declared_requirements_follow_the_fisher():
    params = {"w": jnp.ones((3, 2))}
    true = kfqn_jax.requirements(kfqn_jax.scale_by_tnt(), params)
    assert true.extra_args == (extra_args.SAMPLED_GRADS,) and true.sampled == "grads"
    emp = kfqn_jax.requirements(kfqn_jax.scale_by_tnt(fisher="empirical"), params)
    assert emp == extra_args.Requirements()
    assert kfqn_jax.requirements(kfqn_jax.scale_by_shampoo(), params) == extra_args.Requirements()
    # The empirical Fisher really reads nothing: it runs without sampled_grads.
    tx = optax.chain(kfqn_jax.scale_by_tnt(fisher="empirical"))
    upd, _ = tx.update(params, tx.init(params))
    assert np.all(np.isfinite(np.asarray(upd["w"])))
