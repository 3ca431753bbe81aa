"""The named steps of kfqn_jax/_src/kbfgs.py, one at a time, against dense float64 references
written here in NumPy: the EMA of ``A``, the periodic damped inverse of ``H_a``, the momentum and
the preconditioning, the double-damped G-side BFGS (and L-BFGS) update, the A-side Hessian-action
update, the declared requirements, and the decoupled ``weight_decay`` versus the coupled
``l2_reg`` of the aliases (the first step computed by hand).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfqn_jax
from kfqn_jax import flax as kfx
from kfqn_jax._src import bfgs
from kfqn_jax._src import kbfgs as kb

RTOL, ATOL = 1e-10, 1e-12


def _opts(**kw):
    args = dict(
        name="kbfgs",
        limited=False,
        damping=0.3,
        trial_step_size=1.0,
        memory_size=1,
        extra_pass="closure",
        double_damping="2020",
        powell_mu=0.2,
        conv_damping_split=True,
        a_side="hessian_action",
        inverse_every=20,
        a_statistic="ema",
        ema_decay=0.9,
        pair_decay=0.9,
        momentum=0.9,
        skip_eps=1e-4,
        max_growth=None,
        layers=None,
        fallback=None,
        on_nonfinite="skip",
    )
    args.update(kw)
    return kb._Options(**args)


def _block(h_a, h_g, s_bar=None, y_bar=None, a_factor=None, momentum=None):
    return kb._Block(a_factor, h_a, h_g, s_bar, y_bar, None, None, momentum)


def _spd(n, rng):
    q = rng.normal(size=(n, n))
    return q @ q.T / n + 0.5 * np.eye(n)


def _inputs(rng, rows=5, positions=1, d_a=4, lam_a=0.7, mu2=0.4):
    a2 = rng.normal(size=(rows * positions, d_a)) + 0.3
    a2[:, -1] = 1.0  # the homogeneous column
    return kb._Inputs(jnp.asarray(a2), jnp.asarray(a2.mean(0)), rows, lam_a, mu2), a2


def _close(actual, desired):
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# NumPy references.


def _np_bfgs(h, s, y):
    """Product form (I - rho s y^T) H (I - rho y s^T) + rho s s^T."""
    rho = 1.0 / (s @ y)
    e = np.eye(len(s))
    return (e - rho * np.outer(s, y)) @ h @ (e - rho * np.outer(y, s)) + rho * np.outer(s, s)


def _np_double_damping(s, y, h, mu1, mu2, form):
    taken = set()
    hy = h @ y
    if s @ y <= mu1 * (y @ hy):
        theta = (1 - mu1) * (y @ hy) / (y @ hy - s @ y)
        s = theta * s + (1 - theta) * hy
        taken.add("powell_h")
    if form == "lm":
        return s, y + mu2 * s, taken
    if s @ y <= mu2 * (s @ s):
        theta = (1 - mu2) * (s @ s) / (s @ s - s @ y)
        y = theta * y + (1 - theta) * s
        taken.add("powell_identity")
    return s, y, taken


def _np_g_side(hg, s_bar, y_bar, s, y, g_norm, mu2, *, decay, form, eps, max_growth=None):
    """The G side of one step on dense arrays: (H_g, s_bar, y_bar, accepted, branches)."""
    s_bar = decay * s_bar + (1 - decay) * s if decay > 0 else s
    y_bar = decay * y_bar + (1 - decay) * y if decay > 0 else y
    ds, dy, taken = _np_double_damping(s_bar, y_bar, hg, 0.2, mu2, form)
    sy = ds @ dy
    ok = sy > 0 and sy > eps * (ds @ ds) * g_norm
    new = _np_bfgs(hg, ds, dy) if ok else hg
    if ok and max_growth is not None and np.linalg.norm(new) > max_growth * np.linalg.norm(hg):
        ok, new = False, hg
    return new, s_bar, y_bar, ok, taken, (ds, dy)


def _np_lbfgs_dense(pairs, d):
    """The L-BFGS matrix as the recursion of dense BFGS updates of the identity."""
    h = np.eye(d)
    for s, y in pairs:
        h = _np_bfgs(h, s, y)
    return h


def _pair(rng, d, curvature):
    """A pair whose s^T y has the sign of ``curvature`` (a negative one triggers damping)."""
    s = rng.normal(size=d)
    y = curvature * s + 0.3 * rng.normal(size=d)
    return s, y


# ---------------------------------------------------------------------------------------------
# The G side: EMA of the pair, double damping, skip rules, BFGS / L-BFGS update.

# (form, pair_decay, curvature of the pair, mu2): a negative curvature takes the Powell step on
# H, a large mu2 the Powell step on the identity.
G_CASES = [
    (form, decay, c, mu2)
    for form in ("2020", "lm")
    for decay in (0.9, 0.0)
    for c, mu2 in ((1.0, 0.55), (-1.0, 0.55), (1.0, 3.0))
]


@pytest.mark.parametrize("form,decay,curvature,mu2", G_CASES)
def test_g_side_update_matches_dense_double_damped_bfgs(form, decay, curvature, mu2):
    with jax.enable_x64(True):
        rng = np.random.default_rng(G_CASES.index((form, decay, curvature, mu2)))
        d = 5
        hg = _spd(d, rng)
        (s_bar, y_bar), (s, y) = _pair(rng, d, curvature), _pair(rng, d, curvature)
        g_norm = 0.8
        opts = _opts(double_damping=form, pair_decay=decay)
        blk = _block(jnp.eye(3), jnp.asarray(hg), jnp.asarray(s_bar), jnp.asarray(y_bar))
        out = kb._g_side_update(opts, blk, jnp.asarray(s), jnp.asarray(y), g_norm, mu2, True)
        want, ws, wy, ok, taken, (ds, dy) = _np_g_side(
            hg, s_bar, y_bar, s, y, g_norm, mu2, decay=decay, form=form, eps=1e-4
        )
        assert ok
        _close(out.s_bar, ws)
        _close(out.y_bar, wy)
        _close(out.h_g, want)
        # The new H_g satisfies the secant condition on the damped pair and stays SPD.
        _close(np.asarray(out.h_g) @ dy, ds)
        assert np.linalg.eigvalsh(np.asarray(out.h_g)).min() > 0
        if curvature < 0:
            assert "powell_h" in taken, taken
        if form == "2020" and mu2 > 1:
            assert "powell_identity" in taken, taken


def test_g_side_skip_rules_and_inactive_steps():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        d = 4
        hg, s_bar, y_bar = _spd(d, rng), rng.normal(size=d), rng.normal(size=d)
        s, y = _pair(rng, d, 1.0)
        blk = _block(jnp.eye(2), jnp.asarray(hg), jnp.asarray(s_bar), jnp.asarray(y_bar))
        args = (jnp.asarray(s), jnp.asarray(y))
        # A huge |g| fails eps s^T s |g| < s^T y: H_g stays, the EMA of the pair moves.
        out = kb._g_side_update(_opts(), blk, *args, 1e12, 0.5, True)
        want, ws, _, ok, _, _ = _np_g_side(
            hg, s_bar, y_bar, s, y, 1e12, 0.5, decay=0.9, form="2020", eps=1e-4
        )
        assert not ok
        _close(out.h_g, want)
        _close(out.s_bar, ws)
        # An inactive step (skipped, or the first lagged one) changes nothing.
        out = kb._g_side_update(_opts(), blk, *args, 0.5, 0.5, False)
        for got, old in ((out.h_g, hg), (out.s_bar, s_bar), (out.y_bar, y_bar)):
            np.testing.assert_array_equal(np.asarray(got), old)
        # max_growth rejects an update that grows |H_g|_F too much, and only then.
        for growth in (1.0001, 1e6):
            out = kb._g_side_update(_opts(max_growth=growth), blk, *args, 0.5, 0.5, True)
            want, *_ = _np_g_side(
                hg, s_bar, y_bar, s, y, 0.5, 0.5, decay=0.9, form="2020", eps=1e-4,
                max_growth=growth,
            )
            _close(out.h_g, want)
        assert not np.allclose(want, hg)


@pytest.mark.parametrize("form", ["2020", "lm"])
def test_g_side_update_of_the_lbfgs_memory_matches_dense_recursion(form):
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        d, size = 5, 3
        old_pairs = [_pair(rng, d, 1.0) for _ in range(2)]
        old_pairs = [(s, y + 2.0 * s) for s, y in old_pairs]  # s^T y > 0
        mem = bfgs.lbfgs_init(size, d, jnp.float64)
        for s, y in old_pairs:
            mem = bfgs.lbfgs_push(mem, jnp.asarray(s), jnp.asarray(y), jnp.asarray(True))
        s_bar, y_bar = rng.normal(size=d), rng.normal(size=d)
        s, y = _pair(rng, d, -1.0)
        blk = _block(jnp.eye(2), mem, jnp.asarray(s_bar), jnp.asarray(y_bar))
        opts = _opts(limited=True, memory_size=size, double_damping=form)
        out = kb._g_side_update(opts, blk, jnp.asarray(s), jnp.asarray(y), 0.3, 0.45, True)
        hg = _np_lbfgs_dense(old_pairs, d)
        want, *_, ok, _, new_pair = _np_g_side(
            hg, s_bar, y_bar, s, y, 0.3, 0.45, decay=0.9, form=form, eps=1e-4
        )
        assert ok and int(out.h_g.count) == 3
        _close(out.h_g.s[-1], new_pair[0])
        _close(out.h_g.y[-1], new_pair[1])
        _close(bfgs.lbfgs_apply(out.h_g, jnp.eye(d)), want)


# ---------------------------------------------------------------------------------------------
# The A side: EMA of A, periodic inverse, Hessian-action update.


@pytest.mark.parametrize("a_count,warm_start", [(0, False), (5, False), (3, True)])
def test_accumulate_a_is_the_weighted_ema_of_the_gram(a_count, warm_start):
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x, a2 = _inputs(rng, rows=3, positions=2)
        old = _spd(4, rng)
        blocks = [_block(jnp.eye(4), None, a_factor=jnp.asarray(old))]
        blocks, count, ok = kb._accumulate_a(
            _opts(), blocks, [x], jnp.asarray(a_count), jnp.asarray(True), warm_start, jnp.float64
        )
        w = 1 / (a_count + 1) if warm_start else max(0.1, 1 / (a_count + 1))
        _close(blocks[0].a_factor, (1 - w) * old + w * (a2.T @ a2 / 3))
        assert int(count) == a_count + 1 and bool(ok)
        # A non-finite input is caught by the fused check and leaves the factor alone.
        bad = x._replace(a2=x.a2.at[0, 0].set(jnp.nan))
        blocks2, count2, ok2 = kb._accumulate_a(
            _opts(), blocks, [bad], count, jnp.asarray(True), False, jnp.float64
        )
        assert not bool(ok2) and int(count2) == int(count)
        np.testing.assert_array_equal(np.asarray(blocks2[0].a_factor), blocks[0].a_factor)


@pytest.mark.parametrize("a_statistic", ["ema", "minibatch"])
def test_refresh_h_a_is_the_damped_inverse_when_due(a_statistic):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x, a2 = _inputs(rng)
        a_f = _spd(4, rng)
        h_a = _spd(4, rng)
        a = a_f if a_statistic == "ema" else a2.T @ a2 / x.rows
        want = np.linalg.inv(a + x.lam_a * np.eye(4))
        blk = _block(jnp.asarray(h_a), None, a_factor=jnp.asarray(a_f))
        cases = [  # (a_side, count, ok, inverted)
            ("hessian_action", 0, True, True),
            ("hessian_action", 3, True, False),
            ("inverse", 3, True, True),
            ("inverse", 4, True, False),
            ("inverse", 0, False, False),
        ]
        for a_side, count, ok, inverted in cases:
            opts = _opts(a_side=a_side, inverse_every=3, a_statistic=a_statistic)
            out = kb._refresh_h_a(opts, blk, x, jnp.asarray(count), jnp.asarray(ok))
            _close(out.h_a, want if inverted else h_a)


@pytest.mark.parametrize("a_statistic", ["ema", "minibatch"])
def test_hessian_action_update_matches_dense_bfgs(a_statistic):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x, a2 = _inputs(rng, rows=2, positions=3)
        a_f, h_a = _spd(4, rng), _spd(4, rng)
        blk = _block(jnp.asarray(h_a), None, a_factor=jnp.asarray(a_f))
        out = kb._hessian_action_update(_opts(a_statistic=a_statistic), blk, x, jnp.asarray(True))
        a = a_f if a_statistic == "ema" else a2.T @ a2 / x.rows
        s_a = h_a @ a2.mean(0)
        y_a = (a + x.lam_a * np.eye(4)) @ s_a
        _close(out.h_a, _np_bfgs(h_a, s_a, y_a))
        _close(np.asarray(out.h_a) @ y_a, s_a)  # secant condition
        skipped = kb._hessian_action_update(_opts(), blk, x, jnp.asarray(False))
        np.testing.assert_array_equal(np.asarray(skipped.h_a), h_a)


# ---------------------------------------------------------------------------------------------
# Momentum and preconditioning.


@pytest.mark.parametrize("limited", [False, True])
def test_momentum_and_preconditioning_match_dense_products(limited):
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        d_a, d_g, rho = 4, 3, 0.8
        h_a, grad, old = _spd(d_a, rng), rng.normal(size=(d_a, d_g)), rng.normal(size=(d_a, d_g))
        if limited:
            s, y = _pair(rng, d_g, 1.0)
            y = y + 2.0 * s
            h_g = bfgs.lbfgs_push(
                bfgs.lbfgs_init(2, d_g, jnp.float64), jnp.asarray(s), jnp.asarray(y), True
            )
            dense_hg = _np_lbfgs_dense([(s, y)], d_g)
        else:
            h_g = dense_hg = _spd(d_g, rng)
        h_g = h_g if limited else jnp.asarray(h_g)
        blk = _block(jnp.asarray(h_a), h_g, momentum=jnp.asarray(old))
        mat, blk2 = kb._momentum_step(rho, blk, jnp.asarray(grad), jnp.asarray(True))
        m_bar = rho * old + (1 - rho) * grad
        _close(mat, m_bar)
        _close(blk2.momentum, m_bar)
        _close(kb._precondition_block(limited, blk2, mat), h_a @ m_bar @ dense_hg)
        _, kept = kb._momentum_step(rho, blk, jnp.asarray(grad), jnp.asarray(False))
        np.testing.assert_array_equal(np.asarray(kept.momentum), old)
        same, _ = kb._momentum_step(0.0, blk, jnp.asarray(grad), True)
        _close(same, grad)


# ---------------------------------------------------------------------------------------------
# Declared requirements.


def test_requirements_follow_the_extra_pass():
    params = {"Dense_0": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)}}
    closure = kfqn_jax.requirements(kfqn_jax.kbfgs(0.1), params)
    lagged = kfqn_jax.requirements(kfqn_jax.kbfgs_l(0.1, extra_pass="lagged"), params)
    assert closure.extra_args == ("layer_stats", "stats_fn")
    assert lagged.extra_args == ("layer_stats",)
    for reqs in (closure, lagged):
        assert reqs.with_outputs and reqs.sampled is None and not reqs.exact_fisher


# ---------------------------------------------------------------------------------------------
# The aliases: decoupled weight_decay (with its mask) versus coupled l2_reg, by hand.


def _first_step(lr, damping, rho, **kw):
    model = nn.Dense(3)
    x = jax.random.normal(jax.random.key(0), (6, 4), jnp.float64)
    y = jnp.array([0, 1, 2, 1, 0, 2])
    params = jax.tree.map(
        lambda p: p.astype(jnp.float64) + 0.2, model.init(jax.random.key(1), x)["params"]
    )
    loss = kfqn_jax.losses.softmax_cross_entropy()
    tx = kfqn_jax.kbfgs(lr, damping, momentum=rho, **kw)
    out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss, with_outputs=True)
    u, _ = tx.update(
        out.grads,
        tx.init(params),
        params,
        layer_stats=out.stats,
        stats_fn=lambda q: kfx.layer_stats(model, q, x, targets=y, loss=loss),
    )
    return np.asarray(x), params, out.grads, u


def _hand_update(x, params, grads, lr, damping, rho, tau=0.0, l2=0.0, decay_bias=True):
    """Step 0: H_g = I, H_a = (A + sqrt(damping) I)^-1 with A the first batch's, zero momentum."""
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    h_a = np.linalg.inv(a.T @ a / len(x) + np.sqrt(damping) * np.eye(a.shape[1]))
    w, b = np.asarray(params["kernel"]), np.asarray(params["bias"])
    m = np.concatenate([np.asarray(grads["kernel"]), np.asarray(grads["bias"])[None]], axis=0)
    m = m + l2 * np.concatenate([w, b[None]], axis=0)
    p = h_a @ ((1 - rho) * m)
    return {
        "kernel": -lr * (p[:-1] + tau * w),
        "bias": -lr * (p[-1] + (tau * b if decay_bias else 0.0)),
    }


