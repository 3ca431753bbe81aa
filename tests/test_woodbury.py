"""The SMW kernel (``kfqn_jax._src.woodbury``) against explicit dense float64 references, and the
SMW transforms' use of the shared Levenberg-Marquardt controller, of decoupled ``weight_decay``
and coupled ``l2_reg``, and of the declared requirements.

The kernel references form ``J`` row by row from the same factors (``u_r = Σ_t a_{i t} ⊗ g_{r
t}``) with NumPy; the transform references form per-example gradients with ``jax.grad``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kfqn_jax
from kfqn_jax import flax as kfx
from kfqn_jax._src import woodbury

# (m, T, d_a, s, d_o) per layer: an MLP-like layer (T = 1) and two conv-like ones (T > 1).
LAYERS = [(4, 1, 3, 2, 5), (4, 3, 2, 2, 3), (4, 2, 4, 2, 2)]


def _factors(seed=0):
    rng = np.random.default_rng(seed)
    facs = []
    for m, t, da, s, do in LAYERS:
        facs.append((rng.normal(size=(m, t, da)), rng.normal(size=(s, m, t, do))))
    return facs


def _dense_jacobian(facs):
    """``J`` (rows ``(k, i)``, columns the layers' ``(d_a, d_o)`` matrices, flattened)."""
    cols = []
    for a, g in facs:
        s, m = g.shape[:2]
        u = np.einsum("itd,kite->kide", a, g)  # u_{(k,i)} = Σ_t a_{i t} ⊗ g_{k i t}
        cols.append(u.reshape(s * m, -1))
    return np.concatenate(cols, axis=1)


def _blocks(facs, mode):
    return [woodbury.make_block(jnp.asarray(a), jnp.asarray(g), mode) for a, g in facs]


@pytest.mark.parametrize("mode", woodbury.GRAM_MODES)
def test_gram_jvp_vjp_and_direction_match_the_explicit_jacobian(mode):
    with jax.enable_x64(True):
        facs = _factors()
        jac = _dense_jacobian(facs)
        blocks = _blocks(facs, mode)
        if mode != "auto":
            assert all((b.u is not None) == (mode == "per_example") for b in blocks)
        rows = jac.shape[0]
        k_mat = woodbury.gram(blocks, rows, jnp.float64)
        np.testing.assert_allclose(k_mat, jac @ jac.T, rtol=1e-12)

        rng = np.random.default_rng(1)
        shapes = [(da, do) for _, _, da, _, do in LAYERS]
        mats = [rng.normal(size=sh) for sh in shapes]
        vec = np.concatenate([v.ravel() for v in mats])
        np.testing.assert_allclose(woodbury.jvp_rows(blocks, mats), jac @ vec, rtol=1e-12)
        w = rng.normal(size=rows)
        back = np.concatenate([np.ravel(b) for b in woodbury.vjp_rows(blocks, jnp.asarray(w))])
        np.testing.assert_allclose(back, jac.T @ w, rtol=1e-12)

        num, lam = LAYERS[0][0], 0.37  # m examples, s * m rows
        dirs, k_mat = woodbury.smw_direction(blocks, [jnp.asarray(v) for v in mats], num, lam)
        ref = np.linalg.solve(jac.T @ jac / num + lam * np.eye(len(vec)), vec)
        got = np.concatenate([np.ravel(d) for d in dirs])
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(k_mat, jac @ jac.T, rtol=1e-12)


def test_auto_gram_mode_picks_the_cheaper_contraction():
    # Many positions and narrow layers: per-example gradients are cheaper; one position and
    # wide layers: the positions contraction is.
    assert woodbury.use_per_example((4, 64, 3), (1, 4, 64, 2), "auto")
    assert not woodbury.use_per_example((4, 1, 300), (1, 4, 1, 200), "auto")
    assert woodbury.use_per_example((4, 1, 300), (1, 4, 1, 200), "per_example")
    assert not woodbury.use_per_example((4, 64, 3), (1, 4, 64, 2), "positions")


@dataclasses.dataclass(frozen=True)
class _Quadratic(kfqn_jax.losses.Loss):
    """``ℓ = ½ (z - t)^T A (z - t)`` with a dense ``A``: no closed-form root in the kernel."""

    a: tuple = ((2.0, 0.5, 0.0), (0.5, 1.0, 0.3), (0.0, 0.3, 1.5))

    def per_example(self, outputs, targets):
        r = outputs - jnp.asarray(targets, outputs.dtype)
        return 0.5 * jnp.einsum("...c,cd,...d->...", r, jnp.asarray(self.a, outputs.dtype), r)

    def hvp(self, outputs, v):
        return v @ jnp.asarray(self.a, v.dtype)


@pytest.mark.parametrize("name", ["softmax", "sigmoid", "squared", "generic"])
def test_hessian_square_roots_reproduce_the_autodiff_hessian(name):
    c, m, s = 3, 5, 4
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        z = jnp.asarray(rng.normal(size=(m, c)))
        loss, t = {
            "softmax": (kfqn_jax.losses.softmax_cross_entropy(), jnp.zeros(m, jnp.int32)),
            "sigmoid": (kfqn_jax.losses.sigmoid_cross_entropy(), rng.uniform(size=(m, c))),
            "squared": (kfqn_jax.losses.squared_error(2.0), rng.normal(size=(m, c))),
            "generic": (_Quadratic(), rng.normal(size=(m, c))),
        }[name]
        cols = woodbury.hessian_sqrt_columns(loss, z, jnp.arange(c))  # (c, m, c)
        signs = jnp.asarray(rng.choice([-1.0, 1.0], size=(s, m, c)))
        sketch = woodbury.hessian_sqrt_sketch(loss, z, signs)
        hess = jax.vmap(jax.hessian(lambda zi, ti: loss.per_example(zi[None], ti[None])[0]))(
            z, jnp.asarray(t)
        )
        for i in range(m):
            h = hess[i]
            root = np.asarray(cols[:, i, :]).T  # column k of L_i
            np.testing.assert_allclose(root @ root.T, h, rtol=1e-10, atol=1e-12)
            want = np.asarray(signs[:, i, :]) @ root.T  # L_i r_k
            np.testing.assert_allclose(sketch[:, i, :], want, atol=1e-12)
        sub = woodbury.hessian_sqrt_columns(loss, z, jnp.asarray([2, 0]))
        np.testing.assert_allclose(sub, cols[jnp.asarray([2, 0])], atol=1e-14)


# ---------------------------------------------------------------------------------------------
# The transforms.


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))


