"""Float64 reference tests of K-BFGS and K-BFGS(L) (kfqn_jax/_src/kbfgs.py, bfgs.py).

The references are written in NumPy from the equations of Goldfarb, Ren & Bahamou (NeurIPS
2020, arXiv 2006.08877, as their public code applies them) and of Ren, Bahamou & Goldfarb (arXiv
2102.06737: the extension to convolutional layers and its refinements): the inverse BFGS update
in its product form, the two damping steps, the L-BFGS matrix as a dense recursion, and one or
more full optimizer steps (EMA of A, Hessian action, momentum, trial point, EMA of the
pair, double damping, skip rules). The layer statistics at the current and trial points come
from the capture (tested elsewhere); everything the optimizer does with them is recomputed here.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfqn_jax
from kfqn_jax import flax as kfx
from kfqn_jax._src import bfgs

RTOL = 1e-9


def _rng(seed=0):
    return np.random.default_rng(seed)


def _spd(n, rng):
    q = rng.normal(size=(n, n))
    return q @ q.T / n + 0.5 * np.eye(n)


def _np_bfgs(h, s, y):
    """Product form (I - rho s y^T) H (I - rho y s^T) + rho s s^T."""
    rho = 1.0 / (s @ y)
    e = np.eye(len(s))
    return (e - rho * np.outer(s, y)) @ h @ (e - rho * np.outer(y, s)) + rho * np.outer(s, s)


def _np_damp(s, y, h, mu1, mu2, form):
    taken = []
    hy = h @ y
    if s @ y <= mu1 * (y @ hy):
        t = (1 - mu1) * (y @ hy) / (y @ hy - s @ y)
        s = t * s + (1 - t) * hy
        taken.append("powell_h")
    if form == "2020":
        if s @ y <= mu2 * (s @ s):
            t = (1 - mu2) * (s @ s) / (s @ s - s @ y)
            y = t * y + (1 - t) * s
            taken.append("powell_identity")
    else:
        y = y + mu2 * s
    return s, y, taken


# ---------------------------------------------------------------------------------------------
# Building blocks.


def test_bfgs_update_matches_product_form_secant_and_spd():
    rng = _rng(1)
    with jax.enable_x64(True):
        for n in (1, 3, 7):
            h = _spd(n, rng)
            s = rng.normal(size=n)
            y = s + 0.3 * rng.normal(size=n)
            if s @ y <= 0:
                y = -y
            new = np.asarray(
                bfgs.bfgs_inverse_update(jnp.asarray(h), jnp.asarray(s), jnp.asarray(y))
            )
            np.testing.assert_allclose(new, _np_bfgs(h, s, y), rtol=RTOL, atol=1e-12)
            np.testing.assert_allclose(new @ y, s, rtol=1e-9, atol=1e-12)  # secant
            np.testing.assert_allclose(new, new.T, rtol=0, atol=1e-14)
            assert np.linalg.eigvalsh(new).min() > 0


@pytest.mark.parametrize("form", ["2020", "lm"])
def test_double_damping_branches_match_numpy(form):
    rng = _rng(2)
    n, mu1, mu2 = 5, 0.2, 0.5
    h = _spd(n, rng)
    s0 = rng.normal(size=n)
    cases = {
        # s nearly orthogonal to y: both steps fire.
        "both": (s0, 0.01 * s0 + rng.normal(size=n) * 1e-3 + np.linalg.solve(h, s0) * 1e-3),
        # negative curvature: both fire.
        "negative": (s0, -np.linalg.solve(h, s0)),
        # y = H^{-1} s * 3: Powell on H does not fire; s^T y large, step 2 does not fire.
        "none": (s0, 3.0 * np.linalg.solve(h, s0) + 5.0 * s0),
        # Powell on H fires, step 2 not: s small against H y, y large.
        "only_h": (1e-3 * s0, 10.0 * s0 + 0.1 * rng.normal(size=n)),
    }
    seen = set()
    with jax.enable_x64(True):
        for name, (s, y) in cases.items():
            ref_s, ref_y, taken = _np_damp(s, y, h, mu1, mu2, form)
            ds, dy, info = bfgs.double_damping(
                jnp.asarray(s), jnp.asarray(y), jnp.asarray(h @ y), mu1, mu2, form
            )
            np.testing.assert_allclose(np.asarray(ds), ref_s, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(np.asarray(dy), ref_y, rtol=1e-10, atol=1e-14)
            assert bool(info.powell_h) == ("powell_h" in taken), name
            if form == "2020":
                assert bool(info.powell_identity) == ("powell_identity" in taken), name
            seen.update(taken)
            # Both bounds hold afterwards (for "lm": s^T y >= mu2 s^T s + ... holds too).
            sy = float(ref_s @ ref_y)
            assert sy >= mu1 * float(ref_y @ h @ ref_y) * (1 - 1e-9) or form == "lm"
            assert sy >= mu2 * float(ref_s @ ref_s) * (1 - 1e-9)
    expected = {"powell_h", "powell_identity"} if form == "2020" else {"powell_h"}
    assert seen == expected, seen
    # The exact bound reached in each branch.
    s, y = cases["negative"]
    ds, _ = bfgs.powell_damping_h(jnp.asarray(s), jnp.asarray(y), jnp.asarray(h @ y), mu1)
    np.testing.assert_allclose(float(np.asarray(ds) @ y), mu1 * y @ h @ y, rtol=1e-5)
    dy, taken = bfgs.powell_damping_identity(jnp.asarray(s), jnp.asarray(y), mu2)
    assert bool(taken)
    np.testing.assert_allclose(float(s @ np.asarray(dy)), mu2 * s @ s, rtol=1e-5)


def test_damping_and_skip_are_finite_on_zero_pairs():
    z = jnp.zeros(3)
    ds, dy, _ = bfgs.double_damping(z, z, z, 0.2, 0.5, "2020")
    assert bool(jnp.all(jnp.isfinite(ds)) & jnp.all(jnp.isfinite(dy)))
    assert not bool(bfgs.should_update(ds, dy, jnp.asarray(1.0)))


def test_skip_rule_branches():
    s = jnp.array([1.0, 0.0])
    g = jnp.asarray(1.0)
    assert bool(bfgs.should_update(s, jnp.array([1.0, 0.0]), g))
    assert not bool(bfgs.should_update(s, jnp.array([-1.0, 0.0]), g))  # s^T y <= 0
    assert not bool(bfgs.should_update(s, jnp.array([1e-5, 1.0]), g))  # below eps s^T s |g|
    assert bool(bfgs.should_update(s, jnp.array([1e-5, 1.0]), jnp.asarray(0.01)))
    assert not bool(bfgs.should_update(s, jnp.array([jnp.nan, 0.0]), g))


def _np_lbfgs_dense(pairs, n):
    h = np.eye(n)
    for s, y in pairs:
        h = _np_bfgs(h, s, y)
    return h


@pytest.mark.parametrize("k", [0, 3, 9])
def test_lbfgs_compact_form_equals_dense_bfgs(k):
    rng = _rng(3)
    n, size = 6, 5
    with jax.enable_x64(True):
        mem = bfgs.lbfgs_init(size, n, jnp.float64)
        pairs = []
        for _ in range(k):
            s = rng.normal(size=n)
            y = _spd(n, rng) @ s
            pairs.append((s, y))
            mem = bfgs.lbfgs_push(mem, jnp.asarray(s), jnp.asarray(y), jnp.asarray(True))
        # A rejected pair changes nothing.
        mem = bfgs.lbfgs_push(mem, jnp.ones(n), -jnp.ones(n), jnp.asarray(False))
        dense = _np_lbfgs_dense(pairs[-size:], n)
        v = rng.normal(size=(4, n))
        np.testing.assert_allclose(
            np.asarray(bfgs.lbfgs_apply(mem, jnp.asarray(v))), v @ dense, rtol=1e-8, atol=1e-10
        )
        np.testing.assert_allclose(
            np.asarray(bfgs.lbfgs_apply(mem, jnp.asarray(v[0]))),
            dense @ v[0],
            rtol=1e-8,
            atol=1e-10,
        )
        assert int(mem.count) == min(k, size)


# ---------------------------------------------------------------------------------------------
# Full steps against a NumPy implementation of the algorithm.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(5)(x))
        x = nn.tanh(nn.Dense(4, use_bias=False)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), padding="VALID", use_bias=False)(x)
        x = nn.tanh(x)
        x = nn.Conv(2, (2, 2), padding="VALID")(x)
        x = nn.tanh(x).reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def _problem(kind):
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    if kind == "mlp":
        model, x = MLP(), jax.random.normal(k1, (6, 4), jnp.float64)
    else:
        model, x = CNN(), jax.random.normal(k1, (3, 5, 5, 2), jnp.float64)
    y = jax.random.randint(k2, (x.shape[0],), 0, 3)
    params = model.init(k3, x)["params"]
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    loss = kfqn_jax.losses.softmax_cross_entropy()
    return model, params, x, y, loss


def _layers(params):
    """[(kernel path, bias path or None)] in the capture's order (by name)."""
    out = []
    for name in sorted(params):
        node = params[name]
        out.append((name, "bias" in node))
    return out