def test_decoupled_weight_decay_and_coupled_l2_reg_match_hand_computed_steps():
    lr, damping, rho, tau, l2 = 0.3, 0.2, 0.7, 0.05, 0.4
    mask = {"kernel": True, "bias": False}
    configs = [
        (dict(), dict()),
        (dict(l2_reg=l2), dict(l2=l2)),
        (dict(weight_decay=tau), dict(tau=tau)),
        (dict(weight_decay=tau, weight_decay_mask=mask), dict(tau=tau, decay_bias=False)),
    ]
    with jax.enable_x64(True):
        results = []
        for kw, hand in configs:
            if "weight_decay" in kw:
                with pytest.warns(FutureWarning, match="l2_reg"):
                    x, params, grads, u = _first_step(lr, damping, rho, **kw)
            else:
                x, params, grads, u = _first_step(lr, damping, rho, **kw)
            want = _hand_update(x, params, grads, lr, damping, rho, **hand)
            for k in ("kernel", "bias"):
                _close(u[k], want[k])
            results.append(u)
        # The four updates differ from each other (each knob does something).
        flat = [np.concatenate([np.ravel(u["kernel"]), np.ravel(u["bias"])]) for u in results]
        for i in range(len(flat)):
            for j in range(i):
                assert not np.allclose(flat[i], flat[j]), (i, j)


def test_weight_decay_is_applied_after_preconditioning_in_kbfgs_l():
    # Decoupled decay is the same tau * theta whatever the preconditioner: the difference of
    # two K-BFGS(L) updates with and without it is -lr * tau * theta.
    lr, tau = 0.2, 0.03
    model = nn.Dense(2)
    x = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)
    y = jnp.array([0, 1, 1, 0, 1])
    params = model.init(jax.random.key(2), x)["params"]
    loss = kfqn_jax.losses.softmax_cross_entropy()
    out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss, with_outputs=True)
    ups = []
    for wd in (0.0, tau):
        if wd:
            with pytest.warns(FutureWarning):
                tx = kfqn_jax.kbfgs_l(lr, weight_decay=wd, memory_size=2, extra_pass="lagged")
        else:
            tx = kfqn_jax.kbfgs_l(lr, memory_size=2, extra_pass="lagged")
        ups.append(tx.update(out.grads, tx.init(params), params, layer_stats=out.stats)[0])
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(
            np.asarray(ups[1][k] - ups[0][k]),
            -lr * tau * np.asarray(params[k]),
            rtol=1e-5,
            atol=1e-7,
        )
