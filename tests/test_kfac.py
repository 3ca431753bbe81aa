"""KFAC against dense float64 references built from per-example Jacobians."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfqn_jax
from kfqn_jax import flax as kfx


class DeepLinear(nn.Module):
    widths: tuple = (4, 3, 2)
    bias: tuple = (True, False, True)

    @nn.compact
    def __call__(self, x):
        for w, b in zip(self.widths, self.bias, strict=True):
            x = nn.Dense(w, use_bias=b)(x)
        return x


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _layer_block(params, model, x, name):
    """Exact GGN block of one layer (homogeneous [W; b], row-major vec) from per-example
    Jacobians of the outputs w.r.t. that layer's parameters; squared loss has H = I."""
    layer = params[name]

    def f(lp, xi):
        p = dict(params)
        p[name] = lp
        return model.apply({"params": p}, xi[None])[0]

    blocks = []
    for xi in x:
        jac = jax.jacfwd(f)(layer, xi)  # dict of (c, *shape)
        w = np.asarray(jac["kernel"])  # (c, d_in, d_out)
        cols = [w]
        if "bias" in jac:
            cols.append(np.asarray(jac["bias"])[:, None, :])
        j = np.concatenate(cols, axis=1).reshape(w.shape[0], -1)  # (c, (d_in+1) d_out)
        blocks.append(j.T @ j)
    return np.mean(blocks, axis=0)


def test_kfac_factors_equal_exact_ggn_blocks_of_deep_linear_network():
    with jax.enable_x64(True):
        model = DeepLinear()
        x = jax.random.normal(jax.random.key(0), (7, 5), jnp.float64)
        params = model.init(jax.random.key(1), x)["params"]
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        y = jnp.zeros((7, 2), jnp.float64)
        loss = kfqn_jax.losses.squared_error()
        out = jax.jit(
            lambda p: kfx.value_grads_and_stats(
                model, p, x, targets=y, loss=loss, exact_fisher=True
            )
        )(params)
        tx = kfqn_jax.scale_by_kfac(
            1e-3, fisher="exact", ema_decay=0.0, momentum=0.0, pi_damping=False
        )
        state = tx.init(params)
        _, state = jax.jit(lambda g, s: tx.update(g, s, params, layer_stats=out.stats))(
            out.grads, state
        )
        names = ["Dense_0", "Dense_1", "Dense_2"]
        for i, name in enumerate(names):
            exact = _layer_block(params, model, x, name)
            kron = np.kron(np.asarray(state.a_factors[i]), np.asarray(state.g_factors[i]))
            np.testing.assert_allclose(kron, exact, rtol=1e-10, atol=1e-12)


def test_kfac_sampled_and_empirical_factors_match_per_example_reference():
    """A = mean ã ãᵀ, G = mean over examples of (per-example pre-activation gradient)^2, with
    per-example gradients from an independent jax.grad per example (float64)."""
    with jax.enable_x64(True):
        model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(3)])
        x = jax.random.normal(jax.random.key(0), (6, 5), jnp.float64)
        y = jnp.array([0, 1, 2, 1, 0, 2])
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), model.init(jax.random.key(1), x)["params"]
        )
        loss = kfqn_jax.losses.softmax_cross_entropy()
        out = kfx.value_grads_and_stats(
            model, params, x, targets=y, loss=loss, rng=jax.random.key(3), sampled="cotangents"
        )
        for fisher, targets in (("true", out.sampled_targets), ("empirical", y)):
            tx = kfqn_jax.scale_by_kfac(1e-3, fisher=fisher, ema_decay=0.0, momentum=0.0)
            state = tx.init(params)
            _, state = tx.update(out.grads, state, params, layer_stats=out.stats)
            w0, b0 = params["layers_0"]["kernel"], params["layers_0"]["bias"]
            w2, b2 = params["layers_2"]["kernel"], params["layers_2"]["bias"]

            def per_example(xi, ti):
                def lo(h2):
                    return loss(h2[None], ti[None])

                h0 = xi @ w0 + b0
                a1 = jnp.tanh(h0)
                h2 = a1 @ w2 + b2
                g2 = jax.grad(lo)(h2)
                g0 = jax.grad(lambda h: lo(jnp.tanh(h) @ w2 + b2))(h0)
                return np.append(xi, 1.0), np.append(a1, 1.0), np.asarray(g0), np.asarray(g2)

            rows = [per_example(xi, ti) for xi, ti in zip(x, targets, strict=True)]
            a0 = np.mean([np.outer(r[0], r[0]) for r in rows], 0)
            a2 = np.mean([np.outer(r[1], r[1]) for r in rows], 0)
            g0 = np.mean([np.outer(r[2], r[2]) for r in rows], 0)
            g2 = np.mean([np.outer(r[3], r[3]) for r in rows], 0)
            for got, want in zip(
                (state.a_factors[0], state.a_factors[1], state.g_factors[0], state.g_factors[1]),
                (a0, a2, g0, g2),
                strict=True,
            ):
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


