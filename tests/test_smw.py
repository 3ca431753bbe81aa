"""SMW-NG and SMW-GN against dense float64 references built from explicit per-example Jacobians.

Each reference forms ``J`` row by row with ``jax.grad``/``jax.jacrev`` per example, the dense
curvature ``F = J^T J / m`` (or ``(1/m) Σ J_i^T Q_i J_i``) and ``np.linalg.solve(λI + F, g)``;
the method never forms ``J``.
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
from kfqn_jax import flax as kfx

B, M = 6, 4  # batch, curvature subsample (the first M examples)
LAM = 0.3


class MLP(nn.Module):
    bias: bool = True
    out: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(5, use_bias=self.bias)(x))
        x = nn.tanh(nn.Dense(4, use_bias=False)(x))
        return nn.Dense(self.out, use_bias=self.bias)(x)


class CNN(nn.Module):
    bias: bool = True
    out: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3), padding="SAME", use_bias=self.bias)(x))
        x = nn.tanh(nn.Conv(2, (2, 2), strides=2, padding="VALID", use_bias=self.bias)(x))
        return nn.Dense(self.out, use_bias=self.bias)(x.reshape(x.shape[0], -1))


def _problem(arch, bias, loss_name="softmax_cross_entropy", out=3):
    model = (MLP if arch == "mlp" else CNN)(bias=bias, out=out)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    shape = (B, 6) if arch == "mlp" else (B, 5, 5, 2)
    x = jax.random.normal(k1, shape, jnp.float64)
    params = model.init(k3, x)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    loss = kfqn_jax.losses.as_loss(loss_name)
    if loss_name == "softmax_cross_entropy":
        y = jax.random.randint(k2, (B,), 0, out)
    elif loss_name == "sigmoid_cross_entropy":
        y = jax.random.uniform(k2, (B, out), jnp.float64)
    else:
        y = jax.random.normal(k2, (B, out), jnp.float64)
    return model, params, x, y, loss


def _per_example_grads(model, params, x, y, loss):
    """Rows ``∇ℓ_i`` of ``J``, one ``jax.grad`` per example (vmapped)."""

    def single(p, xi, yi):
        def ell(q):
            return loss.per_example(model.apply({"params": q}, xi[None]), yi[None])[0]

        return ravel_pytree(jax.grad(ell)(p))[0]

    return np.array(jax.jit(jax.vmap(single, in_axes=(None, 0, 0)))(params, x, y))


def _dense_solve(curv, g, lam):
    return np.linalg.solve(lam * np.eye(len(g)) + curv, g)


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


# ---------------------------------------------------------------------------------------------
# SMW-NG.


@pytest.mark.parametrize(
    "arch,bias", [("mlp", True), ("mlp", False), ("cnn", True), ("cnn", False)]
)
def test_smw_ng_matches_dense_solve(arch, bias):
    """Sampled-label and empirical Fisher; for the CNN every conv contraction (gram_mode)."""
    modes = ("auto",) if arch == "mlp" else ("auto", "positions", "per_example")
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem(arch, bias)

        @jax.jit
        def run(params):
            out = kfx.value_grads_and_stats(
                model, params, x, targets=y, loss=loss, rng=jax.random.key(3), sampled="cotangents"
            )
            ds = {}
            for fisher in ("empirical", "true"):
                for mode in modes:
                    tx = kfqn_jax.scale_by_smw_ng(
                        LAM, fisher=fisher, curvature_batch=M, adapt_damping=False, gram_mode=mode
                    )
                    ds[fisher + "/" + mode] = tx.update(
                        out.grads, tx.init(params), params, layer_stats=out.stats
                    )[0]
            return out.grads, out.sampled_targets, ds

        grads, sampled, ds = run(params)
        g = _flat(grads)
        np.testing.assert_allclose(g, _per_example_grads(model, params, x, y, loss).mean(0))
        for fisher, labels in (("empirical", y), ("true", sampled)):
            jac = _per_example_grads(model, params, x[:M], labels[:M], loss)
            ref = _dense_solve(jac.T @ jac / M, g, LAM)
            for mode in modes:
                d = _flat(ds[fisher + "/" + mode])
                np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-12)


def test_smw_ng_weight_decay_folds_into_damping_and_uncaptured_params_get_g_over_lambda():
    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(nn.tanh(nn.Dense(5)(x)))
            return nn.Dense(3)(x)

    tau = 0.05
    with jax.enable_x64(True):
        _, _, x, y, loss = _problem("mlp", True)
        model = WithNorm()
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), model.init(jax.random.key(1), x)["params"]
        )
        out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
        tx = kfqn_jax.smw_ng(
            learning_rate=1.0,
            damping=LAM,
            l2_reg=tau,
            fisher="empirical",
            curvature_batch=M,
            adapt_damping=False,
        )
        upd, _ = tx.update(out.grads, tx.init(params), params, layer_stats=out.stats)
        # Dense reference on the captured (Dense) parameters; LayerNorm has zero curvature.
        flat_p, unravel = ravel_pytree(params)
        is_norm = _flat(
            jax.tree_util.tree_map_with_path(
                lambda kp, p: jnp.full(p.shape, "LayerNorm" in jax.tree_util.keystr(kp)), params
            )
        ).astype(bool)
        jac = _per_example_grads(model, params, x[:M], y[:M], loss)
        jac[:, is_norm] = 0.0
        g = _flat(out.grads) + tau * np.asarray(flat_p)
        ref = _dense_solve(jac.T @ jac / M, g, LAM + tau)
        np.testing.assert_allclose(-_flat(upd), ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(-_flat(upd)[is_norm], g[is_norm] / (LAM + tau), rtol=1e-12)


def test_smw_ng_momentum_is_the_authors_ema():
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem("mlp", True)
        out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
        tx = kfqn_jax.scale_by_smw_ng(
            LAM, fisher="empirical", curvature_batch=M, adapt_damping=False, momentum=0.9
        )
        g1 = out.grads
        g2 = jax.tree.map(lambda g: 2.0 * g + 0.01, g1)
        state = tx.init(params)
        d1, state = tx.update(g1, state, params, layer_stats=out.stats)
        d2, state = tx.update(g2, state, params, layer_stats=out.stats)
        jac = _per_example_grads(model, params, x[:M], y[:M], loss)
        curv = jac.T @ jac / M
        # beta_0 = 0 (first step uses g1), beta_1 = min(1 - 1/2, 0.9) = 0.5.
        np.testing.assert_allclose(_flat(d1), _dense_solve(curv, _flat(g1), LAM), rtol=1e-9)
        g_hat = 0.5 * _flat(g1) + 0.5 * _flat(g2)
        np.testing.assert_allclose(_flat(d2), _dense_solve(curv, g_hat, LAM), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# SMW-GN.


def _dense_ggn(model, params, x, loss):
    """``(1/m) Σ_i J_i^T Q_i J_i`` with ``J_i`` from ``jax.jacrev`` per example (vmapped)."""
    flat, unravel = ravel_pytree(params)

    def one(xi):
        jac = jax.jacrev(lambda fp: model.apply({"params": unravel(fp)}, xi[None])[0])(flat)
        q = loss.hessian(model.apply({"params": params}, xi[None]))[0]
        return jac.T @ q @ jac

    return np.asarray(jax.jit(jax.vmap(one))(x)).mean(0)


def _gn_probe_args(model, params, x, m):
    return dict(
        model_outputs=model.apply({"params": params}, x),
        probe_stats_fn=lambda v: kfx.layer_stats(
            model, params, x[:m], targets=v, loss=kfqn_jax.OutputProbe()
        ),
    )


@pytest.mark.parametrize(
    "arch,bias,loss_name",
    [
        ("mlp", True, "softmax_cross_entropy"),
        ("mlp", False, "sigmoid_cross_entropy"),
        ("mlp", True, "squared_error"),
        ("cnn", True, "softmax_cross_entropy"),
        ("cnn", False, "squared_error"),
    ],
)
def test_smw_gn_matches_dense_solve(arch, bias, loss_name):
    """Rows from probe_stats_fn and from the capture's exact-GGN cotangents."""
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem(arch, bias, loss_name)

        @jax.jit
        def run(params):
            out = kfx.value_grads_and_stats(
                model, params, x, targets=y, loss=loss, exact_fisher=True
            )
            tx = kfqn_jax.scale_by_smw_gn(LAM, loss=loss, curvature_batch=M, adapt_damping=False)
            d_probe = tx.update(
                out.grads, tx.init(params), params, **_gn_probe_args(model, params, x, M)
            )[0]
            d_exact = tx.update(out.grads, tx.init(params), params, layer_stats=out.stats)[0]
            return out.grads, d_probe, d_exact

        grads, d_probe, d_exact = run(params)
        ref = _dense_solve(_dense_ggn(model, params, x[:M], loss), _flat(grads), LAM)
        np.testing.assert_allclose(_flat(d_probe), ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(_flat(d_exact), ref, rtol=1e-9, atol=1e-12)


def test_smw_gn_output_subsampling_is_the_scaled_column_subset():
    c, s, seed = 5, 2, 7
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem("mlp", True, "sigmoid_cross_entropy", out=c)
        tx = kfqn_jax.scale_by_smw_gn(
            LAM, loss=loss, curvature_batch=M, adapt_damping=False, output_samples=s, seed=seed
        )

        @jax.jit
        def run(params):
            grads = jax.grad(lambda p: loss(model.apply({"params": p}, x), y))(params)
            args = _gn_probe_args(model, params, x, M)
            return grads, tx.update(grads, tx.init(params), params, **args)[0]

        grads, d = run(params)
        key = jax.random.fold_in(jax.random.key(seed), 0)
        cols = np.asarray(jax.random.choice(key, c, (s,), replace=False))

        class Sub(kfqn_jax.losses.SigmoidCrossEntropy):
            def hvp(self, outputs, v):  # Q restricted to the sampled outputs, times c/s
                mask = jnp.zeros(c).at[cols].set(c / s)
                return mask * super().hvp(outputs, v)

        ref = _dense_solve(_dense_ggn(model, params, x[:M], Sub()), _flat(grads), LAM)
        np.testing.assert_allclose(_flat(d), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "loss_name", ["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"]
)
def test_smw_gn_sketch_is_the_dense_solve_with_the_sketched_hessians(loss_name):
    """``output_sampling="sketch"``: Q_i is replaced by (1/s) Σ_k (L_i r_k)(L_i r_k)^T with the
    step's Rademacher signs; L_i is built here densely and independently of the code."""
    c, s, seed = 5, 2, 3
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem("mlp", True, loss_name, out=c)
        tx = kfqn_jax.scale_by_smw_gn(
            LAM,
            loss=loss,
            curvature_batch=M,
            adapt_damping=False,
            output_samples=s,
            output_sampling="sketch",
            seed=seed,
        )

        @jax.jit
        def run(params):
            out = kfx.value_grads_and_stats(
                model, params, x, targets=y, loss=loss, exact_fisher=True
            )
            args = _gn_probe_args(model, params, x, M)
            d_probe = tx.update(out.grads, tx.init(params), params, **args)[0]
            d_exact = tx.update(out.grads, tx.init(params), params, layer_stats=out.stats)[0]
            return out.grads, d_probe, d_exact

        grads, d_probe, d_exact = run(params)
        z = np.asarray(model.apply({"params": params}, x[:M]))
        key = jax.random.fold_in(jax.random.key(seed), 0)
        signs = np.asarray(jax.random.rademacher(key, (s, M, c), jnp.float64))
        qs = []
        for i in range(M):
            if loss_name == "softmax_cross_entropy":
                p = np.exp(z[i] - z[i].max())
                p /= p.sum()
                root = (np.eye(c) - np.outer(p, np.ones(c))) @ np.diag(np.sqrt(p))
            else:
                h = np.asarray(jax.hessian(lambda zi: loss(zi[None], y[i : i + 1]))(z[i]))
                root = np.diag(np.sqrt(np.diagonal(h)))
            np.testing.assert_allclose(root @ root.T, _loss_hessian(loss, z[i], y[i]), atol=1e-12)
            v = root @ signs[:, i, :].T  # (c, s)
            qs.append(v @ v.T / s)
        flat, unravel = ravel_pytree(params)
        jac = jax.vmap(
            lambda xi: jax.jacrev(lambda fp: model.apply({"params": unravel(fp)}, xi[None])[0])(
                flat
            )
        )(x[:M])
        jac = np.asarray(jac)
        ggn = np.mean([j.T @ q @ j for j, q in zip(jac, qs, strict=True)], axis=0)
        ref = _dense_solve(ggn, _flat(grads), LAM)
        np.testing.assert_allclose(_flat(d_probe), ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(_flat(d_exact), ref, rtol=1e-9, atol=1e-12)


def _loss_hessian(loss, zi, yi):
    """The per-example loss Hessian in the outputs, by autodiff (sum over the batch of 1)."""
    return np.asarray(jax.hessian(lambda v: loss(v[None], yi[None]))(jnp.asarray(zi)))


def _problem32(*args):
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem(*args)
        params, x = jax.tree.map(lambda a: np.asarray(a, np.float32), (params, x))
    return model, params, x, y, loss


def test_smw_gn_system_size_guard():
    model, params, x, y, loss = _problem32("mlp", True)
    grads = jax.tree.map(jnp.zeros_like, params)

    def run(tx):
        return tx.update(grads, tx.init(params), params, **_gn_probe_args(model, params, x, M))[0]

    tx = kfqn_jax.scale_by_smw_gn(LAM, curvature_batch=M, adapt_damping=False, max_system_size=8)
    with pytest.raises(ValueError, match="output_samples"):
        jax.eval_shape(lambda: run(tx))
    tx = kfqn_jax.scale_by_smw_gn(
        LAM, curvature_batch=M, adapt_damping=False, max_system_size=8, output_samples=2
    )
    jax.eval_shape(lambda: run(tx))  # M * 2 = 8 directions fit


# ---------------------------------------------------------------------------------------------
# Levenberg-Marquardt damping.


def _lm_setup():
    model, params, x, y, loss = _problem("mlp", True)
    out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
    fixed = kfqn_jax.scale_by_smw_ng(
        LAM, fisher="empirical", curvature_batch=M, adapt_damping=False
    )
    d, _ = jax.jit(fixed.update)(out.grads, fixed.init(params), params, layer_stats=out.stats)
    return model, params, x, y, loss, out, d


def test_lm_rule_moves_damping_in_the_right_direction():
    """``ρ`` is set exactly by a constant trial loss ``v0 - ρ pred``; ``λ`` must follow the
    1.01 rule with thresholds 0.25 / 0.75, and ``ρ = -∞`` when the loss rises."""
    with jax.enable_x64(True):
        _, params, _, _, _, out, d = _lm_setup()
        pred = 0.5 * float(np.dot(_flat(out.grads), _flat(d)))
        assert pred > 0
        v0 = 1.0
        tx = kfqn_jax.scale_by_smw_ng(LAM, fisher="empirical", curvature_batch=M)

        @jax.jit
        def run(ratio):
            loss_fn = lambda p: v0 - ratio * pred  # noqa: E731
            return tx.update(
                out.grads, tx.init(params), params, layer_stats=out.stats, loss_fn=loss_fn, value=v0
            )

        cases = [(-1.0, 1.01), (0.1, 1.01), (0.5, 1.0), (0.9, 1 / 1.01), (2.0, 1 / 1.01)]
        for ratio, factor in cases:
            d2, state = run(ratio)
            np.testing.assert_allclose(_flat(d2), _flat(d), rtol=1e-12)
            np.testing.assert_allclose(float(state.damping), LAM * factor, rtol=1e-12)
            if ratio > 0:
                np.testing.assert_allclose(float(state.rho), ratio, rtol=1e-9)
            else:
                assert float(state.rho) == np.finfo(np.float64).min  # -inf, kept finite


def test_lm_reject_zeroes_only_steps_that_raise_the_loss():
    """``lm_reject=True``: a trial loss above ``L(θ)`` (or NaN) gives a zero update and a
    larger ``λ``; a decrease, even a poor one (``ρ < ρ_lo``), keeps the full step. Both
    methods share the rule; this checks it through SMW-NG and SMW-GN."""
    with jax.enable_x64(True):
        model, params, x, y, loss, out, d = _lm_setup()
        pred = 0.5 * float(np.dot(_flat(out.grads), _flat(d)))
        v0 = 1.0
        tx = kfqn_jax.scale_by_smw_ng(LAM, fisher="empirical", curvature_batch=M, lm_reject=True)

        @jax.jit
        def run(trial):
            return tx.update(
                out.grads,
                tx.init(params),
                params,
                layer_stats=out.stats,
                loss_fn=lambda p: trial,
                value=v0,
            )

        for trial, taken, factor in [
            (v0 + 0.5 * pred, False, 1.01),  # the loss rises
            (jnp.nan, False, 1.01),  # the trial loss is not finite
            (v0 - 0.1 * pred, True, 1.01),  # a poor but real decrease
            (v0 - 0.9 * pred, True, 1 / 1.01),
        ]:
            d2, state = run(jnp.asarray(trial, jnp.float64))
            want = _flat(d) if taken else np.zeros_like(_flat(d))
            np.testing.assert_allclose(_flat(d2), want, rtol=1e-12, atol=0)
            np.testing.assert_allclose(float(state.damping), LAM * factor, rtol=1e-12)
            assert int(state.nonfinite_count) == 0

        gn = kfqn_jax.scale_by_smw_gn(LAM, loss=loss, curvature_batch=M, lm_reject=True)
        outputs = model.apply({"params": params}, x)
        probe = (
            lambda v: kfx.layer_stats(  # noqa: E731
                model, params, x[:M], targets=v, loss=kfqn_jax.OutputProbe(), with_outputs=False
            )
        )
        d_gn, state = gn.update(
            out.grads,
            gn.init(params),
            params,
            model_outputs=outputs,
            probe_stats_fn=probe,
            loss_fn=lambda p: jnp.asarray(v0 + 1.0),
            value=v0,
        )
        assert not np.any(_flat(d_gn)) and float(state.damping) > LAM


def test_lm_rule_configurable_and_undamped_model_uses_the_dense_curvature():
    with jax.enable_x64(True):
        model, params, x, y, loss, out, d = _lm_setup()
        jac = _per_example_grads(model, params, x[:M], y[:M], loss)
        dv, g = _flat(d), _flat(out.grads)
        pred = g @ dv - 0.5 * dv @ (jac.T @ jac / M) @ dv
        v0, ratio = 2.0, 0.3
        tx = kfqn_jax.scale_by_smw_ng(
            LAM,
            fisher="empirical",
            curvature_batch=M,
            lm_model="undamped",
            lm_factor=3.0,
            lm_thresholds=(0.4, 0.6),
        )
        loss_fn = lambda p: jnp.asarray(v0 - ratio * pred)  # noqa: E731
        _, state = jax.jit(
            lambda g, s, p: tx.update(g, s, p, layer_stats=out.stats, loss_fn=loss_fn, value=v0)
        )(out.grads, tx.init(params), params)
        np.testing.assert_allclose(float(state.rho), ratio, rtol=1e-9)
        np.testing.assert_allclose(float(state.damping), 3.0 * LAM, rtol=1e-12)


def test_lm_trial_point_is_the_full_step_and_loss_fn_is_required():
    model, params, x, y, loss = _problem32("mlp", True)
    tx = kfqn_jax.smw_ng(learning_rate=0.1, damping=LAM, fisher="empirical", curvature_batch=M)
    seen = []

    def loss_fn(p):
        seen.append(p)
        return loss(model.apply({"params": p}, x), y)

    @jax.jit
    def run(params):
        out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
        upd, _ = tx.update(
            out.grads, tx.init(params), params, layer_stats=out.stats, loss_fn=loss_fn
        )
        return upd, seen[-1]

    upd, trial = run(params)
    leaves = zip(jax.tree.leaves(trial), jax.tree.leaves(params), jax.tree.leaves(upd), strict=True)
    for t, p, u in leaves:
        np.testing.assert_allclose(t, p + u / 0.1, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_fn"):
        out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
        tx.update(out.grads, tx.init(params), params, layer_stats=out.stats)


def test_smw_gn_gets_lower_loss_than_gradient_descent_on_a_tiny_problem():
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem("mlp", True)
        loss_fn = lambda p: loss(model.apply({"params": p}, x), y)  # noqa: E731
        tx = kfqn_jax.smw_gn(learning_rate=1.0, damping=1.0, loss=loss, curvature_batch=B)

        @jax.jit
        def step(p, s):
            value, grads = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(
                grads, s, p, value=value, loss_fn=loss_fn, **_gn_probe_args(model, p, x, B)
            )
            return optax.apply_updates(p, u), s

        p, s = params, tx.init(params)
        for _ in range(10):
            p, s = step(p, s)
        assert float(loss_fn(p)) < 0.5 * float(loss_fn(params))