def _np_stats(stats, name, has_bias):
    s = stats[name]
    b, t = s.a.shape[0], s.a.shape[1]
    a = np.asarray(s.a).reshape(b * t, -1)
    if has_bias:
        a = np.concatenate([a, np.ones((b * t, 1))], axis=1)
    h = np.asarray(s.h).reshape(b * t, -1)
    g = b * np.asarray(s.g).reshape(b * t, -1)  # per-example gradients
    return dict(a=a, b=b, t=t, h_mean=h.mean(0), g_mean=g.mean(0), conv=s.meta.kind == "conv")


def _np_run(model, params, x, y, loss, steps, hp):
    """K-BFGS's per-step update as the official code of arXiv 2006.08877 does it, with the
    convolutional extension and refinements of arXiv 2102.06737, in NumPy, for ``steps`` steps."""
    lr, lam, mu1, rho = hp["lr"], hp["damping"], 0.2, 0.9
    layers = _layers(params)
    p = {n: {k: np.asarray(v) for k, v in d.items()} for n, d in params.items()}
    st = {n: {} for n, _ in layers}
    prev = {}

    @jax.jit
    def capture_j(pj):
        out = kfx.value_grads_and_stats(model, pj, x, targets=y, loss=loss, with_outputs=True)
        return out.grads, out.stats

    def capture(p):
        return capture_j(jax.tree.map(jnp.asarray, p))

    updates_hist = []
    for k in range(steps):
        grads, stats = capture(p)
        ups = {}
        pend = []
        for name, has_bias in layers:
            ns = _np_stats(stats, name, has_bias)
            S = st[name]
            kern = np.asarray(grads[name]["kernel"])
            mat = kern.reshape(-1, kern.shape[-1])
            if has_bias:
                mat = np.concatenate([mat, np.asarray(grads[name]["bias"])[None]], 0)
            sq = np.sqrt(lam)
            lam_a, mu2 = (sq * np.sqrt(ns["t"]), sq / np.sqrt(ns["t"])) if ns["conv"] else (sq, sq)
            a_batch = ns["a"].T @ ns["a"] / ns["b"]
            if k == 0:
                S["A"] = a_batch
                S["Ha"] = np.linalg.inv(a_batch + lam_a * np.eye(len(a_batch)))
                S["Hg"] = np.eye(mat.shape[1])
                S["sb"] = np.zeros(mat.shape[1])
                S["yb"] = np.zeros(mat.shape[1])
                S["m"] = np.zeros_like(mat)
            else:
                w = max(0.1, 1.0 / (k + 1))  # the first batches are averaged arithmetically
                S["A"] = (1 - w) * S["A"] + w * a_batch
            if hp["lagged"] and k > 0:
                hprev, gprev = prev[name]
                pend_pair = (hprev - ns["h_mean"], gprev - ns["g_mean"], np.linalg.norm(gprev))
                _np_g_update(S, *pend_pair, mu1, mu2, hp["form"])
            S["m"] = rho * S["m"] + (1 - rho) * mat
            P = S["Ha"] @ S["m"] @ S["Hg"]
            ups[name] = P
            pend.append((name, has_bias, ns, mu2, lam_a))
            prev[name] = (ns["h_mean"], ns["g_mean"])
        # Trial point = next iterate.
        newp = {}
        for name, has_bias in layers:
            P = ups[name]
            kshape = p[name]["kernel"].shape
            d = {"kernel": p[name]["kernel"] - lr * (P[:-1] if has_bias else P).reshape(kshape)}
            if has_bias:
                d["bias"] = p[name]["bias"] - lr * P[-1]
            newp[name] = d
        if not hp["lagged"]:
            _, tstats = capture(newp)
        for name, has_bias, ns, mu2, lam_a in pend:
            S = st[name]
            if not hp["lagged"]:
                ts = _np_stats(tstats, name, has_bias)
                _np_g_update(
                    S,
                    ns["h_mean"] - ts["h_mean"],
                    ns["g_mean"] - ts["g_mean"],
                    np.linalg.norm(ns["g_mean"]),
                    mu1,
                    mu2,
                    hp["form"],
                )
            # Hessian action on the A side.
            abar = ns["a"].mean(0)
            sa = S["Ha"] @ abar
            ya = (S["A"] + lam_a * np.eye(len(abar))) @ sa
            if sa @ ya > 1e-4 * (sa @ sa) * np.linalg.norm(abar):
                S["Ha"] = _np_bfgs(S["Ha"], sa, ya)
        updates_hist.append({n: -lr * ups[n] for n, _ in layers})
        p = newp
    return p, st, updates_hist