B, M, LAM = 6, 4, 0.3


def _problem():
    model = _MLP()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (B, 5), jnp.float64)
    y = jax.random.randint(k2, (B,), 0, 3)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(k3, x)["params"])
    loss = kfqn_jax.losses.softmax_cross_entropy()
    out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
    return model, params, x, y, loss, out


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _dense_fisher(model, params, x, y, loss):
    def one(xi, yi):
        ell = lambda p: loss.per_example(model.apply({"params": p}, xi[None]), yi[None])[0]
        return ravel_pytree(jax.grad(ell)(params))[0]

    jac = np.asarray(jax.vmap(one)(x[:M], y[:M]))
    return jac.T @ jac / M


def test_lm_damping_follows_the_ratio_sequence_step_by_step():
    """The trial loss is set so that ``ρ`` takes prescribed values; ``λ`` must follow the
    Martens-style rule (×ω below 1/4, ÷ω above 3/4, clipped), computed here step by step."""
    factor, floor, ceiling = 1.5, 0.2, 0.5
    ratios = [0.9, 0.9, 0.5, 0.1, -2.0, 0.3, 1.0, 0.0, 0.1, 0.6, 0.8, 0.8, 0.8]
    with jax.enable_x64(True):
        model, params, x, y, loss, out = _problem()
        v0, g = 1.0, out.grads
        tx = kfqn_jax.scale_by_smw_ng(
            LAM, fisher="empirical", curvature_batch=M, lm_factor=factor,
            damping_bounds=(floor, ceiling),
        )  # fmt: skip

        @jax.jit
        def step(state, ratio):
            def loss_fn(p):  # v0 - ratio * (1/2) g^T d, with d = θ - p the full step
                d = jax.tree.map(lambda a, b: a - b, params, p)
                return v0 - ratio * 0.5 * jnp.vdot(_ravel(g), _ravel(d))

            return tx.update(g, state, params, layer_stats=out.stats, loss_fn=loss_fn, value=v0)

        state = tx.init(params)
        lam, lams = LAM, []
        for ratio in ratios:
            _, state = step(state, ratio)
            if ratio < 0.25:
                lam = lam * factor
            elif ratio > 0.75:
                lam = lam / factor
            lam = min(max(lam, floor), ceiling)
            lams.append(lam)
            np.testing.assert_allclose(float(state.damping), lam, rtol=1e-12)
            want_rho = ratio if ratio >= 0 else np.finfo(np.float64).min
            np.testing.assert_allclose(float(state.rho), want_rho, rtol=1e-9, atol=1e-12)
        assert floor in lams and ceiling in lams  # both bounds were reached


