"""Shampoo against dense float64 references (explicit np.kron of the inverse roots)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfqn_jax


def np_contraction(g, modes, i, diag=False):
    x = np.moveaxis(np.asarray(g, np.float64).reshape(modes), i, 0).reshape(modes[i], -1)
    c = x @ x.T
    return np.diag(np.diag(c)) if diag else c


def np_inv_root(mat, p):
    w, q = np.linalg.eigh(mat)
    return (q * w ** (-1.0 / p)) @ q.T


def np_kron(mats):
    out = np.ones((1, 1))
    for m in mats:
        out = np.kron(out, m)
    return out


def np_shampoo_direction(m, stats, eps, p):
    roots = [np_inv_root(s + eps * np.eye(len(s)), p) for s in stats]
    return (np_kron(roots) @ np.asarray(m, np.float64).reshape(-1)).reshape(np.shape(m))


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float64)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 3, 2, 3)])
def test_first_step_matches_dense_kron(shape):
    with jax.enable_x64(True):
        eps = 0.05
        g = _rand(0, shape)
        tx = kfqn_jax.scale_by_shampoo(eps, reshape="none", momentum=0.9)
        upd, state = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
        k = len(shape)
        stats = [np_contraction(g, shape, i) for i in range(k)]
        for s, s_ref in zip(state.factors["w"], stats, strict=True):
            np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-14)
        ref = np_shampoo_direction(g, stats, eps, 2 * k)
        assert upd["w"].dtype == jnp.float64
        np.testing.assert_allclose(upd["w"], ref, rtol=1e-9, atol=1e-12)


def test_newton_matches_eigh_and_root_order():
    with jax.enable_x64(True):
        eps, shape = 0.1, (4, 6)
        g = {"w": _rand(1, shape)}
        outs = []
        for method in ("eigh", "newton"):
            tx = kfqn_jax.scale_by_shampoo(
                eps, root_method=method, root_order=3, momentum=0.0, newton_tol=1e-12
            )
            outs.append(tx.update(g, tx.init(g))[0]["w"])
        stats = [np_contraction(g["w"], shape, i) for i in range(2)]
        ref = np_shampoo_direction(g["w"], stats, eps, 3)
        np.testing.assert_allclose(outs[0], ref, rtol=1e-9)
        np.testing.assert_allclose(outs[1], ref, rtol=1e-6)


def test_sum_statistics_momentum_and_diagonal_fallback():
    with jax.enable_x64(True):
        eps, mu, shape = 0.01, 0.5, (2, 7, 3)
        grads = [_rand(10 + i, shape) for i in range(2)]
        tx = kfqn_jax.scale_by_shampoo(
            eps, ema_decay=None, momentum=mu, inverse_every=1, reshape="none", max_dim=5
        )
        state = tx.init({"w": grads[0]})
        for g in grads:
            upd, state = tx.update({"w": g}, state)
        assert [f.shape for f in state.factors["w"]] == [(2, 2), (7,), (3, 3)]
        stats = [sum(np_contraction(g, shape, i, diag=(i == 1)) for g in grads) for i in range(3)]
        m = mu * np.asarray(grads[0]) + np.asarray(grads[1])
        np.testing.assert_allclose(upd["w"], np_shampoo_direction(m, stats, eps, 6), rtol=1e-9)


def test_grafting_takes_the_step_norm_of_the_graft():
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    grads = {
        "w": jax.random.normal(jax.random.key(2), (3, 4)),
        "b": jax.random.normal(jax.random.key(3), (4,)),
    }
    graft = optax.scale_by_adam()
    tx = kfqn_jax.scale_by_shampoo(1e-3, graft=graft)
    upd, state = tx.update(grads, tx.init(params), params)
    plain_tx = kfqn_jax.scale_by_shampoo(1e-3)
    plain, _ = plain_tx.update(grads, plain_tx.init(params), params)
    g_step, _ = graft.update(grads, graft.init(params))
    for name in ("w", "b"):
        np.testing.assert_allclose(
            jnp.linalg.norm(upd[name]), jnp.linalg.norm(g_step[name]), rtol=1e-5
        )
        # Same direction as ungrafted Shampoo.
        cos = jnp.vdot(upd[name], plain[name]) / (
            jnp.linalg.norm(upd[name]) * jnp.linalg.norm(plain[name])
        )
        np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
    assert int(state.graft_state.count) == 1
