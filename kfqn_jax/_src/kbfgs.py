r"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton methods (Goldfarb, Ren & Bahamou 2020;
Ren, Bahamou & Goldfarb 2021).

For a Dense or Conv layer with homogeneous inputs ``ã = [a, 1]`` (patches for a convolution),
pre-activations ``h`` and per-example pre-activation gradients ``g``, the inverse of the layer's
Hessian block is approximated by ``H_a ⊗ H_g``. The preconditioned direction of the homogeneous
gradient ``M = [∇W; ∇b]`` (Flax layout, inputs on the rows, shape ``(d_a, d_g)``) is

.. math::

    P = H_a \, \bar M \, H_g, \qquad \bar M \leftarrow \rho \bar M + (1 - \rho) M,

where

* :math:`H_a \approx (A + \lambda_A I)^{-1}`, :math:`A = \mathbb{E}[ã ã^\top]`, is kept by one
  *Hessian-action* BFGS update per step: :math:`s_a = H_a \bar a`, :math:`y_a = (A + \lambda_A
  I) s_a` with :math:`\bar a` the batch mean of ``ã`` (or, as an option, recomputed as the damped
  inverse every ``T`` steps);
* :math:`H_g` is a damped BFGS (K-BFGS) or L-BFGS (K-BFGS(L)) approximation of the inverse of
  the pre-activation Hessian, updated with the pair

  .. math::

      s = \overline{h(\theta)} - \overline{h(\theta')}, \qquad
      y = \overline{g(\theta)} - \overline{g(\theta')}, \qquad \theta' = \theta - \alpha P,

  the means of the pre-activations and of their per-example gradients over the batch (and the
  positions of a convolution) at the current point and at the trial point, on the *same*
  minibatch. The pair is averaged over steps (EMA), then double-damped (see
  :mod:`kfqn_jax._src.bfgs`) and the update is skipped when it would not keep ``H_g`` positive
  definite and bounded.

Symbols and arguments: :math:`\alpha` = ``trial_step_size`` (``learning_rate`` in
:func:`kbfgs`), :math:`\lambda` = ``damping``, :math:`\lambda_A = \sqrt\lambda` and
:math:`\mu_2 = \sqrt\lambda` (for a convolution with :math:`|T|` output positions
:math:`\lambda_A = \sqrt{\lambda |T|}` and :math:`\mu_2 = \sqrt{\lambda / |T|}`,
``conv_damping_split``), :math:`\mu_1` = ``powell_mu``, :math:`\rho` = ``momentum``, the EMA
decay of ``A`` = ``ema_decay`` and of ``(s, y)`` = ``pair_decay``.

Scale convention for convolutions (KFC): :math:`A = \frac1B \sum_{b,t} ã_{bt} ã_{bt}^\top`, a
sum over positions, as :func:`kfqn_jax.scale_by_kfac` and Ren's code; ``(s, y)`` are averaged
over positions and the batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kfqn_jax._src import base, linalg, safety
from kfqn_jax._src import bfgs as bfgs_lib
from kfqn_jax._src import layers as layers_lib

KINDS = ("dense", "conv")

_EXTRA_PASSES = ("closure", "lagged")
_A_SIDES = ("hessian_action", "inverse")
_A_STATISTICS = ("ema", "minibatch")
_DD_FORMS = ("2020", "lm")


class ScaleByKBFGSState(NamedTuple):
    """State of :func:`scale_by_kbfgs` and :func:`scale_by_kbfgs_l`.

    Attributes:
      count: number of steps taken (int32); a skipped step (see ``on_nonfinite``) does not
        count.
      nonfinite_count: number of steps skipped because of non-finite values (int32).
      a_count: number of batches folded into ``a_factors`` (int32), warm start included.
      a_factors: per block, the EMA of ``A`` (``d_a x d_a``); ``()`` with
        ``a_statistic="minibatch"``, which never stores ``A``.
      h_a: per block, :math:`H_a \\approx (A + λ_A I)^{-1}` (``d_a x d_a``).
      h_g: per block, the dense :math:`H_g` (``d_g x d_g``, K-BFGS) or a
        :class:`~kfqn_jax._src.bfgs.LBFGSMemory` of ``L`` pairs (K-BFGS(L)).
      s_bar: per block, the EMA of the undamped ``s`` (``d_g``).
      y_bar: per block, the EMA of the undamped ``y`` (``d_g``).
      prev_h: per block, the mean pre-activation of the previous call (``extra_pass="lagged"``
        only, else ``()``).
      prev_g: per block, the mean per-example pre-activation gradient of the previous call
        (lagged only).
      momentum: per block, the EMA of the homogeneous gradient, or ``()``.
      fallback_state: state of the transform applied to parameters outside any block.
    """

    count: jax.Array
    nonfinite_count: jax.Array
    a_count: jax.Array
    a_factors: tuple
    h_a: tuple
    h_g: tuple
    s_bar: tuple
    y_bar: tuple
    prev_h: tuple
    prev_g: tuple
    momentum: tuple
    fallback_state: Any


def _value(x: Any, count: jax.Array, dtype: Any) -> jax.Array:
    return jnp.asarray(x(count) if callable(x) else x, dtype)


def _stats_fn_fix() -> str:
    return (
        "K-BFGS runs one extra pass at the trial point on the same minibatch; give it a "
        "function of the parameters, e.g.\n"
        "    stats_fn=lambda p: kfqn_jax.flax.layer_stats(model, p, x, targets=y, loss=loss)\n"
        "or build the optimizer with extra_pass='lagged' to take the trial-point statistics "
        "from the next call's layer_stats instead."
    )


def _require_outputs(stats: base.LayerStats, name: str) -> None:
    if stats.h is None:
        raise ValueError(
            f"{name}: layer {stats.meta.name!r} has no pre-activations: capture with "
            "with_outputs=True (kfqn_jax.flax.layer_stats does so by default)."
        )


def _column_means(h: jax.Array, g: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Batch-and-position means of ``h`` and of the per-example ``batch * g``."""
    h_mean = jnp.mean(h.reshape(-1, h.shape[-1]), axis=0)
    g_mean = batch * jnp.mean(g.reshape(-1, g.shape[-1]), axis=0)
    return h_mean, g_mean


def _means(stats: base.LayerStats, dtype: Any, name: str) -> tuple[jax.Array, jax.Array]:
    """Batch-and-position means of the pre-activation and of the per-example gradient."""
    _require_outputs(stats, name)
    return _column_means(stats.h.astype(dtype), stats.g.astype(dtype), stats.g.shape[0])


def _mean_differences(
    old: base.LayerStats, new: base.LayerStats, dtype: Any, name: str
) -> tuple[jax.Array, jax.Array]:
    """The pair ``(s, y)`` of two passes on the same batch: batch-and-position means of the
    per-example differences of the pre-activations and of the per-example gradients.

    Subtracting before averaging keeps the rounding error relative to the (small) differences
    instead of the means, so ``s`` and ``y`` do not depend on the order of summation (one
    device, a permuted batch, or a batch sharded across devices).
    """
    _require_outputs(new, name)
    dh = old.h.astype(dtype) - new.h.astype(dtype)
    dg = old.g.astype(dtype) - new.g.astype(dtype)
    return _column_means(dh, dg, old.g.shape[0])


def _scale_by_kbfgs(
    name: str,
    limited: bool,
    damping: optax.ScalarOrSchedule,
    trial_step_size: optax.ScalarOrSchedule,
    memory_size: int,
    extra_pass: str,
    double_damping: str,
    powell_mu: float,
    conv_damping_split: bool,
    a_side: str,
    inverse_every: int,
    a_statistic: str,
    ema_decay: float,
    pair_decay: float,
    momentum: float,
    skip_eps: float,
    max_growth: float | None,
    layers: Any,
    fallback: optax.GradientTransformation | None,
    on_nonfinite: str,
) -> optax.GradientTransformationExtraArgs:
    for arg, v, allowed in (
        ("extra_pass", extra_pass, _EXTRA_PASSES),
        ("double_damping", double_damping, _DD_FORMS),
        ("a_side", a_side, _A_SIDES),
        ("a_statistic", a_statistic, _A_STATISTICS),
    ):
        base.check_choice(name, arg, v, allowed)
    base.check_positive_int(name, "inverse_every", inverse_every)
    base.check_positive_int(name, "memory_size", memory_size)
    for arg, v in (("ema_decay", ema_decay), ("pair_decay", pair_decay), ("momentum", momentum)):
        base.check_fraction(name, arg, v, static=True)
    if not (base.is_number(powell_mu) and 0.0 < powell_mu < 1.0):
        raise ValueError(
            f"{name}: powell_mu must be a number in (0, 1), got {powell_mu!r}; the authors use 0.2."
        )
    base.check_damping(name, damping)
    if max_growth is not None and not (base.is_number(max_growth) and max_growth > 1.0):
        raise ValueError(
            f"{name}: max_growth must be None or a number > 1, got {max_growth!r}; e.g. 2."
        )
    safety.check_on_nonfinite(name, on_nonfinite)
    fused = on_nonfinite == "skip"
    if fallback is None:
        fallback = optax.ema(decay=momentum, debias=False) if momentum > 0 else optax.identity()

    def blocks(tree):
        return layers_lib.resolve_layers(tree, layers, KINDS)

    masked_fallback = optax.masked(
        fallback, lambda tree: layers_lib.uncovered_mask(tree, blocks(tree))
    )

    def init_fn(params):
        metas = blocks(params)
        dtype = base.as_float(jax.tree_util.tree_leaves(params)[0].dtype) if metas else jnp.float32
        a_dims = [m.in_features + int(m.has_bias) for m in metas]
        g_dims = [m.out_features for m in metas]
        vec = lambda n: jnp.zeros((n,), dtype)  # noqa: E731
        if limited:
            h_g = tuple(bfgs_lib.lbfgs_init(memory_size, n, dtype) for n in g_dims)
        else:
            h_g = tuple(jnp.eye(n, dtype=dtype) for n in g_dims)
        lagged = extra_pass == "lagged"
        return ScaleByKBFGSState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            a_count=jnp.zeros([], jnp.int32),
            a_factors=(
                tuple(jnp.zeros((n, n), dtype) for n in a_dims) if a_statistic == "ema" else ()
            ),
            h_a=tuple(jnp.eye(n, dtype=dtype) for n in a_dims),
            h_g=h_g,
            s_bar=tuple(vec(n) for n in g_dims),
            y_bar=tuple(vec(n) for n in g_dims),
            prev_h=tuple(vec(n) for n in g_dims) if lagged else (),
            prev_g=tuple(vec(n) for n in g_dims) if lagged else (),
            momentum=(
                tuple(jnp.zeros((da, dg), dtype) for da, dg in zip(a_dims, g_dims, strict=True))
                if momentum > 0
                else ()
            ),
            fallback_state=masked_fallback.init(params),
        )

    def apply_hg(hg, v):
        """``H_g v`` for a vector, or ``V H_g`` for the rows of a matrix."""
        if limited:
            return bfgs_lib.lbfgs_apply(hg, v)
        return jnp.matmul(v, hg, precision=lax.Precision.HIGHEST)

    def g_side(hg, s_bar, y_bar, s, y, g_norm, mu2, active):
        """EMA of the raw pair, double damping on a copy, skip rules, BFGS/L-BFGS update."""
        if pair_decay > 0:
            s_bar_new = pair_decay * s_bar + (1.0 - pair_decay) * s
            y_bar_new = pair_decay * y_bar + (1.0 - pair_decay) * y
        else:
            s_bar_new, y_bar_new = s, y
        s_bar_new = jnp.where(active, s_bar_new, s_bar)
        y_bar_new = jnp.where(active, y_bar_new, y_bar)
        hy = apply_hg(hg, y_bar_new)
        ds, dy, _ = bfgs_lib.double_damping(
            s_bar_new, y_bar_new, hy, powell_mu, mu2, double_damping
        )
        ok = active & bfgs_lib.should_update(ds, dy, g_norm, skip_eps)
        ok = ok & linalg.is_finite((ds, dy))
        if limited:
            hg_new = bfgs_lib.lbfgs_push(hg, ds, dy, ok)
        else:
            cand = bfgs_lib.bfgs_inverse_update(hg, ds, dy)
            ok = ok & linalg.is_finite(cand)
            if max_growth is not None:
                ok = ok & (jnp.linalg.norm(cand) <= max_growth * jnp.linalg.norm(hg))
            hg_new = jnp.where(ok, cand, hg)
        return hg_new, s_bar_new, y_bar_new

    def update_fn(
        updates, state, params=None, *, layer_stats=None, stats_fn=None, warm_start=False, **extra
    ):
        del extra
        if layer_stats is None:
            raise base.missing_extra_arg(
                name,
                base.LAYER_STATS,
                base.stats_fix_line().replace(", rng=rng)", ", with_outputs=True)"),
            )
        closure = extra_pass == "closure"
        if closure and stats_fn is None and not warm_start:
            raise base.missing_extra_arg(name, base.STATS_FN, _stats_fn_fix())
        if closure and params is None and not warm_start:
            raise ValueError(
                f"{name}.update needs `params` to build the trial point: "
                "tx.update(grads, opt_state, params, ...)."
            )
        metas = blocks(updates)
        base.check_layer_stats(name, layer_stats)
        stats = layers_lib.match_stats(name, metas, layer_stats)
        dtype = state.h_a[0].dtype if metas else jnp.float32
        count = state.count
        sqrt_damp = jnp.sqrt(_value(damping, count, dtype))

        lam_a, mu2 = [], []
        for s in stats:
            if s.meta.kind == "conv" and conv_damping_split:
                sqrt_t = float(s.a.shape[1]) ** 0.5
                lam_a.append(sqrt_damp * sqrt_t)
                mu2.append(sqrt_damp / sqrt_t)
            else:
                lam_a.append(sqrt_damp)
                mu2.append(sqrt_damp)

        # Inputs as (B*T, d_a) matrices.
        a_mats = []
        for s in stats:
            a = layers_lib.inputs_matrix(s).astype(dtype)
            a_mats.append(a.reshape(-1, a.shape[-1]))
        a_bars = [jnp.mean(a2, axis=0) for a2 in a_mats]

        # on_nonfinite="skip" is fused into the step (as in kfac.py): `ok` says the gradients
        # and every statistic the step reads are finite (a column mean is finite only if its
        # column is), and gates each state update inside the operation that makes it.
        ok = jnp.asarray(True)
        if fused:
            ok = linalg.is_finite(jax.tree_util.tree_leaves(updates)) & linalg.is_finite(a_bars)

        # A statistics (EMA, weight max(1 - beta, 1 / (n + 1)): the first batch is taken whole).
        a_f = state.a_factors
        a_count = state.a_count
        if a_statistic == "ema":
            n = a_count.astype(dtype)
            w = 1.0 / (n + 1.0) if warm_start else jnp.maximum(1.0 - ema_decay, 1.0 / (n + 1.0))
            # The diagonals for the check come from the products (the Gram is not written out
            # twice).
            grams = [linalg.gram(a, with_diagonal=True) for a in a_mats]
            b_rows = [s.a.shape[0] for s in stats]
            if fused:
                for old, (_, dg), b in zip(state.a_factors, grams, b_rows, strict=True):
                    ok &= safety.ema_finite(w, old, dg / b)
            a_f = tuple(
                jnp.where(ok, (1.0 - w) * old + w * (gm / b), old)
                for old, (gm, _), b in zip(state.a_factors, grams, b_rows, strict=True)
            )
            a_count = jnp.where(ok, optax.safe_increment(a_count), a_count)
        if warm_start:
            zero = jax.tree.map(jnp.zeros_like, updates)
            return zero, state._replace(
                a_factors=a_f,
                a_count=a_count,
                nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
            )

        means = [_means(s, dtype, name) for s in stats]
        if fused:
            ok &= linalg.is_finite(means)
        h_g = list(state.h_g)
        s_bar = list(state.s_bar)
        y_bar = list(state.y_bar)

        # Lagged extra pass: the pair of the previous step, from this call's statistics.
        if not closure:
            active = (count > 0) & ok
            for i, (h_mean, g_mean) in enumerate(means):
                s_pair = state.prev_h[i] - h_mean
                y_pair = state.prev_g[i] - g_mean
                g_norm = jnp.linalg.norm(state.prev_g[i])
                h_g[i], s_bar[i], y_bar[i] = g_side(
                    h_g[i], s_bar[i], y_bar[i], s_pair, y_pair, g_norm, mu2[i], active
                )

        # H_a: explicit damped inverse at the first step (and every T steps with a_side="inverse").
        h_a = list(state.h_a)
        for i, s in enumerate(stats):
            do_inv = count == 0
            if a_side == "inverse":
                do_inv = do_inv | (count % inverse_every == 0)
            do_inv = do_inv & ok
            b = s.a.shape[0]

            def invert(ops, b=b):
                mat, a2, lam, old = ops
                if a_statistic == "minibatch":
                    mat = linalg.gram(a2) / b
                new = linalg.damped_cholesky_inverse(mat, lam)
                return jnp.where(linalg.is_finite(new), new, old)

            a_src = a_f[i] if a_statistic == "ema" else h_a[i]
            # One cond per block: a single cond holding many LAPACK calls was seen to deadlock
            # XLA's CPU runtime (see kfac.py).
            h_a[i] = lax.cond(
                do_inv, invert, lambda ops: ops[3], (a_src, a_mats[i], lam_a[i], h_a[i])
            )

        # Direction.
        out, fb_state = masked_fallback.update(updates, state.fallback_state, params)
        leaves, index, treedef = layers_lib.leaf_index(out)
        grad_leaves = jax.tree_util.tree_leaves(updates)
        new_mom = []
        for bi, m in enumerate(metas):
            ki = base.match_path(tuple(m.kernel_path), index)
            bi_idx = base.match_path(tuple(m.bias_path), index) if m.has_bias else None
            kernel = grad_leaves[ki]
            bias = grad_leaves[bi_idx] if bi_idx is not None else None
            mat = layers_lib.homogeneous_grad(kernel, bias, m).astype(dtype)
            if momentum > 0:
                mat = momentum * state.momentum[bi] + (1.0 - momentum) * mat
                new_mom.append(jnp.where(ok, mat, state.momentum[bi]))
            pre = apply_hg(h_g[bi], jnp.matmul(h_a[bi], mat, precision=lax.Precision.HIGHEST))
            w_, b_ = layers_lib.split_homogeneous(pre, m)
            leaves[ki] = w_.astype(kernel.dtype)
            if bi_idx is not None:
                leaves[bi_idx] = b_.astype(bias.dtype)
        new_updates = jax.tree_util.tree_unflatten(treedef, leaves)

        # Closure extra pass: the trial point theta' = theta - alpha * P on the same batch.
        if closure and metas:
            alpha = _value(trial_step_size, count, dtype)
            trial = jax.tree.map(
                lambda p, u: (p - alpha.astype(p.dtype) * u).astype(p.dtype), params, new_updates
            )
            trial_raw = stats_fn(trial)
            base.check_layer_stats(name, trial_raw)
            trial_stats = layers_lib.match_stats(name, metas, trial_raw)
            pairs = [
                _mean_differences(stats[i], ts, dtype, name) for i, ts in enumerate(trial_stats)
            ]
            if fused:
                ok &= linalg.is_finite(pairs)
            for i, (s_pair, y_pair) in enumerate(pairs):
                h_g[i], s_bar[i], y_bar[i] = g_side(
                    h_g[i],
                    s_bar[i],
                    y_bar[i],
                    s_pair,
                    y_pair,
                    jnp.linalg.norm(means[i][1]),
                    mu2[i],
                    ok,
                )

        # A side: one Hessian-action BFGS update per step.
        if a_side == "hessian_action":
            for i, s in enumerate(stats):
                a2 = a_mats[i]
                b = s.a.shape[0]
                a_bar = a_bars[i]
                s_a = jnp.matmul(h_a[i], a_bar, precision=lax.Precision.HIGHEST)
                if a_statistic == "ema":
                    y_a = jnp.matmul(a_f[i], s_a, precision=lax.Precision.HIGHEST)
                else:
                    y_a = jnp.matmul(a2.T, jnp.matmul(a2, s_a), precision=lax.Precision.HIGHEST)
                    y_a = y_a / b
                y_a = y_a + lam_a[i] * s_a
                take = ok & bfgs_lib.should_update(s_a, y_a, jnp.linalg.norm(a_bar), skip_eps)
                cand = bfgs_lib.bfgs_inverse_update(h_a[i], s_a, y_a)
                take = take & linalg.is_finite(cand)
                h_a[i] = jnp.where(take, cand, h_a[i])

        new_count, nonfinite = optax.safe_increment(count), state.nonfinite_count
        prev_h = tuple(hm for hm, _ in means) if not closure else ()
        prev_g = tuple(gm for _, gm in means) if not closure else ()
        if fused:
            leaves, new_count, nonfinite = safety.finish_skip(ok, leaves, count, nonfinite)
            new_updates = jax.tree_util.tree_unflatten(treedef, leaves)
            fb_state = safety.select_tree(ok, fb_state, state.fallback_state)
            prev_h = safety.select_tree(ok, prev_h, state.prev_h)
            prev_g = safety.select_tree(ok, prev_g, state.prev_g)

        new_state = ScaleByKBFGSState(
            count=new_count,
            nonfinite_count=nonfinite,
            a_count=a_count,
            a_factors=a_f,
            h_a=tuple(h_a),
            h_g=tuple(h_g),
            s_bar=tuple(s_bar),
            y_bar=tuple(y_bar),
            prev_h=prev_h,
            prev_g=prev_g,
            momentum=tuple(new_mom),
            fallback_state=fb_state,
        )
        return new_updates, new_state

    guarded = safety.guard_nonfinite(
        update_fn, on_nonfinite, name, (base.LAYER_STATS,), init_fn=init_fn, fused=True
    )
    return optax.GradientTransformationExtraArgs(init_fn, guarded)


_COMMON_ARGS_DOC = """
      damping: :math:`\\lambda` (scalar or schedule of the step count). It enters as
        :math:`\\lambda_A = \\sqrt\\lambda` on the A side and as :math:`\\mu_2 = \\sqrt\\lambda` in
        the second damping step (conv layers: see ``conv_damping_split``). The demo uses 0.3.
      trial_step_size: :math:`\\alpha` of the trial point :math:`\\theta' = \\theta - \\alpha P`
        (scalar or schedule). :func:`kbfgs` sets it to the learning rate, so that the trial
        point is the next iterate, as in the authors' code.
      extra_pass: ``"closure"`` (default): ``update`` calls ``stats_fn(trial_params)`` for the
        trial-point statistics on the same minibatch (one extra forward and a cotangent-only
        backward). ``"lagged"``: no closure; the pair of step ``k`` is formed at step ``k + 1``
        from the means stored at step ``k`` and the ``layer_stats`` of step ``k + 1`` (taken at
        the next iterate, on the *next* minibatch), as for users who cannot pass a closure. The
        lagged pair mixes two minibatches; it is an approximation not in the papers.
      double_damping: ``"2020"`` (default; Powell on :math:`H` with :math:`\\mu_1`, then Powell
        with :math:`B = I` and :math:`\\mu_2`, as the NeurIPS-2020 code) or ``"lm"`` (Powell on
        :math:`H`, then :math:`y \\leftarrow y + \\mu_2 s`; the later form of Ren's code and of
        ASDL, attributed to arXiv 2102.06737; the attribution is unverified).
      powell_mu: :math:`\\mu_1` of the Powell step on :math:`H` (0.2, hard-coded by the authors).
      conv_damping_split: for a convolution with :math:`|T|` output positions use
        :math:`\\lambda_A = \\sqrt{\\lambda}\\sqrt{|T|}` and :math:`\\mu_2 = \\sqrt\\lambda /
        \\sqrt{|T|}` ("DDV2-SqrtT" in Ren's code, ASDL's ``_get_damping``); ``False`` uses
        :math:`\\sqrt\\lambda` for both, as for Dense layers.
      a_side: ``"hessian_action"`` (default, as the authors' code): one BFGS update of
        :math:`H_a` per step with :math:`s_a = H_a \\bar a`, :math:`y_a = (A + \\lambda_A I)
        s_a`, after an explicit damped inverse at the first step. ``"inverse"``: :math:`H_a =
        (A + \\lambda_A I)^{-1}` recomputed every ``inverse_every`` steps (Cholesky), which may
        be what the NeurIPS-2020 text describes (unverified).
      inverse_every: the period ``T`` of ``a_side="inverse"`` (static int; 20 in the code).
      ema_decay: decay :math:`\\beta` of the EMA of ``A`` (0.9). The weight of a new batch is
        :math:`\\max(1 - \\beta, 1 / (n + 1))` after ``n`` batches, so the first batch (or the
        warm-start mean) is taken whole.
      pair_decay: decay of the EMA of the raw pair ``(s, y)`` (0.9, hard-coded by the authors
        when the batch is smaller than the data set; 0 uses the raw pair).
      momentum: :math:`\\rho` of the EMA momentum :math:`\\bar M \\leftarrow \\rho \\bar M +
        (1 - \\rho) M` (the authors' form; note the :math:`1 - \\rho` weighting, unlike
        heavy-ball momentum); 0 disables it.
      skip_eps: :math:`\\epsilon` of the skip rule: an update is skipped unless
        :math:`s^\\top y > \\epsilon\\, s^\\top s\\, \\|\\bar g\\|` (G side, :math:`\\bar g` the
        current mean pre-activation gradient) or :math:`\\|\\bar a\\|` (A side), and
        :math:`s^\\top y > 0`. Non-finite updates are always skipped.
      max_growth: if set, also skip a dense :math:`H_g` update that grows
        :math:`\\|H_g\\|_F` by more than this factor (2 in Ren's later code); ``None`` (default,
        as the NeurIPS code) does not test it.
      layers: the blocks: ``None`` guesses them from the parameter names, or a sequence of
        :class:`LayerMeta` from :func:`kfqn_jax.flax.layer_metas` (exact).
      fallback: transform for parameters outside any block. Default: the same EMA momentum
        (``optax.ema(momentum, debias=False)``).
      ON_NONFINITE""".replace("ON_NONFINITE", safety.ON_NONFINITE_DOC)


def scale_by_kbfgs(
    damping: optax.ScalarOrSchedule = 0.3,
    *,
    trial_step_size: optax.ScalarOrSchedule = 1.0,
    extra_pass: str = "closure",
    double_damping: str = "2020",
    powell_mu: float = 0.2,
    conv_damping_split: bool = True,
    a_side: str = "hessian_action",
    inverse_every: int = 20,
    a_statistic: str = "ema",
    ema_decay: float = 0.9,
    pair_decay: float = 0.9,
    momentum: float = 0.9,
    skip_eps: float = 1e-4,
    max_growth: float | None = None,
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Preconditions Dense and Conv layers with K-BFGS (dense :math:`H_g`); no learning rate.

    See the module docstring of :mod:`kfqn_jax._src.kbfgs` for the maths and :func:`kbfgs` for
    the full optimizer and an example.

    Args:{args}
      a_statistic: ``"ema"`` (default, the 2020 code): keep the EMA of ``A`` in the state;
        ``"minibatch"``: use the current batch's ``A`` in the Hessian action and never store
        ``A`` (``miniBatchADamped`` of Ren's later code, arXiv 2102.06737), which saves
        :math:`d_a^2` per layer.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``,
      ``layer_stats`` (captured with ``with_outputs=True``) and ``stats_fn`` (unless
      ``extra_pass="lagged"``). ``warm_start=True`` folds a batch into the EMA of ``A``
      (arithmetic mean) without taking a step.
    """
    return _scale_by_kbfgs(
        "kbfgs",
        False,
        damping,
        trial_step_size,
        1,
        extra_pass,
        double_damping,
        powell_mu,
        conv_damping_split,
        a_side,
        inverse_every,
        a_statistic,
        ema_decay,
        pair_decay,
        momentum,
        skip_eps,
        max_growth,
        layers,
        fallback,
        on_nonfinite,
    )


def scale_by_kbfgs_l(
    damping: optax.ScalarOrSchedule = 0.3,
    *,
    memory_size: int = 100,
    trial_step_size: optax.ScalarOrSchedule = 1.0,
    extra_pass: str = "closure",
    double_damping: str = "2020",
    powell_mu: float = 0.2,
    conv_damping_split: bool = True,
    a_side: str = "hessian_action",
    inverse_every: int = 20,
    a_statistic: str = "minibatch",
    ema_decay: float = 0.9,
    pair_decay: float = 0.9,
    momentum: float = 0.9,
    skip_eps: float = 1e-4,
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Preconditions Dense and Conv layers with K-BFGS(L) (L-BFGS :math:`H_g`); no learning rate.

    :math:`H_g` is never formed: its products use the compact form of the last ``L`` accepted
    (damped) pairs with :math:`H_0 = I` (:math:`\\gamma = 1`, fixed, as the authors' code), see
    :func:`kfqn_jax._src.bfgs.lbfgs_apply`.

    Args:
      memory_size: ``L``, the number of pairs kept (static int; 100 in the authors' code).{args}
      a_statistic: ``"minibatch"`` (default here): the Hessian action uses the current batch's
        ``A`` and ``A`` is never stored (arXiv 2102.06737, ``miniBatchADamped``), so that the
        state stays near first-order size (about :math:`d_a^2 + 2 L d_g` per layer plus the
        momentum); ``"ema"``: the 2020 code's stored EMA of ``A``.

    Returns:
      As :func:`scale_by_kbfgs`.
    """
    return _scale_by_kbfgs(
        "kbfgs_l",
        True,
        damping,
        trial_step_size,
        memory_size,
        extra_pass,
        double_damping,
        powell_mu,
        conv_damping_split,
        a_side,
        inverse_every,
        a_statistic,
        ema_decay,
        pair_decay,
        momentum,
        skip_eps,
        None,
        layers,
        fallback,
        on_nonfinite,
    )


scale_by_kbfgs.__doc__ = scale_by_kbfgs.__doc__.format(args=_COMMON_ARGS_DOC)
scale_by_kbfgs_l.__doc__ = scale_by_kbfgs_l.__doc__.format(
    args=_COMMON_ARGS_DOC.replace(
        """
      max_growth: if set, also skip a dense :math:`H_g` update that grows
        :math:`\\|H_g\\|_F` by more than this factor (2 in Ren's later code); ``None`` (default,
        as the NeurIPS code) does not test it.""",
        "",
    )
)


def _chain(weight_decay: float, inner, learning_rate) -> optax.GradientTransformationExtraArgs:
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(inner)
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


_REFERENCES = """
    References:
      Goldfarb, Ren & Bahamou, `Practical Quasi-Newton Methods for Training Deep Neural
      Networks <https://arxiv.org/abs/2006.08877>`_, NeurIPS 2020.
      Ren, Bahamou & Goldfarb, `Kronecker-factored Quasi-Newton Methods for Deep Learning
      <https://arxiv.org/abs/2102.06737>`_, 2021.
      Byrd, Nocedal & Schnabel, Representations of quasi-Newton matrices and their use in
      limited memory methods, Math. Programming 63, 1994 (compact form)."""


def kbfgs(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 0.3,
    *,
    weight_decay: float = 0.0,
    extra_pass: str = "closure",
    double_damping: str = "2020",
    powell_mu: float = 0.2,
    conv_damping_split: bool = True,
    a_side: str = "hessian_action",
    inverse_every: int = 20,
    a_statistic: str = "ema",
    ema_decay: float = 0.9,
    pair_decay: float = 0.9,
    momentum: float = 0.9,
    skip_eps: float = 1e-4,
    max_growth: float | None = None,
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """K-BFGS with a learning rate: ``chain([add_decayed_weights], scale_by_kbfgs,
    scale_by_learning_rate)``.

    Per layer, :math:`\\theta \\leftarrow \\theta - \\alpha H_a \\bar M H_g` with
    :math:`\\alpha` = ``learning_rate``, :math:`\\lambda` = ``damping``, :math:`\\tau` =
    ``weight_decay`` (an L2 term added to the gradient before the momentum, as the authors'
    :math:`\\tau = 10^{-5}`) and the other symbols as in :func:`scale_by_kbfgs`, whose keyword
    arguments are accepted here (``trial_step_size`` is set to ``learning_rate``). List
    ``inverse_every``, ``momentum``, ``ema_decay``, ``pair_decay`` and ``weight_decay`` in
    ``static_args`` of ``optax.inject_hyperparams``.

    ``on_nonfinite`` (``"skip"``, ``"raise"`` or ``"ignore"``) says what a step with NaN or
    infinite gradients, statistics or results does; by default it is skipped and counted in
    ``nonfinite_count`` of the state (see :func:`scale_by_kbfgs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> from kfqn_jax import flax as kfx
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 1])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> loss = "softmax_cross_entropy"
      >>> tx = kfqn_jax.kbfgs(learning_rate=0.1, damping=0.3)
      >>> opt_state = tx.init(params)
      >>> out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss,
      ...     with_outputs=True)
      >>> updates, opt_state = tx.update(out.grads, opt_state, params, layer_stats=out.stats,
      ...     stats_fn=lambda p: kfx.layer_stats(model, p, x, targets=y, loss=loss))
      >>> params = optax.apply_updates(params, updates)
    """
    inner = scale_by_kbfgs(
        damping,
        trial_step_size=learning_rate,
        extra_pass=extra_pass,
        double_damping=double_damping,
        powell_mu=powell_mu,
        conv_damping_split=conv_damping_split,
        a_side=a_side,
        inverse_every=inverse_every,
        a_statistic=a_statistic,
        ema_decay=ema_decay,
        pair_decay=pair_decay,
        momentum=momentum,
        skip_eps=skip_eps,
        max_growth=max_growth,
        layers=layers,
        fallback=fallback,
        on_nonfinite=on_nonfinite,
    )
    return _chain(weight_decay, inner, learning_rate)


def kbfgs_l(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 0.3,
    *,
    weight_decay: float = 0.0,
    memory_size: int = 100,
    extra_pass: str = "closure",
    double_damping: str = "2020",
    powell_mu: float = 0.2,
    conv_damping_split: bool = True,
    a_side: str = "hessian_action",
    inverse_every: int = 20,
    a_statistic: str = "minibatch",
    ema_decay: float = 0.9,
    pair_decay: float = 0.9,
    momentum: float = 0.9,
    skip_eps: float = 1e-4,
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """K-BFGS(L) with a learning rate: ``chain([add_decayed_weights], scale_by_kbfgs_l,
    scale_by_learning_rate)``.

    As :func:`kbfgs`, with :math:`H_g` an L-BFGS matrix of ``memory_size`` pairs (``L``, static)
    and the keyword arguments of :func:`scale_by_kbfgs_l`.
    Steps with non-finite values are skipped and counted (``on_nonfinite``, as in
    :func:`kbfgs`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> from kfqn_jax import flax as kfx
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 1])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> tx = kfqn_jax.kbfgs_l(learning_rate=0.1, extra_pass="lagged")
      >>> opt_state = tx.init(params)
      >>> out = kfx.value_grads_and_stats(model, params, x, targets=y,
      ...     loss="softmax_cross_entropy", with_outputs=True)
      >>> updates, opt_state = tx.update(out.grads, opt_state, params, layer_stats=out.stats)
    """
    inner = scale_by_kbfgs_l(
        damping,
        memory_size=memory_size,
        trial_step_size=learning_rate,
        extra_pass=extra_pass,
        double_damping=double_damping,
        powell_mu=powell_mu,
        conv_damping_split=conv_damping_split,
        a_side=a_side,
        inverse_every=inverse_every,
        a_statistic=a_statistic,
        ema_decay=ema_decay,
        pair_decay=pair_decay,
        momentum=momentum,
        skip_eps=skip_eps,
        layers=layers,
        fallback=fallback,
        on_nonfinite=on_nonfinite,
    )
    return _chain(weight_decay, inner, learning_rate)


kbfgs.__doc__ += _REFERENCES
kbfgs_l.__doc__ += _REFERENCES