def _ravel(tree):
    return ravel_pytree(tree)[0]


def test_l2_reg_enters_the_lm_ratio_as_half_tau_theta_squared():
    tau, trial_loss = 0.05, 0.8
    with jax.enable_x64(True):
        model, params, x, y, loss, out = _problem()
        v0 = float(out.loss)
        tx = kfqn_jax.scale_by_smw_ng(LAM, fisher="empirical", curvature_batch=M, l2=tau)
        g = out.grads
        d, state = jax.jit(
            lambda s: tx.update(
                g, s, params, layer_stats=out.stats, loss_fn=lambda p: jnp.asarray(trial_loss),
                value=v0,
            )
        )(tx.init(params))  # fmt: skip
        th, dv = _flat(params), _flat(d)
        cur = v0 + 0.5 * tau * th @ th
        new = trial_loss + 0.5 * tau * (th - dv) @ (th - dv)
        rho = (cur - new) / (0.5 * _flat(g) @ dv)
        assert rho > 0
        np.testing.assert_allclose(float(state.rho), rho, rtol=1e-9)
        # The direction itself is (F + (λ + τ) I)^{-1} g: τ is folded into the damping.
        fisher = _dense_fisher(model, params, x, y, loss)
        ref = np.linalg.solve(fisher + (LAM + tau) * np.eye(len(th)), _flat(g))
        np.testing.assert_allclose(dv, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_smw_ng_decoupled_weight_decay_and_coupled_l2_reg(masked):
    lr, tau, l2 = 0.7, 0.1, 0.04
    with jax.enable_x64(True):
        model, params, x, y, loss, out = _problem()
        fisher = _dense_fisher(model, params, x, y, loss)
        th, g = _flat(params), _flat(out.grads)
        eye = np.eye(len(th))
        mask_tree = jax.tree_util.tree_map_with_path(
            lambda kp, p: jax.tree_util.keystr(kp).endswith("['kernel']"), params
        )
        mask = _flat(jax.tree.map(lambda m, p: jnp.full(p.shape, m, p.dtype), mask_tree, params))
        assert 0 < mask.sum() < len(mask)
        kw = dict(learning_rate=lr, damping=LAM, fisher="empirical", curvature_batch=M,
                  adapt_damping=False)  # fmt: skip

        def run(tx):
            return _flat(tx.update(out.grads, tx.init(params), params, layer_stats=out.stats)[0])

        with pytest.warns(FutureWarning, match="l2_reg"):
            tx = kfqn_jax.smw_ng(
                weight_decay=tau, weight_decay_mask=mask_tree if masked else None, **kw
            )
        decay = tau * th * (mask if masked else 1.0)
        want = -lr * (np.linalg.solve(fisher + LAM * eye, g) + decay)
        np.testing.assert_allclose(run(tx), want, rtol=1e-9, atol=1e-12)

        got = run(kfqn_jax.smw_ng(l2_reg=l2, **kw))
        want = -lr * np.linalg.solve(fisher + (LAM + l2) * eye, g + l2 * th)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)

        with pytest.warns(FutureWarning):
            tx = kfqn_jax.smw_ng(
                weight_decay=tau, l2_reg=l2, weight_decay_mask=mask_tree if masked else None, **kw
            )
        want = -lr * (np.linalg.solve(fisher + (LAM + l2) * eye, g + l2 * th) + decay)
        np.testing.assert_allclose(run(tx), want, rtol=1e-9, atol=1e-12)


def test_declared_requirements_follow_the_static_configuration():
    params = {"Dense_0": {"kernel": jnp.ones((5, 4)), "bias": jnp.ones(4)}}
    reqs = kfqn_jax.requirements(kfqn_jax.smw_ng(), params)
    assert reqs.extra_args == ("layer_stats", "loss_fn") and reqs.sampled == "cotangents"
    reqs = kfqn_jax.requirements(kfqn_jax.smw_ng(fisher="empirical", adapt_damping=False), params)
    assert reqs.extra_args == ("layer_stats",) and reqs.sampled is None
    reqs = kfqn_jax.requirements(kfqn_jax.smw_gn(), params)
    assert reqs.extra_args == ("loss_fn", "model_outputs", "probe_stats_fn")
    assert reqs.optional == ("layer_stats",) and reqs.sampled is None
    assert not reqs.exact_fisher
    reqs = kfqn_jax.requirements(kfqn_jax.scale_by_smw_gn(adapt_damping=False), params)
    assert reqs.extra_args == ("model_outputs", "probe_stats_fn")
