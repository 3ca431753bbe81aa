"""Hessian-free and block-diagonal HF against dense float64 references.

The reference GGN is built explicitly: ``G = J^T H J`` with ``J`` from ``jax.jacfwd`` of the
flattened model and ``H`` the per-example loss Hessian divided by the number of examples
(the training loss is a mean). Solves are ``np.linalg.solve`` per block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfqn_jax
from kfqn_jax._src import ggn
from kfqn_jax._src import hessian_free as hf


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(5)(x))
        x = nn.tanh(nn.Dense(4, use_bias=False)(x))
        return nn.Dense(3)(x)


def _problem(seed=0, n=7, n_curv=5, dtype=jnp.float64):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    model = Net()
    x = jax.random.normal(k1, (n, 4), dtype)
    y = jax.random.randint(k2, (n,), 0, 3)
    x_curv = jax.random.normal(k3, (n_curv, 4), dtype)
    params = model.init(k4, x)["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    loss = kfqn_jax.losses.softmax_cross_entropy()
    return model, params, x, y, x_curv, loss


def _dense_ggn(model_fn, loss, params):
    """Explicit ``J^T H J`` of the mean loss, with flattened parameters."""
    flat, unravel = ravel_pytree(params)
    out = model_fn(params)
    jac = jax.jacfwd(lambda f: model_fn(unravel(f)).reshape(-1))(flat)  # (N*C, n)
    c = out.shape[-1]
    hess = loss.hessian(out).reshape(-1, c, c) / out.reshape(-1, c).shape[0]
    h_full = jax.scipy.linalg.block_diag(*hess)
    return np.asarray(jac.T @ h_full @ jac), unravel


def _block_index(params, blocks):
    """Per flat parameter, its block id, from the partition the transform uses."""
    bm = ggn.block_masks(params, blocks)
    ids = jax.tree_util.tree_unflatten(
        bm.treedef,
        [
            np.broadcast_to(np.asarray(i, np.float64), np.shape(p))
            for i, p in zip(bm.index, jax.tree.leaves(params), strict=True)
        ],
    )
    return np.asarray(ravel_pytree(ids)[0]).astype(int), bm.num_blocks


def test_ggn_vector_product_matches_dense():
    with jax.enable_x64(True):
        model, params, _, _, x_curv, loss = _problem()
        model_fn = lambda p: model.apply({"params": p}, x_curv)  # noqa: E731
        g_dense, unravel = _dense_ggn(model_fn, loss, params)
        v = jax.random.normal(jax.random.key(5), (g_dense.shape[0],), jnp.float64)
        _, gvp = ggn.linearize_ggn(model_fn, loss, params)
        got = ravel_pytree(gvp(unravel(v)))[0]
        np.testing.assert_allclose(got, g_dense @ np.asarray(v), rtol=1e-10, atol=1e-12)
        # A plain function of the outputs gives the same product.
        y = jnp.array([0, 1, 2, 1, 0])
        gvp_fn = ggn.linearize_ggn(model_fn, lambda z: loss(z, y), params)[1]
        np.testing.assert_allclose(
            ravel_pytree(gvp_fn(unravel(v)))[0], g_dense @ np.asarray(v), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("blocks", ["layer", "split"])
def test_block_products_match_dense_blocks(blocks):
    with jax.enable_x64(True):
        model, params, _, _, x_curv, loss = _problem(1)
        if blocks == "split":
            # Split the last kernel's columns into two blocks (like fused LSTM gates).
            def blocks(path, shape):
                if path[-2:] == ("Dense_2", "kernel"):
                    cols = np.where(np.arange(shape[1]) < 2, "out_a", "out_b")
                    return np.broadcast_to(cols[None, :], shape).copy()
                return path[:-1]

        model_fn = lambda p: model.apply({"params": p}, x_curv)  # noqa: E731
        g_dense, unravel = _dense_ggn(model_fn, loss, params)
        idx, k = _block_index(params, blocks)
        assert k == (3 if blocks == "layer" else 5)
        bm = ggn.block_masks(params, blocks)
        matvec = ggn.linearize_block_ggn(model_fn, loss, params, bm).matvec
        v = unravel(jax.random.normal(jax.random.key(2), (g_dense.shape[0],), jnp.float64))
        got = np.asarray(ravel_pytree(jax.jit(matvec)(v))[0])
        vf = np.asarray(ravel_pytree(v)[0])
        want = np.zeros_like(vf)
        for b in range(k):
            sel = idx == b
            want[sel] = g_dense[np.ix_(sel, sel)] @ vf[sel]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        # The per-block inner products and the expansion of per-block scalars.
        u = unravel(jax.random.normal(jax.random.key(4), (g_dense.shape[0],), jnp.float64))
        uf = np.asarray(ravel_pytree(u)[0])
        np.testing.assert_allclose(
            bm.inner(u, v), [np.dot(uf[idx == b], vf[idx == b]) for b in range(k)], rtol=1e-12
        )
        s = jnp.arange(1.0, k + 1.0)
        full = jax.tree.map(lambda e, a: jnp.broadcast_to(e, a.shape), bm.expand(s, v), v)
        np.testing.assert_array_equal(ravel_pytree(full)[0], idx + 1.0)


@pytest.mark.parametrize("precond", [False, True])
def test_block_cg_solves_each_block(precond):
    with jax.enable_x64(True):
        model, params, _, _, x_curv, loss = _problem(2)
        model_fn = lambda p: model.apply({"params": p}, x_curv)  # noqa: E731
        g_dense, unravel = _dense_ggn(model_fn, loss, params)
        n = g_dense.shape[0]
        lam = 0.05
        g = np.asarray(jax.random.normal(jax.random.key(3), (n,), jnp.float64))
        idx, k = _block_index(params, "layer")
        bm = ggn.block_masks(params, "layer")
        g_mv = ggn.linearize_block_ggn(model_fn, loss, params, bm).matvec

        def matvec(v):
            return jax.tree.map(lambda a, b: a + lam * b, g_mv(v), v)

        b = unravel(-jnp.asarray(g))
        x0 = jax.tree.map(jnp.zeros_like, b)
        pre = None
        if precond:
            pre = unravel(1.0 / jnp.asarray(np.linspace(0.5, 3.0, n)))
        res = hf.block_cg(matvec, b, x0, max_iters=3 * n, blocks=bm, progress_tol=0.0, precond=pre)
        got = np.asarray(ravel_pytree(res.x)[0])
        for bl in range(k):
            sel = idx == bl
            want = np.linalg.solve(g_dense[np.ix_(sel, sel)] + lam * np.eye(sel.sum()), -g[sel])
            np.testing.assert_allclose(got[sel], want, rtol=1e-7, atol=1e-9)
        # Per-block stopping: blocks stop on their own (p^T A p vanishes at different times).
        assert res.block_iters.shape == (k,)


def _solve_with_transform(factory, blocks, **kw):
    model, params, x, y, x_curv, loss = _problem(3)
    loss_fn = lambda p: loss(model.apply({"params": p}, x), y)  # noqa: E731
    model_fn = lambda p: model.apply({"params": p}, x_curv)  # noqa: E731
    lam = 0.1
    tx = factory(
        damping=lam,
        max_cg_iters=200,
        progress_tol=0.0,
        backtracking=False,
        line_search=False,
        **kw,
    )
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params)
    upd, state = jax.jit(
        lambda g, s, p: tx.update(g, s, p, model_fn=model_fn, output_loss=loss, loss_fn=loss_fn)
    )(grads, state, params)
    g_dense, _ = _dense_ggn(model_fn, loss, params)
    gf = np.asarray(ravel_pytree(grads)[0])
    idx, k = _block_index(params, blocks)
    want = np.zeros_like(gf)
    for b in range(k):
        sel = idx == b
        want[sel] = np.linalg.solve(g_dense[np.ix_(sel, sel)] + lam * np.eye(sel.sum()), -gf[sel])
    if kw.get("block_combination", "subspace") == "subspace" and k > 1:
        # Rescale the block solutions to minimise the full damped GN model on their span.
        cols = np.stack([np.where(idx == b, want, 0.0) for b in range(k)], axis=1)
        m = cols.T @ g_dense @ cols + lam * np.diag(np.sum(cols**2, axis=0))
        alpha = np.linalg.solve(m, -cols.T @ gf)
        want = cols @ alpha
    return np.asarray(ravel_pytree(upd)[0]), want, state


def test_hessian_free_step_is_damped_gauss_newton_solve():
    with jax.enable_x64(True):
        got, want, state = _solve_with_transform(kfqn_jax.hessian_free, "all")
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
        assert 0 < int(state[0].cg_iters) <= 200


def test_block_hessian_free_equals_independent_dense_solves():
    with jax.enable_x64(True):
        got, want, _ = _solve_with_transform(
            kfqn_jax.block_hessian_free, "layer", block_combination="sum"
        )
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
        full, _, _ = _solve_with_transform(kfqn_jax.hessian_free, "all")
        assert not np.allclose(got, full, rtol=1e-3)  # block-diagonal is a different model


def test_block_hessian_free_subspace_combination_matches_dense():
    with jax.enable_x64(True):
        got, want, _ = _solve_with_transform(kfqn_jax.block_hessian_free, "layer")
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
        summed, _, _ = _solve_with_transform(
            kfqn_jax.block_hessian_free, "layer", block_combination="sum"
        )
        assert not np.allclose(got, summed, rtol=1e-3)


def test_backtrack_grid_is_martens():
    assert hf.backtrack_grid(60) == (5, 7, 9, 11, 15, 19, 25, 32, 41, 54)
    assert hf.backtrack_grid(5) == ()


def test_relative_progress_rule_stops_early():
    # A well-conditioned diagonal system: CG converges and Martens' rule stops it long
    # before the cap, block by block.
    with jax.enable_x64(True):
        d = {"a": jnp.linspace(1.0, 2.0, 300), "b": jnp.linspace(1.0, 1e4, 300)}
        b = {"a": jnp.ones(300), "b": jnp.ones(300)}
        bm = ggn.block_masks(b, "leaf")
        res = hf.block_cg(
            lambda v: jax.tree.map(jnp.multiply, d, v),
            b,
            jax.tree.map(jnp.zeros_like, b),
            max_iters=200,
            blocks=bm,
        )
        iters = np.asarray(res.block_iters)
        assert 10 < iters[0] < iters[1] < 200
        assert int(res.iters) == iters[1]


def test_lm_damping_decreases_on_exact_quadratic_and_line_search_rejects():
    with jax.enable_x64(True):
        # Linear model + squared error: the GGN is the Hessian and rho = 1.
        w = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5], [0.0, 0.2]])}
        x = jnp.array([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [1.5, 0.2, 0.3], [0.0, 1.0, 1.0]])
        t = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5]])
        loss = kfqn_jax.losses.squared_error()
        model_fn = lambda p: x @ p["w"]  # noqa: E731
        loss_fn = lambda p: loss(model_fn(p), t)  # noqa: E731
        tx = kfqn_jax.hessian_free(damping=1.0, max_cg_iters=20)
        state = tx.init(w)
        g = jax.grad(loss_fn)(w)
        extra = dict(model_fn=model_fn, output_loss=loss, loss_fn=loss_fn)
        upd, state = tx.update(g, state, w, **extra)
        assert np.isclose(float(state[0].damping), 2.0 / 3.0)
        assert float(loss_fn(optax.apply_updates(w, upd))) < float(loss_fn(w))
        # A training loss that rises in every direction: every Armijo trial fails.
        bad = lambda p: loss_fn(p) + 1e14 * jnp.sum((p["w"] - w["w"]) ** 2)  # noqa: E731
        state = tx.init(w)
        upd, state = tx.update(g, state, w, **{**extra, "loss_fn": bad})
        assert float(state[0].step_size) == 0.0
        assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(upd))
        assert np.isclose(float(state[0].damping), 1.5)


def test_min_damping_floors_the_adaptive_damping():
    with jax.enable_x64(True):
        # Exact quadratic (rho = 1): the damping would fall by 2/3 per step; the floor holds it.
        x = jnp.array([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [1.5, 0.2, 0.3], [0.0, 1.0, 1.0]])
        t = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5]])
        w = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5], [0.0, 0.2]])}
        loss = kfqn_jax.losses.squared_error()
        model_fn = lambda p: x @ p["w"]  # noqa: E731
        loss_fn = lambda p: loss(model_fn(p), t)  # noqa: E731
        extra = dict(model_fn=model_fn, output_loss=loss, loss_fn=loss_fn)
        # The loss is a mean over 4 rows of 0.5 * squared error: GGN = kron(x^T x / 4, I_2).
        g_dense = np.kron(np.asarray(x).T @ np.asarray(x) / 4, np.eye(2))
        for factory in (kfqn_jax.hessian_free, kfqn_jax.block_hessian_free):
            kw = {} if factory is kfqn_jax.hessian_free else {"blocks": "leaf"}
            # damping below the floor starts at the floor and the step is solved with it.
            tx = factory(
                damping=1e-3,
                min_damping=0.5,
                max_cg_iters=20,
                backtracking=False,
                line_search=False,
                **kw,
            )
            state = tx.init(w)
            assert np.isclose(float(state[0].damping), 0.5)
            params = w
            for _ in range(3):
                g = jax.grad(loss_fn)(params)
                upd, state = tx.update(g, state, params, **extra)
                want = np.linalg.solve(g_dense + 0.5 * np.eye(6), -np.ravel(g["w"]))
                np.testing.assert_allclose(np.ravel(upd["w"]), want, rtol=1e-6, atol=1e-12)
                assert np.isclose(float(state[0].damping), 0.5)
                params = optax.apply_updates(params, upd)
        with pytest.raises(ValueError, match="min_damping"):
            kfqn_jax.hessian_free(min_damping=0.0)
        with pytest.raises(ValueError, match="min_damping"):
            kfqn_jax.block_hessian_free(min_damping=1e9)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="max_cg_iters"):
        kfqn_jax.hessian_free(max_cg_iters=0)
    with pytest.raises(ValueError, match="blocks"):
        kfqn_jax.block_hessian_free(blocks="gates")
    with pytest.raises(ValueError, match="damping"):
        kfqn_jax.hessian_free(damping=0.0)
    model, params, x, y, _, loss = _problem(4, dtype=jnp.float32)
    model_fn = lambda p: model.apply({"params": p}, x)  # noqa: E731
    loss_fn = lambda p: loss(model_fn(p), y)  # noqa: E731
    g = jax.grad(loss_fn)(params)
    tx = kfqn_jax.hessian_free(precondition=True, max_cg_iters=3)
    state = tx.init(params)
    with pytest.raises(ValueError, match="sq_grads"):
        tx.update(g, state, params, model_fn=model_fn, output_loss=loss, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, state, None, model_fn=model_fn, output_loss=loss, loss_fn=loss_fn)
    with pytest.raises(TypeError, match="output_loss"):
        tx.update(g, state, params, model_fn=model_fn, output_loss=3, loss_fn=loss_fn, sq_grads=g)
    with pytest.raises(TypeError, match="model_fn"):
        tx.update(g, state, params, model_fn=x, output_loss=loss, loss_fn=loss_fn, sq_grads=g)