def test_kfac_step_equals_dense_kronecker_solve_with_pi_damping():
    """One step of scale_by_kfac equals (A_λ ⊗ G_λ)^{-1} vec(M) with explicit np.kron."""
    with jax.enable_x64(True):
        model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2, use_bias=False)])
        x = jax.random.normal(jax.random.key(0), (9, 4), jnp.float64)
        y = jax.random.normal(jax.random.key(2), (9, 2), jnp.float64)
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), model.init(jax.random.key(1), x)["params"]
        )
        loss = kfqn_jax.losses.squared_error()
        out = kfx.value_grads_and_stats(
            model, params, x, targets=y, loss=loss, rng=jax.random.key(3), sampled="cotangents"
        )
        lam = 0.05
        tx = kfqn_jax.scale_by_kfac(lam, ema_decay=0.0, momentum=0.0, pi_damping=True)
        state = tx.init(params)
        upd, state = tx.update(out.grads, state, params, layer_stats=out.stats)
        for i, (name, has_bias) in enumerate((("layers_0", True), ("layers_2", False))):
            a = np.asarray(state.a_factors[i])
            g = np.asarray(state.g_factors[i])
            pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
            a_d = a + pi * np.sqrt(lam) * np.eye(a.shape[0])
            g_d = g + np.sqrt(lam) / pi * np.eye(g.shape[0])
            m = np.asarray(out.grads[name]["kernel"])
            if has_bias:
                m = np.vstack([m, np.asarray(out.grads[name]["bias"])[None]])
            want = np.linalg.solve(np.kron(a_d, g_d), m.reshape(-1)).reshape(m.shape)
            got = np.asarray(upd[name]["kernel"])
            if has_bias:
                got = np.vstack([got, np.asarray(upd[name]["bias"])[None]])
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_conv_factors_follow_kfc_convention():
    """Conv: A = (1/B) Σ_{b,t} ã ãᵀ over patches, G = (B/|T|) Σ_{b,t} g gᵀ, against patches
    built by explicit slicing (no conv_general_dilated_patches)."""
    with jax.enable_x64(True):
        model = nn.Conv(3, (2, 2), padding="VALID")
        x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2), jnp.float64)
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64), model.init(jax.random.key(1), x)["params"]
        )
        y = jnp.zeros((2, 3, 3, 3), jnp.float64)
        loss = kfqn_jax.losses.squared_error()
        out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
        tx = kfqn_jax.scale_by_kfac(1e-3, fisher="empirical", ema_decay=0.0, momentum=0.0)
        state = tx.init(params)
        _, state = tx.update(out.grads, state, params, layer_stats=out.stats)
        xs = np.asarray(x)
        patches = np.stack(
            [
                np.concatenate([xs[:, i : i + 2, j : j + 2, :].reshape(2, -1), np.ones((2, 1))], 1)
                for i in range(3)
                for j in range(3)
            ],
            axis=1,
        )  # (B, T, 2*2*2 + 1) in (kh, kw, C) order
        a_ref = np.einsum("bti,btj->ij", patches, patches) / 2
        np.testing.assert_allclose(np.asarray(state.a_factors[0]), a_ref, rtol=1e-10)
        # Cotangent of the mean loss at each output position, by hand.
        z = np.asarray(model.apply({"params": params}, x))
        g = (z - np.asarray(y)) / (2 * 3 * 3)
        g = g.reshape(2, 9, 3)
        g_ref = np.einsum("bti,btj->ij", g, g) * (2 / 9)
        np.testing.assert_allclose(np.asarray(state.g_factors[0]), g_ref, rtol=1e-10)