def _np_g_update(S, s, y, gnorm, mu1, mu2, form):
    S["sb"] = 0.9 * S["sb"] + 0.1 * s
    S["yb"] = 0.9 * S["yb"] + 0.1 * y
    ds, dy, taken = _np_damp(S["sb"], S["yb"], S["Hg"], mu1, mu2, form)
    S.setdefault("taken", []).append(tuple(taken))
    if ds @ dy > 0 and ds @ dy > 1e-4 * (ds @ ds) * gnorm:
        S["Hg"] = _np_bfgs(S["Hg"], ds, dy)
        S.setdefault("pairs", []).append((ds, dy))
    else:
        S.setdefault("skipped", 0)
        S["skipped"] = S["skipped"] + 1


def _jax_run(tx, model, params, x, y, loss, steps, lagged=False):
    state = tx.init(params)

    @jax.jit
    def step(p, state):
        out = kfx.value_grads_and_stats(model, p, x, targets=y, loss=loss, with_outputs=True)
        extra = {"layer_stats": out.stats}
        if not lagged:
            extra["stats_fn"] = lambda q: kfx.layer_stats(model, q, x, targets=y, loss=loss)
        u, state = tx.update(out.grads, state, p, **extra)
        return optax.apply_updates(p, u), state, u

    p, hist = params, []
    for _ in range(steps):
        p, state, u = step(p, state)
        hist.append(u)
    return p, state, hist


