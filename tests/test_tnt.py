"""TNT against dense float64 references, the sampled-label gradient helper, and the invariant
checks on a model with LayerNorm, Embed and a 3-D DenseGeneral kernel (TNT and Shampoo)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfqn_jax
from kfqn_jax import flax as kfx
from kfqn_jax._src import tnt as tnt_lib

# ------------------------------------------------------------------------------------------------
# Dense float64 references, written independently of the implementation (explicit np.kron).
# ------------------------------------------------------------------------------------------------


def np_contractions(g, modes, full=None):
    x = np.asarray(g, np.float64).reshape(modes)
    out = []
    for i, d in enumerate(modes):
        xi = np.moveaxis(x, i, 0).reshape(d, -1)
        c = xi @ xi.T
        if full is not None and not full[i]:
            c = np.diag(np.diag(c))
        out.append(c)
    return out


def np_normalise(stats, modes):
    """The authors' formula: c from tr S_1, U_i = S_i / (c^(k-1) prod_{j != i} d_j)."""
    k, n = len(modes), math.prod(modes)
    c = (np.trace(stats[0]) / n) ** (1.0 / k)
    return [s / (c ** (k - 1) * (n // d)) for s, d in zip(stats, modes, strict=True)]


def np_kron(mats):
    out = np.ones((1, 1))
    for m in mats:
        out = np.kron(out, m)
    return out


def np_tnt_direction(m, stats, modes, eps_per_mode):
    """Solve (⊗_i (U_i + ε_i I)) vec(Δ) = vec(m) with the row-major vec."""
    us = np_normalise(stats, modes)
    big = np_kron([u + e * np.eye(len(u)) for u, e in zip(us, eps_per_mode, strict=True)])
    return np.linalg.solve(big, np.asarray(m, np.float64).reshape(-1)).reshape(np.shape(m))


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float64)


def _one_step(shape, damping, **kw):
    g = {"w": _rand(0, shape)}
    gs = {"w": _rand(1, shape)}
    tx = kfqn_jax.scale_by_tnt(damping, **kw)
    state = tx.init(g)
    upd, state = tx.update(g, state, sampled_grads=gs)
    return g["w"], gs["w"], upd["w"], state


# ------------------------------------------------------------------------------------------------
# Reference tests.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,reshape,modes",
    [
        ((), "none", (1,)),
        ((5,), "none", (5,)),
        ((3, 4), "none", (3, 4)),
        ((2, 3, 4), "none", (2, 3, 4)),
        ((2, 3, 2, 3), "none", (2, 3, 2, 3)),
        ((2, 2, 3, 4), "filter_flattening", (4, 3, 4)),
        ((1, 1, 3, 4), "filter_flattening", (3, 4)),
    ],
)
def test_first_step_matches_dense_kron(shape, reshape, modes):
    with jax.enable_x64(True):
        eps = 0.3
        g, gs, upd, state = _one_step(shape, eps, reshape=reshape, momentum=0.9)
        assert tnt_lib.mode_sizes((), shape, reshape) == modes
        assert len(state.factors["w"]) == len(modes)
        stats = np_contractions(gs, modes)
        for s_ref, s in zip(stats, state.factors["w"], strict=True):
            np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-14)
        ref = np_tnt_direction(g, stats, modes, [eps] * len(modes))
        assert upd.dtype == jnp.float64
        np.testing.assert_allclose(upd, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k_shape", [(6,), (3, 4), (2, 3, 4), (2, 3, 2, 3)])
def test_same_trace_normalisation(k_shape):
    with jax.enable_x64(True):
        g = _rand(2, k_shape)
        layout = tnt_lib.ModeLayout(k_shape, k_shape, (True,) * len(k_shape))
        stats = tnt_lib.mode_contractions(g, layout)
        us = [np.asarray(u) for u in tnt_lib.normalized_factors(stats, layout)]
        avg = [np.trace(u) / len(u) for u in us]
        np.testing.assert_allclose(avg, avg[0], rtol=1e-12)
        tr_s = float(np.sum(np.square(g)))
        for s in stats:  # every contraction has trace ||G||^2
            np.testing.assert_allclose(np.trace(s), tr_s, rtol=1e-12)
        np.testing.assert_allclose(np.trace(np_kron(us)), tr_s, rtol=1e-10)
        for u, u_ref in zip(us, np_normalise([np.asarray(s) for s in stats], k_shape), strict=True):
            np.testing.assert_allclose(u, u_ref, rtol=1e-10)


def test_blocked_symmetric_contractions_of_large_modes():
    with jax.enable_x64(True):
        shape = (1100, 3, 2)  # mode 0 is split twice (1100 -> 550 -> 275)
        g = _rand(7, shape)
        layout = tnt_lib.ModeLayout(shape, shape, (True, True, True))
        for c, c_ref in zip(
            tnt_lib.mode_contractions(g, layout), np_contractions(g, shape), strict=True
        ):
            np.testing.assert_allclose(c, c_ref, rtol=1e-12, atol=1e-12)
        # The diagonals read from the products equal those of the assembled contractions;
        # a diagonal mode's statistic is its own diagonal.
        layout = tnt_lib.ModeLayout(shape, shape, (True, False, True))
        cs, ds = tnt_lib.mode_contractions(g, layout, with_diagonals=True)
        for c, dg, full in zip(cs, ds, layout.full, strict=True):
            np.testing.assert_array_equal(dg, np.diagonal(c) if full else c)


@pytest.mark.parametrize("mode", tnt_lib.DAMPING_MODES)
def test_damping_modes(mode):
    with jax.enable_x64(True):
        eps, shape = 0.05, (2, 3, 4)
        g, gs, upd, _ = _one_step(shape, eps, reshape="none", damping_mode=mode, momentum=0.0)
        stats = np_contractions(gs, shape)
        us = np_normalise(stats, shape)
        k = len(shape)
        table = {
            "constant": [eps] * k,
            "root": [eps ** (1 / k)] * k,
            "max_eigenvalue": [eps * np.linalg.eigvalsh(u).max() for u in us],
            "mean_eigenvalue": [eps * np.trace(u) / len(u) for u in us],
            "trace": [eps * np.trace(u) for u in us],
        }
        ref = np_tnt_direction(g, stats, shape, table[mode])
        np.testing.assert_allclose(upd, ref, rtol=1e-10, atol=1e-12)


def test_diagonal_fallback_above_max_dim():
    with jax.enable_x64(True):
        eps, shape = 0.2, (2, 5, 3)
        g, gs, upd, state = _one_step(shape, eps, reshape="none", max_dim=3, momentum=0.0)
        assert [f.shape for f in state.factors["w"]] == [(2, 2), (5,), (3, 3)]
        full = (True, False, True)
        stats = np_contractions(gs, shape, full)
        ref = np_tnt_direction(g, stats, shape, [eps] * 3)
        np.testing.assert_allclose(upd, ref, rtol=1e-10, atol=1e-12)


def test_ema_and_momentum_over_two_steps():
    with jax.enable_x64(True):
        eps, mu, shape = 0.1, 0.9, (3, 4)
        gs = [_rand(10 + i, shape) for i in range(3)]
        sgs = [_rand(20 + i, shape) for i in range(3)]
        tx = kfqn_jax.scale_by_tnt(eps, momentum=mu, ema_decay=0.6, inverse_every=1)
        state = tx.init({"w": gs[0]})
        step = jax.jit(lambda a, s, b: tx.update({"w": a}, s, sampled_grads={"w": b}))
        m = np.zeros(shape)
        s_ref = [np.zeros((3, 3)), np.zeros((4, 4))]
        for i in range(3):
            upd, state = step(gs[i], state, sgs[i])
            w = max(1 - 0.6, 1 / (i + 1))  # running mean first, then the EMA weight
            s_ref = [
                (1 - w) * a + w * c
                for a, c in zip(s_ref, np_contractions(sgs[i], shape), strict=True)
            ]
            m = mu * m + np.asarray(gs[i])
            np.testing.assert_allclose(
                upd["w"], np_tnt_direction(m, s_ref, shape, [eps, eps]), rtol=1e-10
            )
        assert int(state.stats_count) == 3 and int(state.count) == 3


def _run_schedule(lazy):
    shape = (3, 4)
    tx = kfqn_jax.scale_by_tnt(0.1, stats_every=2, inverse_every=4)
    state = tx.init({"w": jnp.zeros(shape)})

    @jax.jit
    def step(i, state):
        g = {"w": jax.random.normal(jax.random.fold_in(jax.random.key(3), i), shape)}
        gs = jax.tree.map(lambda x: 2.0 * x + 1.0, g)
        return tx.update(g, state, sampled_grads=(lambda: gs) if lazy else gs)

    out = []
    for i in range(9):
        _, new = step(i, state)
        out.append((state, new))
        state = new
    return out


def test_periods_and_early_schedule():
    eager = _run_schedule(lazy=False)
    refresh = []
    for i, (old, new) in enumerate(eager):
        changed = not np.allclose(old.inverses["w"][0], new.inverses["w"][0])
        refresh.append(changed)
        assert int(new.stats_count) == i // 2 + 1
    # T1 = 2, T2 = 4: at every statistics step while count < T2, then every T2 steps.
    assert refresh == [True, False, True, False, True, False, False, False, True]
    lazy = _run_schedule(lazy=True)
    for (_, a), (_, b) in zip(eager, lazy, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_empirical_fisher_uses_the_gradient():
    g = {"w": jax.random.normal(jax.random.key(4), (3, 4))}
    emp = kfqn_jax.scale_by_tnt(0.1, fisher="empirical")
    true = kfqn_jax.scale_by_tnt(0.1)
    a, _ = emp.update(g, emp.init(g))
    b, _ = true.update(g, true.init(g), sampled_grads=g)
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="sampled_grads"):
        true.update(g, true.init(g), sampled_grads={"v": g["w"]})


def test_warm_start_and_decoupled_weight_decay():
    params = {"w": jax.random.normal(jax.random.key(5), (3, 4))}
    batches = [jax.random.normal(jax.random.key(6 + i), (3, 4)) for i in range(3)]
    tx = kfqn_jax.tnt(learning_rate=0.1, damping=0.1, weight_decay=0.5)
    state = tx.init(params)
    for b in batches:
        upd, state = tx.update({"w": b}, state, params, sampled_grads={"w": b}, warm_start=True)
        assert not np.any(np.asarray(upd["w"]))
    tnt_state = state[0]
    assert int(tnt_state.count) == 0 and int(tnt_state.stats_count) == 3
    mean = sum(np.asarray(b) @ np.asarray(b).T for b in batches) / 3
    np.testing.assert_allclose(tnt_state.factors["w"][0], mean, rtol=1e-5)
    # Decoupled weight decay: θ ← θ − α (Δ + τ θ), Δ from the same TNT state.
    g = {"w": batches[0]}
    upd, _ = tx.update(g, state, params, sampled_grads=g)
    direction, _ = kfqn_jax.scale_by_tnt(0.1).update(g, tnt_state, sampled_grads=g)
    np.testing.assert_allclose(
        upd["w"], -0.1 * (direction["w"] + 0.5 * params["w"]), rtol=1e-5, atol=1e-7
    )


# ------------------------------------------------------------------------------------------------
# The sampled-label gradient helper.
# ------------------------------------------------------------------------------------------------


class _MLP(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out)(nn.tanh(nn.Dense(6)(x)))


@pytest.mark.parametrize(
    "loss,make_targets",
    [
        ("softmax_cross_entropy", lambda k, s: jax.random.randint(k, s[:-1], 0, s[-1])),
        ("sigmoid_cross_entropy", lambda k, s: jax.random.bernoulli(k, 0.5, s).astype(float)),
        ("squared_error", lambda k, s: jax.random.normal(k, s)),
    ],
)
def test_value_and_sampled_grad_matches_separate_passes(loss, make_targets):
    model = _MLP(4)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    params = model.init(jax.random.key(1), x)["params"]
    y = make_targets(jax.random.key(2), (5, 4))
    rng = jax.random.key(3)
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    loss_obj = kfqn_jax.losses.as_loss(loss)
    value, grads, sampled = jax.jit(
        lambda p: kfqn_jax.value_and_sampled_grad(apply_fn, p, x, targets=y, loss=loss, rng=rng)
    )(params)
    ref_v, ref_g = jax.value_and_grad(lambda p: loss_obj(apply_fn(p, x), y))(params)
    y_hat = loss_obj.sample(rng, apply_fn(params, x))
    ref_s = jax.grad(lambda p: loss_obj(apply_fn(p, x), y_hat))(params)
    np.testing.assert_allclose(value, ref_v, rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves((grads, sampled)), jax.tree.leaves((ref_g, ref_s)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The Flax capture gives the same sampled-label gradient for the same key.
    out = kfx.value_grads_and_stats(
        model, params, x, targets=y, loss=loss, rng=rng, sampled="grads"
    )
    for a, b in zip(jax.tree.leaves(out.sampled_grads), jax.tree.leaves(sampled), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_value_and_sampled_grad_custom_sampler_lazy_and_aux():
    w = {"w": jax.random.normal(jax.random.key(0), (3, 2))}
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jnp.ones((4, 2))

    def apply_fn(p, x):
        z = x @ p["w"]
        return z, {"mean": jnp.mean(z)}

    def loss(z, t):  # Laplace likelihood, sampled by the user
        return jnp.mean(jnp.sum(jnp.abs(z - t), -1))

    def sampler(rng, z):
        return z + jax.random.laplace(rng, z.shape)

    with pytest.raises(ValueError, match="sampler"):
        kfqn_jax.value_and_sampled_grad(
            lambda p, x: apply_fn(p, x)[0], w, x, targets=y, loss=loss, rng=jax.random.key(2)
        )
    (value, aux), grads, sampled = kfqn_jax.value_and_sampled_grad(
        apply_fn,
        w,
        x,
        targets=y,
        loss=loss,
        rng=jax.random.key(2),
        sampler=sampler,
        has_aux=True,
        lazy=True,
    )
    assert callable(sampled) and "mean" in aux
    y_hat = sampler(jax.random.key(2), x @ w["w"])
    ref = jax.grad(lambda p: loss(x @ p["w"], y_hat))(w)
    np.testing.assert_allclose(sampled()["w"], ref["w"], rtol=1e-6)
    np.testing.assert_allclose(value, loss(x @ w["w"], y), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Invariant checks on a model with LayerNorm, Embed and a 3-D DenseGeneral kernel.
# ------------------------------------------------------------------------------------------------


class _TokenModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(13, 8)(tokens)  # (B, L, 8)
        h = nn.DenseGeneral(features=(2, 4), axis=-1)(h)  # kernel (8, 2, 4)
        h = h.reshape(h.shape[:-2] + (8,))
        h = nn.LayerNorm()(nn.gelu(h))
        return nn.Dense(3)(jnp.mean(h, axis=1))


def _token_problem(dtype):
    model = _TokenModel()
    tokens = jax.random.randint(jax.random.key(0), (6, 5), 0, 13)
    y = jax.random.randint(jax.random.key(1), (6,), 0, 3)
    params = model.init(jax.random.key(2), tokens)["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    apply_fn = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    return apply_fn, params, tokens, y


_FACTORIES = {
    "tnt": (
        kfqn_jax.tnt,
        dict(learning_rate=0.05, damping=0.1, inverse_every=2),
        ("stats_every", "inverse_every", "momentum", "max_dim"),
    ),
    "shampoo": (
        kfqn_jax.shampoo,
        dict(learning_rate=0.05, damping=1e-3, inverse_every=2),
        ("stats_every", "inverse_every", "momentum", "max_dim", "root_order", "newton_iters"),
    ),
}


def _train_step(tx, apply_fn, tokens, y, traces=None):
    def step(params, state):
        if traces is not None:
            traces.append(1)
        loss, grads, sampled = kfqn_jax.value_and_sampled_grad(
            apply_fn,
            params,
            tokens,
            targets=y,
            loss="softmax_cross_entropy",
            rng=jax.random.key(7),
            lazy=True,
        )
        updates, state = tx.update(grads, state, params, sampled_grads=sampled)
        return optax.apply_updates(params, updates), state, updates, loss

    return jax.jit(step)


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_any_flax_model_invariants(name):
    factory, kwargs, _ = _FACTORIES[name]
    apply_fn, params, tokens, y = _token_problem(jnp.float32)
    tx = optax.chain(optax.clip_by_global_norm(1.0), factory(**kwargs, max_dim=10))
    state = tx.init(params)
    inner = state[1][0]
    facs = inner.factors
    # Every leaf is covered: 3 modes for the 3-D kernel, the vocabulary (13 > max_dim) diagonal.
    assert [f.shape for f in facs["DenseGeneral_0"]["kernel"]] == [(8, 8), (2, 2), (4, 4)]
    assert [f.shape for f in facs["Embed_0"]["embedding"]] == [(13,), (8, 8)]
    assert [f.shape for f in facs["LayerNorm_0"]["scale"]] == [(8, 8)]
    traces = []
    step = _train_step(tx, apply_fn, tokens, y, traces)
    types0 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    losses = []
    for _ in range(4):
        params, state, _, loss = step(params, state)
        losses.append(float(loss))
    assert len(traces) == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == types0
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("name", sorted(_FACTORIES))
def test_any_flax_model_bf16(name):
    factory, kwargs, _ = _FACTORIES[name]
    apply_fn, params, tokens, y = _token_problem(jnp.bfloat16)
    tx = factory(**kwargs)
    state = tx.init(params)
    params1, state1, updates, _ = _train_step(tx, apply_fn, tokens, y)(params, state)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.dtype == p.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
    for leaf in jax.tree.leaves(state1):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
