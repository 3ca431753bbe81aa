"""Block CG (kfqn_jax._src.cg) and the named steps of Hessian-free against dense float64
references written independently here: numpy CG and ``np.linalg.solve`` per block, the GGN
built from per-example Jacobians, and Martens' rules as plain Python."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfqn_jax
from kfqn_jax._src import cg, ggn
from kfqn_jax._src import hessian_free as hf

# ---------------------------------------------------------------------------------------------
# Block CG on an explicit SPD block-diagonal matrix.


def _labels(path, shape):
    # Leaf "a" split element-wise into two blocks, leaf "b" whole in a third.
    if path == ("a",):
        return np.where(np.arange(shape[0]) < 4, "a_lo", "a_hi")
    return "b"


def _block_system(seed):
    rng = np.random.default_rng(seed)
    like = {"a": jnp.zeros(8), "b": jnp.zeros((3, 3))}
    bm = ggn.block_masks(like, _labels)
    leaves = [np.broadcast_to(np.asarray(i, float), np.shape(a)) for i, a in
              zip(bm.index, jax.tree.leaves(like), strict=True)]  # fmt: skip
    ids = jax.tree_util.tree_unflatten(bm.treedef, leaves)
    idx = np.asarray(ravel_pytree(ids)[0]).astype(int)
    n = idx.size
    a = np.zeros((n, n))
    for blk in range(bm.num_blocks):
        sel = np.flatnonzero(idx == blk)
        q = rng.normal(size=(sel.size, sel.size))
        a[np.ix_(sel, sel)] = q @ q.T + 0.5 * np.eye(sel.size)
    _, unravel = ravel_pytree(like)
    return bm, idx, a, unravel, rng


def _numpy_pcg(a, b, x, minv, iters):
    """Textbook preconditioned CG on one block; the iterates x_0 ... x_iters."""
    r = a @ x - b
    y = minv * r
    p = -y
    out = [x.copy()]
    for _ in range(iters):
        ap = a @ p
        alpha = (r @ y) / (p @ ap)
        x = x + alpha * p
        r_new = r + alpha * ap
        y_new = minv * r_new
        beta = (r_new @ y_new) / (r @ y)
        p = -y_new + beta * p
        r, y = r_new, y_new
        out.append(x.copy())
    return out


@pytest.mark.parametrize("precond", [False, True])
def test_block_cg_solves_explicit_block_diagonal_system(precond):
    with jax.enable_x64(True):
        bm, idx, a, unravel, rng = _block_system(0)
        n = idx.size
        b = rng.normal(size=n)
        x0 = rng.normal(size=n)
        minv = 1.0 / rng.uniform(0.5, 3.0, n) if precond else np.ones(n)

        def matvec(v):
            return unravel(jnp.asarray(a) @ ravel_pytree(v)[0])

        res = cg.block_cg(
            matvec,
            unravel(jnp.asarray(b)),
            unravel(jnp.asarray(x0)),
            max_iters=60,
            blocks=bm,
            progress_tol=0.0,
            precond=unravel(jnp.asarray(minv)) if precond else None,
        )
        got = np.asarray(ravel_pytree(res.x)[0])
        for blk in range(bm.num_blocks):
            sel = idx == blk
            want = np.linalg.solve(a[np.ix_(sel, sel)], b[sel])
            np.testing.assert_allclose(got[sel], want, rtol=1e-9, atol=1e-10)
        assert res.block_iters.shape == (3,)
        # The loop's count: the slowest block's moves, plus the one that found p^T A p <= 0.
        assert 0 <= int(res.iters) - int(np.max(res.block_iters)) <= 1


def test_block_cg_iterates_and_storage_match_numpy_cg():
    with jax.enable_x64(True):
        bm, idx, a, unravel, rng = _block_system(1)
        n = idx.size
        b, x0, minv = rng.normal(size=n), rng.normal(size=n), 1.0 / rng.uniform(0.5, 2.0, n)
        res = cg.block_cg(
            lambda v: unravel(jnp.asarray(a) @ ravel_pytree(v)[0]),
            unravel(jnp.asarray(b)),
            unravel(jnp.asarray(x0)),
            max_iters=3,
            blocks=bm,
            progress_tol=0.0,
            precond=unravel(jnp.asarray(minv)),
            store_at=(1, 2, 7),
        )
        want = np.zeros((4, n))
        for blk in range(bm.num_blocks):
            sel = idx == blk
            its = _numpy_pcg(a[np.ix_(sel, sel)], b[sel], x0[sel], minv[sel], 3)
            want[:, sel] = np.stack(its)
        stored = np.stack(
            [ravel_pytree(jax.tree.map(lambda s, k=k: s[k], res.stored))[0] for k in range(3)]
        )
        np.testing.assert_allclose(stored[:2], want[1:3], rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(stored[2], 0.0)  # iteration 7 never ran
        np.testing.assert_allclose(ravel_pytree(res.x)[0], want[3], rtol=1e-10, atol=1e-12)
        assert int(res.iters) == 3 and int(res.num_stored) == 2


def _martens_stalled(phis, i, eps):
    k = max(10, math.ceil(0.1 * i))
    if not i > k:
        return False
    prev, cur = phis[i - k], phis[i]
    return prev < 0 and (cur - prev) / cur < k * eps


def test_relative_progress_rule_matches_martens():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        # phi falls fast at first, then slowly: the rule must fire somewhere, not everywhere.
        steps = np.stack([np.exp(-0.15 * np.arange(80)), np.exp(-0.03 * np.arange(80))], 1)
        phis = -np.cumsum(steps * rng.uniform(0.5, 1.5, steps.shape), axis=0)
        phis[0] = 0.0
        fired = []
        for i in range(1, 80):
            got = cg.relative_progress_stalled(
                jnp.asarray(phis), jnp.asarray(i), jnp.asarray(phis[i]), 5e-3
            )
            want = [_martens_stalled(phis[:, b], i, 5e-3) for b in range(2)]
            np.testing.assert_array_equal(got, want, err_msg=f"i={i}")
            fired.append(want)
        fired = np.asarray(fired)
        assert fired.any() and not fired.all() and not np.array_equal(fired[:, 0], fired[:, 1])


# ---------------------------------------------------------------------------------------------
# The quadratic model with a dense GGN from per-example Jacobians.


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _mlp_problem(seed=3, n=6):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 4))),
        "b1": jnp.asarray(rng.normal(size=4)),
        "w2": jnp.asarray(rng.normal(size=(4, 3))),
    }
    x = jnp.asarray(rng.normal(size=(n, 3)))
    y = rng.integers(0, 3, n)
    return params, x, y, rng


def _dense_ggn_per_example(params, x):
    """``Σ_i J_i^T H_i J_i`` with the softmax cross-entropy Hessian ``(diag p − p p^T) / N``."""
    flat, unravel = ravel_pytree(params)
    g = np.zeros((flat.size, flat.size))
    for xi in np.asarray(x):
        jac = np.asarray(jax.jacfwd(lambda f: _mlp(unravel(f), jnp.asarray(xi)))(flat))
        z = np.asarray(_mlp(params, jnp.asarray(xi)))
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        h = (np.diag(prob) - np.outer(prob, prob)) / x.shape[0]
        g += jac.T @ h @ jac
    return g, unravel


def test_model_reduction_is_the_explicit_quadratic():
    with jax.enable_x64(True):
        params, x, _, rng = _mlp_problem()
        loss = kfqn_jax.losses.softmax_cross_entropy()
        _, gvp = ggn.linearize_ggn(lambda p: _mlp(p, x), loss, params)
        g_dense, unravel = _dense_ggn_per_example(params, x)
        n = g_dense.shape[0]
        grad, step, l2 = rng.normal(size=n), rng.normal(size=n), 0.3
        got = hf.model_reduction(
            unravel(jnp.asarray(grad)), unravel(jnp.asarray(step)), gvp, jnp.asarray(l2)
        )
        want = grad @ step + 0.5 * step @ (g_dense + l2 * np.eye(n)) @ step
        np.testing.assert_allclose(float(got), want, rtol=1e-11)


def test_subspace_combination_minimises_the_full_model_on_the_span():
    with jax.enable_x64(True):
        params, x, _, rng = _mlp_problem(4)
        loss = kfqn_jax.losses.softmax_cross_entropy()
        bm = ggn.block_masks(params, "leaf")
        curvature = ggn.linearize_block_ggn(lambda p: _mlp(p, x), loss, params, bm)
        g_dense, unravel = _dense_ggn_per_example(params, x)
        n, k = g_dense.shape[0], bm.num_blocks
        idx = np.repeat(np.arange(k), [np.size(a) for a in jax.tree.leaves(params)])
        grad, step = rng.normal(size=n), rng.normal(size=n)
        lam, l2 = 0.2, 0.05
        scaled, red = hf.subspace_combination(
            unravel(jnp.asarray(step)),
            unravel(jnp.asarray(grad)),
            curvature,
            bm,
            jnp.asarray(lam + l2),
            jnp.asarray(l2),
        )
        cols = np.stack([np.where(idx == b, step, 0.0) for b in range(k)], 1)
        alpha = np.linalg.solve(cols.T @ (g_dense + (lam + l2) * np.eye(n)) @ cols, -cols.T @ grad)
        want = cols @ alpha
        np.testing.assert_allclose(ravel_pytree(scaled)[0], want, rtol=1e-9, atol=1e-12)
        q0 = grad @ want + 0.5 * want @ (g_dense + l2 * np.eye(n)) @ want
        np.testing.assert_allclose(float(red), q0, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Martens' rules as plain Python: damping, backtracking, line search.


def _martens_lm(lam, rho, floor):
    if math.isnan(rho) or rho < 0.25:
        lam = lam * 1.5
    elif rho > 0.75:
        lam = lam / 1.5
    return min(max(lam, floor), 1e8)


def test_damping_sequence_follows_martens_rule():
    rhos = [1.0, 0.9, 0.5, 0.76, 0.1, -2.0, float("nan"), 0.25, 0.75, 3.0, 0.8, 0.8, 0.8, 0.8]
    with jax.enable_x64(True):
        floor = 0.3
        lam, want = jnp.asarray(1.0), 1.0
        seq_got, seq_want = [], []
        for rho in rhos:
            # f(θ) = 2, predicted decrease 0.5 (model_red = -0.5): trial = 2 - 0.5 ρ.
            trial = jnp.asarray(2.0 - 0.5 * rho)
            lam = hf.next_damping(lam, jnp.asarray(2.0), trial, jnp.asarray(-0.5), floor)
            want = _martens_lm(want, rho if rho >= 0 or math.isnan(rho) else -math.inf, floor)
            seq_got.append(float(lam))
            seq_want.append(want)
        np.testing.assert_allclose(seq_got, seq_want, rtol=1e-15)
        assert min(seq_want) == floor and len(set(seq_want)) > 4
        # No predicted decrease (model_red >= 0) is a failed step.
        for red in (0.0, 0.4):
            one, two = jnp.asarray(1.0), jnp.asarray(2.0)
            out = hf.next_damping(one, two, one, jnp.asarray(red), 1e-8)
            assert float(out) == 1.5


def test_backtracking_walks_back_while_earlier_iterates_are_better():
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        for trial in range(6):
            values = rng.normal(size=7)  # objective of stored iterate j is values[j]
            num, last_f = int(rng.integers(0, 8)), float(rng.normal())

            def evaluate(x):
                return x, 2.0 * x["v"], x["v"]

            stored = {"v": jnp.asarray(values)}
            last = ({"v": jnp.asarray(last_f)}, jnp.asarray(2.0 * last_f), jnp.asarray(last_f))
            step, red, f = hf.backtrack_iterates(evaluate, stored, jnp.asarray(num), last)
            cur, j = last_f, num - 1
            while j >= 0 and values[j] < cur - 8 * np.finfo(np.float64).eps * abs(cur):
                cur, j = values[j], j - 1
            assert float(f) == cur and float(step["v"]) == cur and float(red) == 2.0 * cur, trial


def test_armijo_line_search_matches_python_loop():
    with jax.enable_x64(True):
        d = {"d": jnp.asarray([1.0, -2.0])}
        g = {"d": jnp.asarray([-1.0, 2.0])}  # slope g^T d = -5
        for curvature in (0.5, 3.0, 30.0, 1e8):

            def objective(s, c=curvature):
                return 1.0 + jnp.sum(g["d"] * s["d"]) + 0.5 * c * jnp.sum(s["d"] ** 2)

            f_full = objective(d)
            rate = float(hf.armijo_line_search(objective, g, d, jnp.asarray(1.0), f_full))
            want, t = 1.0, 0
            f = lambda r: 1.0 - 5.0 * r + 0.5 * curvature * 5.0 * r * r  # noqa: E731
            while not f(want) <= 1.0 + 1e-2 * want * -5.0 and t < 60:
                want, t = want * 0.8, t + 1
            want = want if f(want) <= 1.0 + 1e-2 * want * -5.0 else 0.0
            np.testing.assert_allclose(rate, want, rtol=1e-12)
        assert rate == 0.0  # the stiffest case is rejected after 60 shrinks


# ---------------------------------------------------------------------------------------------
# Decoupled weight_decay and coupled l2_reg in the alias.


def _linear_problem():
    x = jnp.array([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0], [1.5, 0.2, 0.3], [0.0, 1.0, 1.0]])
    t = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5]])
    w = {"b": jnp.array([0.2, -0.1]), "w": jnp.array([[0.3, -0.2], [0.1, 0.5], [0.0, 0.2]])}
    loss = kfqn_jax.losses.squared_error()
    model_fn = lambda p: x @ p["w"] + p["b"]  # noqa: E731
    loss_fn = lambda p: loss(model_fn(p), t)  # noqa: E731
    return w, x, model_fn, loss, loss_fn


def _step(tx, w, model_fn, loss, loss_fn):
    g = jax.grad(loss_fn)(w)
    upd, _ = tx.update(g, tx.init(w), w, model_fn=model_fn, output_loss=loss, loss_fn=loss_fn)
    return upd, g


def test_decoupled_weight_decay_and_coupled_l2_reg():
    kw = dict(damping=0.4, max_cg_iters=30, progress_tol=0.0)
    kw.update(backtracking=False, line_search=False)
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a notice where weight_decay changed
        w, x, model_fn, loss, loss_fn = _linear_problem()
        lr, omega, tau = 0.5, 0.1, 0.3
        plain, g = _step(kfqn_jax.hessian_free(lr, **kw), w, model_fn, loss, loss_fn)
        mask = {"b": False, "w": True}
        decayed, _ = _step(
            kfqn_jax.hessian_free(lr, weight_decay=omega, weight_decay_mask=mask, **kw),
            w, model_fn, loss, loss_fn,
        )  # fmt: skip
        # Decoupled: the same HF step, then -lr * omega * θ on the masked leaves only.
        np.testing.assert_allclose(
            decayed["w"], plain["w"] - lr * omega * w["w"], rtol=1e-12, atol=1e-15
        )
        np.testing.assert_array_equal(decayed["b"], plain["b"])
        coupled, _ = _step(kfqn_jax.hessian_free(lr, l2_reg=tau, **kw), w, model_fn, loss, loss_fn)
        # Coupled: the CG system of loss + τ/2 |θ|², solved densely (GGN of the mean squared
        # error with a bias: per example J_i = [I, x_i ⊗ I] in the order (b, w), H_i = I / N).
        jac_w = np.einsum("ij,kl->ikjl", np.asarray(x), np.eye(2)).reshape(4, 2, 6)
        jac = np.concatenate([np.eye(2)[None].repeat(4, 0), jac_w], 2)
        g_dense = np.einsum("nca,ncb->ab", jac, jac) / 4
        theta, gf = np.asarray(ravel_pytree(w)[0]), np.asarray(ravel_pytree(g)[0])
        d = np.linalg.solve(g_dense + (0.4 + tau) * np.eye(8), -(gf + tau * theta))
        np.testing.assert_allclose(ravel_pytree(coupled)[0], lr * d, rtol=1e-9, atol=1e-12)
        d_plain = np.linalg.solve(g_dense + 0.4 * np.eye(8), -gf)
        np.testing.assert_allclose(ravel_pytree(plain)[0], lr * d_plain, rtol=1e-9, atol=1e-12)


def test_deprecated_weight_decay_of_scale_by_hessian_free_is_l2_reg():
    with jax.enable_x64(True):
        w, _, model_fn, loss, loss_fn = _linear_problem()
        kw = dict(damping=0.4, max_cg_iters=30, backtracking=False, line_search=False)
        with pytest.warns(DeprecationWarning, match="l2_reg"):
            old = hf.scale_by_hessian_free(weight_decay=0.3, **kw)
        new = hf.scale_by_hessian_free(l2_reg=0.3, **kw)
        got, _ = _step(old, w, model_fn, loss, loss_fn)
        want, _ = _step(new, w, model_fn, loss, loss_fn)
        plain, _ = _step(hf.scale_by_hessian_free(**kw), w, model_fn, loss, loss_fn)
        leaves = zip(*map(jax.tree.leaves, (got, want, plain)), strict=True)
        for a, b, c in leaves:
            np.testing.assert_array_equal(a, b)
            assert not np.allclose(a, c)
        with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
            hf.scale_by_hessian_free(weight_decay=0.3, l2_reg=0.1)


def test_requirements_follow_precondition():
    params = {"w": jnp.ones((2, 3))}
    plain = kfqn_jax.requirements(kfqn_jax.hessian_free(), params)
    assert sorted(plain.extra_args) == ["loss_fn", "model_fn", "output_loss"]
    pre = kfqn_jax.requirements(kfqn_jax.block_hessian_free(precondition=True), params)
    assert sorted(pre.extra_args) == ["loss_fn", "model_fn", "output_loss", "sq_grads"]
    assert isinstance(optax.chain(kfqn_jax.hessian_free()), optax.GradientTransformation)