@pytest.mark.parametrize("schedule", ["all", "staggered"])
def test_inverse_refresh_periods_and_nan_statistics_keep_old_inverse(schedule):
    model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    x = jax.random.normal(jax.random.key(0), (8, 4))
    y = jax.random.normal(jax.random.key(2), (8, 2))
    params = model.init(jax.random.key(1), x)["params"]
    loss = kfqn_jax.losses.squared_error()
    tx = kfqn_jax.scale_by_kfac(
        0.1, inverse_every=3, stats_every=1, inverse_schedule=schedule, momentum=0.0
    )
    state = tx.init(params)

    @jax.jit
    def step(state, scale):
        out = kfx.value_grads_and_stats(
            model,
            params,
            x * scale,
            targets=y,
            loss=loss,
            rng=jax.random.key(0),
            sampled="cotangents",
        )
        return tx.update(out.grads, state, params, layer_stats=out.stats)

    invs = []
    for _ in range(7):
        _, state = step(state, 1.0 + 0.1 * len(invs))
        invs.append(state.a_inverses[0])
    # Early phase (count < 3) refreshes every step; later only when (count + phase) % 3 == 0.
    changed = [not np.allclose(invs[k], invs[k - 1]) for k in range(1, 7)]
    if schedule == "all":
        assert changed == [True, True, True, False, False, True]
    assert any(changed[2:]) and not all(changed[2:])
    # Non-finite statistics: the factors become NaN but the old inverses are kept.
    _, state2 = step(state, jnp.nan)
    assert all(bool(jnp.all(jnp.isfinite(i))) for i in state2.a_inverses + state2.g_inverses)


def test_kfac_trains_tiny_autoencoder_better_than_adam():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4), nn.Dense(16), nn.relu, nn.Dense(20)])
    x = (jax.random.uniform(jax.random.key(0), (128, 20)) > 0.7).astype(jnp.float32)
    params0 = model.init(jax.random.key(1), x)["params"]
    loss = kfqn_jax.losses.sigmoid_cross_entropy()

    def run(tx, stats):
        params, state = params0, tx.init(params0)

        @jax.jit
        def step(params, state, k):
            out = kfx.value_grads_and_stats(
                model, params, x, targets=x, loss=loss, rng=k, sampled="cotangents"
            )
            extra = {"layer_stats": out.stats} if stats else {}
            upd, state = tx.update(out.grads, state, params, **extra)
            return optax.apply_updates(params, upd), state, out.loss

        for i in range(60):
            params, state, _ = step(params, state, jax.random.key(i))
        return float(loss(model.apply({"params": params}, x), x))

    l_kfac = run(kfqn_jax.kfac(0.1, 0.1, inverse_every=5), True)
    l_adam = run(optax.adam(1e-2), False)
    assert l_kfac < l_adam


def test_warm_start_takes_no_step_and_averages_factors():
    model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    params = model.init(jax.random.key(1), jnp.zeros((1, 4)))["params"]
    loss = kfqn_jax.losses.squared_error()
    tx = kfqn_jax.scale_by_kfac(0.1, fisher="empirical", momentum=0.0, ema_decay=0.5)
    state = tx.init(params)
    a_batches = []
    for i in range(3):
        x = jax.random.normal(jax.random.key(10 + i), (5, 4))
        y = jax.random.normal(jax.random.key(20 + i), (5, 2))
        out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
        upd, state = tx.update(out.grads, state, params, layer_stats=out.stats, warm_start=True)
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(upd))
        xa = np.concatenate([np.asarray(x), np.ones((5, 1))], 1)
        a_batches.append(xa.T @ xa / 5)
    assert int(state.count) == 0 and int(state.stats_count) == 3
    # Arithmetic mean over the warm-start batches (not the EMA with decay 0.5).
    np.testing.assert_allclose(state.a_factors[0], np.mean(a_batches, 0), rtol=1e-5, atol=1e-6)