def _inner_state(state):
    return state[0]  # chain(scale_by_kbfgs, scale_by_learning_rate)


@pytest.mark.parametrize(
    "kind,form,lagged",
    [("mlp", "2020", False), ("cnn", "2020", False), ("mlp", "lm", False), ("mlp", "2020", True)],
)
def test_steps_match_numpy_reference(kind, form, lagged):
    steps = 3
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem(kind)
        lr, lam = 0.5, 0.3
        tx = kfqn_jax.kbfgs(
            lr, lam, double_damping=form, extra_pass="lagged" if lagged else "closure"
        )
        p_j, state, _ = _jax_run(tx, model, params, x, y, loss, steps, lagged)
        p_n, st_n, _ = _np_run(
            model, params, x, y, loss, steps, dict(lr=lr, damping=lam, form=form, lagged=lagged)
        )
        inner = _inner_state(state)
        for i, name in enumerate(sorted(params)):
            for leaf in p_n[name]:
                np.testing.assert_allclose(
                    np.asarray(p_j[name][leaf]), p_n[name][leaf], rtol=1e-8, atol=1e-11
                )
            S = st_n[name]
            np.testing.assert_allclose(np.asarray(inner.h_g[i]), S["Hg"], rtol=1e-8, atol=1e-11)
            np.testing.assert_allclose(np.asarray(inner.h_a[i]), S["Ha"], rtol=1e-8, atol=1e-11)
            np.testing.assert_allclose(np.asarray(inner.a_factors[i]), S["A"], rtol=1e-10)
            # Secant condition on the last accepted (damped) pair; H_g symmetric PD.
            hg = np.asarray(inner.h_g[i])
            np.testing.assert_allclose(hg, hg.T, rtol=0, atol=1e-14)
            assert np.linalg.eigvalsh(hg).min() > 0
            if S.get("pairs"):
                ds, dy = S["pairs"][-1]
                np.testing.assert_allclose(hg @ dy, ds, rtol=1e-7, atol=1e-10)
        # H_g did move: the pairs were accepted at least once in some layer.
        assert any(st_n[n].get("pairs") for n in st_n)
        if form == "2020" and not lagged and kind == "mlp":
            taken = {b for n in st_n for t in st_n[n]["taken"] for b in t}
            assert "powell_identity" in taken, taken


def test_kbfgs_l_equals_kbfgs_when_memory_holds_all_pairs():
    steps = 3
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem("cnn")
        dense = kfqn_jax.kbfgs(0.5, 0.3)
        lim = kfqn_jax.kbfgs_l(0.5, 0.3, memory_size=steps + 2, a_statistic="ema")
        p1, s1, _ = _jax_run(dense, model, params, x, y, loss, steps)
        p2, s2, _ = _jax_run(lim, model, params, x, y, loss, steps)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-11)


def test_inverse_a_side_recomputes_damped_inverse():
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem("mlp")
        tx = kfqn_jax.kbfgs(0.5, 0.3, a_side="inverse", inverse_every=2)
        _, state, _ = _jax_run(tx, model, params, x, y, loss, 3)
        inner = _inner_state(state)
        # Step 2 (count 2) re-inverted the EMA of A; step 1 left H_a alone (no Hessian action).
        for i in range(len(params)):
            a = np.asarray(inner.a_factors[i])
            want = np.linalg.inv(a + np.sqrt(0.3) * np.eye(len(a)))
            np.testing.assert_allclose(np.asarray(inner.h_a[i]), want, rtol=1e-8)


def test_zero_gradient_skips_the_g_update():
    with jax.enable_x64(True):
        model, params, x, y, loss = _problem("mlp")
        tx = kfqn_jax.scale_by_kbfgs(0.3, trial_step_size=0.5)
        state = tx.init(params)
        out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss, with_outputs=True)
        zeros = jax.tree.map(jnp.zeros_like, params)
        u, state = tx.update(
            zeros,
            state,
            params,
            layer_stats=out.stats,
            stats_fn=lambda q: kfx.layer_stats(model, q, x, targets=y, loss=loss),
        )
        for hg in state.h_g:
            np.testing.assert_array_equal(np.asarray(hg), np.eye(hg.shape[0]))
        assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(u))
        assert int(state.count) == 1


def test_errors_name_the_fix():
    with jax.enable_x64(True):
        _check_errors()


def _check_errors():
    model, params, x, y, loss = _problem("mlp")
    out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
    tx = kfqn_jax.kbfgs(0.1)
    state = tx.init(params)
    with pytest.raises(ValueError, match="stats_fn"):
        tx.update(out.grads, state, params, layer_stats=out.stats)
    with pytest.raises(ValueError, match="with_outputs"):
        tx.update(out.grads, state, params, layer_stats=out.stats, stats_fn=lambda p: out.stats)
    with pytest.raises(ValueError, match="extra_pass"):
        kfqn_jax.kbfgs(0.1, extra_pass="later")
    with pytest.raises(ValueError, match="memory_size"):
        kfqn_jax.kbfgs_l(0.1, memory_size=0)


def test_state_size_of_kbfgs_l_is_near_first_order():
    with jax.enable_x64(True):
        model, params, x, _, _ = _problem("mlp")
        n_params = sum(p.size for p in jax.tree.leaves(params))
        state = kfqn_jax.kbfgs_l(0.1, memory_size=2).init(params)
        n_state = sum(np.size(v) for v in jax.tree.leaves(state) if np.ndim(v) > 0)
        metas = [(5, 5), (5, 4), (5, 3)]  # (d_a, d_g)
        want = sum(da * da + 2 * 2 * dg + 2 * dg + da * dg for da, dg in metas)
        assert n_state == want
        assert n_params > 0
