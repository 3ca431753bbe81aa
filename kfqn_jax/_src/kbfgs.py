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

Code layout: one step of :func:`scale_by_kbfgs` is a short sequence of named steps, each a
module-level function. The state is a structure of per-block tuples
(:class:`ScaleByKBFGSState`); the steps work on one layer's slice of it, a ``_Block``:
``_init_block`` (init), ``_accumulate_a`` (the statistics of ``A``),
``_refresh_h_a`` (the periodic damped inverse of ``H_a``), ``_precondition``
(momentum and :math:`H_a \bar M H_g`), ``_trial_pass`` and ``_lagged_pair`` (the pair
``(s, y)``), ``_g_side_update`` (EMA, double damping, skip rules and the BFGS or L-BFGS
update of ``H_g``) and ``_hessian_action_update`` (the BFGS update of ``H_a``). A flag
``ok`` (finite inputs, for ``on_nonfinite="skip"``) is accumulated over all blocks between the
steps and gates every state update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kfqn_jax._src import alias, base, extra_args, linalg, safety
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


_HIGHEST = lax.Precision.HIGHEST
#: The keywords of the aliases that :func:`kfqn_jax._src.alias.build` takes.
_DECAY_ARGS = ("weight_decay", "weight_decay_mask", "l2_reg")


class _Options(NamedTuple):
    """The static configuration of one transform: the arguments of :func:`scale_by_kbfgs`,
    plus ``name`` (for messages) and ``limited`` (K-BFGS(L)'s L-BFGS :math:`H_g`)."""

    name: str
    limited: bool
    damping: Any
    trial_step_size: Any
    memory_size: int
    extra_pass: str
    double_damping: str
    powell_mu: float
    conv_damping_split: bool
    a_side: str
    inverse_every: int
    a_statistic: str
    ema_decay: float
    pair_decay: float
    momentum: float
    skip_eps: float
    max_growth: float | None
    layers: Any
    fallback: Any
    on_nonfinite: str

    @property
    def closure(self) -> bool:
        return self.extra_pass == "closure"

    @property
    def fused(self) -> bool:
        """``on_nonfinite="skip"`` is fused into the step (as in kfac.py)."""
        return self.on_nonfinite == "skip"


def _check_options(opts: _Options) -> None:
    name = opts.name
    for arg, v, allowed in (
        ("extra_pass", opts.extra_pass, _EXTRA_PASSES),
        ("double_damping", opts.double_damping, _DD_FORMS),
        ("a_side", opts.a_side, _A_SIDES),
        ("a_statistic", opts.a_statistic, _A_STATISTICS),
    ):
        base.check_choice(name, arg, v, allowed)
    base.check_positive_int(name, "inverse_every", opts.inverse_every)
    base.check_positive_int(name, "memory_size", opts.memory_size)
    for arg in ("ema_decay", "pair_decay", "momentum"):
        base.check_fraction(name, arg, getattr(opts, arg), static=True)
    if not (base.is_number(opts.powell_mu) and 0.0 < opts.powell_mu < 1.0):
        raise ValueError(
            f"{name}: powell_mu must be a number in (0, 1), got {opts.powell_mu!r}; the authors "
            "use 0.2."
        )
    base.check_damping(name, opts.damping)
    max_growth = opts.max_growth
    if max_growth is not None and not (base.is_number(max_growth) and max_growth > 1.0):
        raise ValueError(
            f"{name}: max_growth must be None or a number > 1, got {max_growth!r}; e.g. 2."
        )
    safety.check_on_nonfinite(name, opts.on_nonfinite)


def _requirements(opts: _Options) -> extra_args.Requirements:
    """What ``update`` reads: the statistics (with the pre-activations ``h``, and ``a`` and
    ``g``, never sampled cotangents) and, for the closure pass, ``stats_fn``."""
    names = (extra_args.LAYER_STATS,)
    if opts.closure:
        names += (extra_args.STATS_FN,)
    return extra_args.Requirements(extra_args=names, sampled=None, with_outputs=True)


def _check_update_args(opts: _Options, layer_stats, stats_fn, params, warm_start: bool) -> None:
    name = opts.name
    if layer_stats is None:
        raise base.missing_extra_arg(
            name,
            extra_args.LAYER_STATS,
            base.stats_fix_line().replace(", rng=rng)", ", with_outputs=True)"),
        )
    if opts.closure and stats_fn is None and not warm_start:
        raise base.missing_extra_arg(name, extra_args.STATS_FN, _stats_fn_fix())
    if opts.closure and params is None and not warm_start:
        raise ValueError(
            f"{name}.update needs `params` to build the trial point: "
            "tx.update(grads, opt_state, params, ...)."
        )


# ---------------------------------------------------------------------------------------------
# The layer partition.


def _blocks(opts: _Options, tree: Any) -> tuple[base.LayerMeta, ...]:
    return layers_lib.resolve_layers(tree, opts.layers, KINDS)


def _match(name: str, metas, layer_stats: Any) -> list[base.LayerStats]:
    """The statistics of each block, after checking the dict of statistics."""
    base.check_layer_stats(name, layer_stats)
    return layers_lib.match_stats(name, metas, layer_stats)


def _partition(opts: _Options, tree: Any, layer_stats: Any):
    """The blocks of ``tree`` and their statistics (the layer-partition prologue)."""
    metas = _blocks(opts, tree)
    return metas, _match(opts.name, metas, layer_stats)


def _fallback_transform(opts: _Options) -> optax.GradientTransformation:
    """The transform of the parameters outside any block (default: the same EMA momentum)."""
    fallback = opts.fallback
    if fallback is None:
        m = opts.momentum
        fallback = optax.ema(decay=m, debias=False) if m > 0 else optax.identity()
    return optax.masked(fallback, lambda tree: layers_lib.uncovered_mask(tree, _blocks(opts, tree)))


# ---------------------------------------------------------------------------------------------
# One block: its slice of the state and its inputs.


class _Block(NamedTuple):
    """One layer's slice of :class:`ScaleByKBFGSState`; ``None`` for a field the state keeps
    as ``()`` (``a_factor`` with ``a_statistic="minibatch"``, ``prev_h``/``prev_g`` with the
    closure pass, ``momentum`` with ``momentum=0``)."""

    a_factor: jax.Array | None
    h_a: jax.Array
    h_g: Any
    s_bar: jax.Array
    y_bar: jax.Array
    prev_h: jax.Array | None
    prev_g: jax.Array | None
    momentum: jax.Array | None


def _unstack(state: ScaleByKBFGSState) -> list[_Block]:
    def get(field, i):
        return field[i] if field else None

    return [
        _Block(
            get(state.a_factors, i),
            state.h_a[i],
            state.h_g[i],
            state.s_bar[i],
            state.y_bar[i],
            get(state.prev_h, i),
            get(state.prev_g, i),
            get(state.momentum, i),
        )
        for i in range(len(state.h_a))
    ]


def _stack(blocks: list[_Block], **fields: Any) -> ScaleByKBFGSState:
    """The state from its blocks; ``fields`` gives the other entries (and may override)."""

    def col(k):
        vals = tuple(getattr(b, k) for b in blocks)
        return () if any(v is None for v in vals) else vals

    per_block = dict(
        a_factors=col("a_factor"),
        h_a=col("h_a"),
        h_g=col("h_g"),
        s_bar=col("s_bar"),
        y_bar=col("y_bar"),
        prev_h=col("prev_h"),
        prev_g=col("prev_g"),
        momentum=col("momentum"),
    )
    return ScaleByKBFGSState(**{**per_block, **fields})


def _init_block(opts: _Options, meta: base.LayerMeta, dtype: Any) -> _Block:
    d_a, d_g = meta.in_features + int(meta.has_bias), meta.out_features
    vec = lambda: jnp.zeros((d_g,), dtype)  # noqa: E731 - distinct buffers, for donation
    if opts.limited:
        h_g = bfgs_lib.lbfgs_init(opts.memory_size, d_g, dtype)
    else:
        h_g = jnp.eye(d_g, dtype=dtype)
    lagged = not opts.closure
    return _Block(
        a_factor=jnp.zeros((d_a, d_a), dtype) if opts.a_statistic == "ema" else None,
        h_a=jnp.eye(d_a, dtype=dtype),
        h_g=h_g,
        s_bar=vec(),
        y_bar=vec(),
        prev_h=vec() if lagged else None,
        prev_g=vec() if lagged else None,
        momentum=jnp.zeros((d_a, d_g), dtype) if opts.momentum > 0 else None,
    )


def _init_state(opts: _Options, metas, params: Any, fallback_state: Any) -> ScaleByKBFGSState:
    dtype = base.as_float(jax.tree_util.tree_leaves(params)[0].dtype) if metas else jnp.float32
    return _stack(
        [_init_block(opts, m, dtype) for m in metas],
        count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        a_count=jnp.zeros([], jnp.int32),
        fallback_state=fallback_state,
    )


class _Inputs(NamedTuple):
    """One block's inputs to a step: ``a2``, the homogeneous inputs as a ``(B*T, d_a)``
    matrix, its column mean ``a_bar``, the batch size ``rows`` and the dampings ``lam_a``
    (:math:`\\lambda_A`) and ``mu2`` (:math:`\\mu_2`)."""

    a2: jax.Array
    a_bar: jax.Array
    rows: int
    lam_a: jax.Array
    mu2: jax.Array


def _block_inputs(opts: _Options, stats: base.LayerStats, sqrt_damp, dtype) -> _Inputs:
    if stats.meta.kind == "conv" and opts.conv_damping_split:
        sqrt_t = float(stats.a.shape[1]) ** 0.5
        lam_a, mu2 = sqrt_damp * sqrt_t, sqrt_damp / sqrt_t
    else:
        lam_a, mu2 = sqrt_damp, sqrt_damp
    a = layers_lib.inputs_matrix(stats).astype(dtype)
    a2 = a.reshape(-1, a.shape[-1])
    return _Inputs(a2, jnp.mean(a2, axis=0), stats.a.shape[0], lam_a, mu2)


# ---------------------------------------------------------------------------------------------
# The steps.


def _accumulate_a(opts: _Options, blocks, inputs, a_count, ok, warm_start: bool, dtype):
    """The EMA of ``A`` with weight :math:`\\max(1 - \\beta, 1 / (n + 1))` (the first batch is
    taken whole; ``warm_start``: the arithmetic mean). Returns ``(blocks, a_count, ok)``."""
    if opts.a_statistic != "ema":
        return blocks, a_count, ok
    n = a_count.astype(dtype)
    w = 1.0 / (n + 1.0) if warm_start else jnp.maximum(1.0 - opts.ema_decay, 1.0 / (n + 1.0))
    # The diagonals for the check come from the products (the Gram is not written out twice).
    grams = [linalg.gram(x.a2, with_diagonal=True) for x in inputs]
    if opts.fused:
        for blk, (_, dg), x in zip(blocks, grams, inputs, strict=True):
            ok &= safety.ema_finite(w, blk.a_factor, dg / x.rows)
    blocks = [
        blk._replace(
            a_factor=jnp.where(ok, (1.0 - w) * blk.a_factor + w * (gm / x.rows), blk.a_factor)
        )
        for blk, (gm, _), x in zip(blocks, grams, inputs, strict=True)
    ]
    return blocks, jnp.where(ok, optax.safe_increment(a_count), a_count), ok


def _refresh_h_a(opts: _Options, blk: _Block, x: _Inputs, count, ok) -> _Block:
    """The explicit damped inverse :math:`H_a = (A + \\lambda_A I)^{-1}` at the first step (and
    every ``inverse_every`` steps with ``a_side="inverse"``); a non-finite one is dropped."""
    do_inv = count == 0
    if opts.a_side == "inverse":
        do_inv = do_inv | (count % opts.inverse_every == 0)
    do_inv = do_inv & ok

    def invert(ops):
        mat, a2, lam, old = ops
        if opts.a_statistic == "minibatch":
            mat = linalg.gram(a2) / x.rows
        new = linalg.damped_cholesky_inverse(mat, lam)
        return jnp.where(linalg.is_finite(new), new, old)

    a_src = blk.a_factor if opts.a_statistic == "ema" else blk.h_a
    # One cond per block: a single cond holding many LAPACK calls was seen to deadlock XLA's
    # CPU runtime (see kfac.py).
    h_a = lax.cond(do_inv, invert, lambda ops: ops[3], (a_src, x.a2, x.lam_a, blk.h_a))
    return blk._replace(h_a=h_a)


def _apply_hg(limited: bool, hg: Any, v: jax.Array) -> jax.Array:
    """``H_g v`` for a vector, or ``V H_g`` for the rows of a matrix."""
    if limited:
        return bfgs_lib.lbfgs_apply(hg, v)
    return jnp.matmul(v, hg, precision=_HIGHEST)


def _momentum_step(rho: float, blk: _Block, mat: jax.Array, ok) -> tuple[jax.Array, _Block]:
    """:math:`\\bar M = \\rho \\bar M + (1 - \\rho) M` (kept only where ``ok``)."""
    if rho > 0:
        mat = rho * blk.momentum + (1.0 - rho) * mat
        blk = blk._replace(momentum=jnp.where(ok, mat, blk.momentum))
    return mat, blk


def _precondition_block(limited: bool, blk: _Block, mat: jax.Array) -> jax.Array:
    """:math:`H_a \\bar M H_g` for the homogeneous gradient ``mat`` (``(d_a, d_g)``)."""
    return _apply_hg(limited, blk.h_g, jnp.matmul(blk.h_a, mat, precision=_HIGHEST))


def _precondition(opts: _Options, metas, grads, fallback_out, blocks, ok, dtype):
    """The direction: the fallback's output with every block's kernel and bias replaced by its
    preconditioned momentum. Returns ``(leaves, treedef, blocks)``."""
    leaves, index, treedef = layers_lib.leaf_index(fallback_out)
    grad_leaves = jax.tree_util.tree_leaves(grads)
    new_blocks = []
    for blk, m in zip(blocks, metas, strict=True):
        ki = base.match_path(tuple(m.kernel_path), index)
        bi = base.match_path(tuple(m.bias_path), index) if m.has_bias else None
        kernel = grad_leaves[ki]
        bias = grad_leaves[bi] if bi is not None else None
        mat = layers_lib.homogeneous_grad(kernel, bias, m).astype(dtype)
        mat, blk = _momentum_step(opts.momentum, blk, mat, ok)
        w_, b_ = layers_lib.split_homogeneous(_precondition_block(opts.limited, blk, mat), m)
        leaves[ki] = w_.astype(kernel.dtype)
        if bi is not None:
            leaves[bi] = b_.astype(bias.dtype)
        new_blocks.append(blk)
    return leaves, treedef, new_blocks


def _trial_pass(opts: _Options, params, direction, stats_fn, metas, stats, count, dtype):
    """The pair ``(s, y)`` of each block from ``stats_fn`` at the trial point
    :math:`\\theta' = \\theta - \\alpha P`, on the same batch as ``stats``."""
    alpha = _value(opts.trial_step_size, count, dtype)
    trial = jax.tree.map(
        lambda p, u: (p - alpha.astype(p.dtype) * u).astype(p.dtype), params, direction
    )
    trial_stats = _match(opts.name, metas, stats_fn(trial))
    return [
        _mean_differences(s, ts, dtype, opts.name)
        for s, ts in zip(stats, trial_stats, strict=True)
    ]


def _lagged_pair(opts: _Options, blk: _Block, mean, mu2, active) -> _Block:
    """The G-side update with the pair of the previous step (``extra_pass="lagged"``): the
    stored means minus this call's."""
    h_mean, g_mean = mean
    s_pair = blk.prev_h - h_mean
    y_pair = blk.prev_g - g_mean
    g_norm = jnp.linalg.norm(blk.prev_g)
    return _g_side_update(opts, blk, s_pair, y_pair, g_norm, mu2, active)


def _g_side_update(opts: _Options, blk: _Block, s, y, g_norm, mu2, active) -> _Block:
    """EMA of the raw pair, double damping on a copy, skip rules, then the BFGS update of the
    dense :math:`H_g` (or the push of the damped pair into the L-BFGS memory); every part is
    kept only where ``active``."""
    s_bar, y_bar, hg, decay = blk.s_bar, blk.y_bar, blk.h_g, opts.pair_decay
    if decay > 0:
        s_bar_new = decay * s_bar + (1.0 - decay) * s
        y_bar_new = decay * y_bar + (1.0 - decay) * y
    else:
        s_bar_new, y_bar_new = s, y
    s_bar_new = jnp.where(active, s_bar_new, s_bar)
    y_bar_new = jnp.where(active, y_bar_new, y_bar)
    hy = _apply_hg(opts.limited, hg, y_bar_new)
    ds, dy, _ = bfgs_lib.double_damping(
        s_bar_new, y_bar_new, hy, opts.powell_mu, mu2, opts.double_damping
    )
    ok = active & bfgs_lib.should_update(ds, dy, g_norm, opts.skip_eps)
    ok = ok & linalg.is_finite((ds, dy))
    if opts.limited:
        hg_new = bfgs_lib.lbfgs_push(hg, ds, dy, ok)
    else:
        cand = bfgs_lib.bfgs_inverse_update(hg, ds, dy)
        ok = ok & linalg.is_finite(cand)
        if opts.max_growth is not None:
            ok = ok & (jnp.linalg.norm(cand) <= opts.max_growth * jnp.linalg.norm(hg))
        hg_new = jnp.where(ok, cand, hg)
    return blk._replace(h_g=hg_new, s_bar=s_bar_new, y_bar=y_bar_new)


def _hessian_action_update(opts: _Options, blk: _Block, x: _Inputs, ok) -> _Block:
    """One BFGS update of :math:`H_a` with :math:`s_a = H_a \\bar a`, :math:`y_a = (A +
    \\lambda_A I) s_a` (the stored EMA of ``A``, or this batch's with ``"minibatch"``)."""
    s_a = jnp.matmul(blk.h_a, x.a_bar, precision=_HIGHEST)
    if opts.a_statistic == "ema":
        y_a = jnp.matmul(blk.a_factor, s_a, precision=_HIGHEST)
    else:
        y_a = jnp.matmul(x.a2.T, jnp.matmul(x.a2, s_a), precision=_HIGHEST)
        y_a = y_a / x.rows
    y_a = y_a + x.lam_a * s_a
    take = ok & bfgs_lib.should_update(s_a, y_a, jnp.linalg.norm(x.a_bar), opts.skip_eps)
    cand = bfgs_lib.bfgs_inverse_update(blk.h_a, s_a, y_a)
    take = take & linalg.is_finite(cand)
    return blk._replace(h_a=jnp.where(take, cand, blk.h_a))


def _finish(opts: _Options, state, blocks, means, leaves, treedef, fb_state, a_count, ok):
    """The updates and the new state; with a fused ``"skip"``, non-finite updates are zeroed
    and the step is counted as skipped (:func:`kfqn_jax._src.safety.finish_skip`)."""
    count, nonfinite = state.count, state.nonfinite_count
    new_count = optax.safe_increment(count)
    prev_h = tuple(hm for hm, _ in means) if not opts.closure else ()
    prev_g = tuple(gm for _, gm in means) if not opts.closure else ()
    if opts.fused:
        leaves, new_count, nonfinite = safety.finish_skip(ok, leaves, count, nonfinite)
        fb_state = safety.select_tree(ok, fb_state, state.fallback_state)
        prev_h = safety.select_tree(ok, prev_h, state.prev_h)
        prev_g = safety.select_tree(ok, prev_g, state.prev_g)
    new_state = _stack(
        blocks,
        count=new_count,
        nonfinite_count=nonfinite,
        a_count=a_count,
        prev_h=prev_h,
        prev_g=prev_g,
        fallback_state=fb_state,
    )
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state


def _scale_by_kbfgs(opts: _Options) -> optax.GradientTransformationExtraArgs:
    _check_options(opts)
    masked_fallback = _fallback_transform(opts)

    def init_fn(params):
        return _init_state(opts, _blocks(opts, params), params, masked_fallback.init(params))

    def update_fn(
        updates, state, params=None, *, layer_stats=None, stats_fn=None, warm_start=False, **extra
    ):
        del extra
        _check_update_args(opts, layer_stats, stats_fn, params, warm_start)
        metas, stats = _partition(opts, updates, layer_stats)
        dtype = state.h_a[0].dtype if metas else jnp.float32
        count = state.count
        blocks = _unstack(state)
        sqrt_damp = jnp.sqrt(_value(opts.damping, count, dtype))
        inputs = [_block_inputs(opts, s, sqrt_damp, dtype) for s in stats]
        # on_nonfinite="skip" is fused into the step (as in kfac.py): `ok` says the gradients
        # and every statistic the step reads are finite (a column mean is finite only if its
        # column is), and gates each state update inside the operation that makes it.
        ok = jnp.asarray(True)
        if opts.fused:
            ok = linalg.is_finite(jax.tree_util.tree_leaves(updates))
            ok = ok & linalg.is_finite([x.a_bar for x in inputs])
        blocks, a_count, ok = _accumulate_a(
            opts, blocks, inputs, state.a_count, ok, warm_start, dtype
        )
        if warm_start:
            return jax.tree.map(jnp.zeros_like, updates), state._replace(
                a_factors=tuple(b.a_factor for b in blocks) if opts.a_statistic == "ema" else (),
                a_count=a_count,
                nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
            )
        means = [_means(s, dtype, opts.name) for s in stats]
        if opts.fused:
            ok &= linalg.is_finite(means)
        if not opts.closure:
            active = (count > 0) & ok
            blocks = [
                _lagged_pair(opts, b, m, x.mu2, active)
                for b, m, x in zip(blocks, means, inputs, strict=True)
            ]
        blocks = [_refresh_h_a(opts, b, x, count, ok) for b, x in zip(blocks, inputs, strict=True)]
        fb_out, fb_state = masked_fallback.update(updates, state.fallback_state, params)
        leaves, treedef, blocks = _precondition(opts, metas, updates, fb_out, blocks, ok, dtype)
        if opts.closure and metas:
            direction = jax.tree_util.tree_unflatten(treedef, leaves)
            pairs = _trial_pass(opts, params, direction, stats_fn, metas, stats, count, dtype)
            if opts.fused:
                ok &= linalg.is_finite(pairs)
            blocks = [
                _g_side_update(opts, b, s, y, jnp.linalg.norm(m[1]), x.mu2, ok)
                for b, (s, y), m, x in zip(blocks, pairs, means, inputs, strict=True)
            ]
        if opts.a_side == "hessian_action":
            blocks = [
                _hessian_action_update(opts, b, x, ok) for b, x in zip(blocks, inputs, strict=True)
            ]
        return _finish(opts, state, blocks, means, leaves, treedef, fb_state, a_count, ok)

    guarded = safety.guard_nonfinite(
        update_fn,
        opts.on_nonfinite,
        opts.name,
        (extra_args.LAYER_STATS,),
        init_fn=init_fn,
        fused=True,
    )
    return optax.GradientTransformationExtraArgs(
        init_fn, extra_args.announce(guarded, _requirements(opts))
    )


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
    r"""Preconditions Dense and Conv layers with K-BFGS (dense :math:`H_g`); no learning rate.

    See the module docstring of :mod:`kfqn_jax._src.kbfgs` for the maths and :func:`kbfgs` for
    the full optimizer and an example.

    Args:
      damping: :math:`\lambda` (scalar or schedule of the step count). It enters as
        :math:`\lambda_A = \sqrt\lambda` on the A side and as :math:`\mu_2 = \sqrt\lambda` in
        the second damping step (conv layers: see ``conv_damping_split``). The demo uses 0.3.
      trial_step_size: :math:`\alpha` of the trial point :math:`\theta' = \theta - \alpha P`
        (scalar or schedule). :func:`kbfgs` sets it to the learning rate, so that the trial
        point is the next iterate, as in the authors' code.
      extra_pass: ``"closure"`` (default): ``update`` calls ``stats_fn(trial_params)`` for the
        trial-point statistics on the same minibatch (one extra forward and a cotangent-only
        backward). ``"lagged"``: no closure; the pair of step ``k`` is formed at step ``k + 1``
        from the means stored at step ``k`` and the ``layer_stats`` of step ``k + 1`` (taken at
        the next iterate, on the *next* minibatch), as for users who cannot pass a closure. The
        lagged pair mixes two minibatches; it is an approximation not in the papers.
      double_damping: ``"2020"`` (default; Powell on :math:`H` with :math:`\mu_1`, then Powell
        with :math:`B = I` and :math:`\mu_2`, as the NeurIPS-2020 code) or ``"lm"`` (Powell on
        :math:`H`, then :math:`y \leftarrow y + \mu_2 s`; the later form of Ren's code and of
        ASDL, attributed to arXiv 2102.06737; the attribution is unverified).
      powell_mu: :math:`\mu_1` of the Powell step on :math:`H` (0.2, hard-coded by the authors).
      conv_damping_split: for a convolution with :math:`|T|` output positions use
        :math:`\lambda_A = \sqrt{\lambda}\sqrt{|T|}` and :math:`\mu_2 = \sqrt\lambda /
        \sqrt{|T|}` ("DDV2-SqrtT" in Ren's code, ASDL's ``_get_damping``); ``False`` uses
        :math:`\sqrt\lambda` for both, as for Dense layers.
      a_side: ``"hessian_action"`` (default, as the authors' code): one BFGS update of
        :math:`H_a` per step with :math:`s_a = H_a \bar a`, :math:`y_a = (A + \lambda_A I)
        s_a`, after an explicit damped inverse at the first step. ``"inverse"``: :math:`H_a =
        (A + \lambda_A I)^{-1}` recomputed every ``inverse_every`` steps (Cholesky), which may
        be what the NeurIPS-2020 text describes (unverified).
      inverse_every: the period ``T`` of ``a_side="inverse"`` (static int; 20 in the code).
      ema_decay: decay :math:`\beta` of the EMA of ``A`` (0.9). The weight of a new batch is
        :math:`\max(1 - \beta, 1 / (n + 1))` after ``n`` batches, so the first batch (or the
        warm-start mean) is taken whole.
      pair_decay: decay of the EMA of the raw pair ``(s, y)`` (0.9, hard-coded by the authors
        when the batch is smaller than the data set; 0 uses the raw pair).
      momentum: :math:`\rho` of the EMA momentum :math:`\bar M \leftarrow \rho \bar M +
        (1 - \rho) M` (the authors' form; note the :math:`1 - \rho` weighting, unlike
        heavy-ball momentum); 0 disables it.
      skip_eps: :math:`\epsilon` of the skip rule: an update is skipped unless
        :math:`s^\top y > \epsilon\, s^\top s\, \|\bar g\|` (G side, :math:`\bar g` the
        current mean pre-activation gradient) or :math:`\|\bar a\|` (A side), and
        :math:`s^\top y > 0`. Non-finite updates are always skipped.
      max_growth: if set, also skip a dense :math:`H_g` update that grows
        :math:`\|H_g\|_F` by more than this factor (2 in Ren's later code); ``None`` (default,
        as the NeurIPS code) does not test it.
      layers: the blocks: ``None`` guesses them from the parameter names, or a sequence of
        :class:`LayerMeta` from :func:`kfqn_jax.flax.layer_metas` (exact).
      fallback: transform for parameters outside any block. Default: the same EMA momentum
        (``optax.ema(momentum, debias=False)``).
      on_nonfinite: what a step does when the gradients, the statistics it is given, or
        the updates and state it produces hold a NaN or an infinity: ``"skip"``
        (default) returns zero updates and the previous state with ``nonfinite_count``
        incremented (so ``count`` does not advance either); ``"raise"`` raises a
        ``FloatingPointError`` from the device (under ``jit``, surfaced by JAX as a
        ``jax.errors.JaxRuntimeError`` carrying that message); ``"ignore"`` does not
        check.
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
    # locals() holds exactly the arguments here (the first statement).
    return _scale_by_kbfgs(_Options(name="kbfgs", limited=False, memory_size=1, **locals()))


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
    r"""Preconditions Dense and Conv layers with K-BFGS(L) (L-BFGS :math:`H_g`); no learning rate.

    :math:`H_g` is never formed: its products use the compact form of the last ``L`` accepted
    (damped) pairs with :math:`H_0 = I` (:math:`\gamma = 1`, fixed, as the authors' code), see
    :func:`kfqn_jax._src.bfgs.lbfgs_apply`.

    Args:
      memory_size: ``L``, the number of pairs kept (static int; 100 in the authors' code).
      damping: :math:`\lambda` (scalar or schedule of the step count). It enters as
        :math:`\lambda_A = \sqrt\lambda` on the A side and as :math:`\mu_2 = \sqrt\lambda` in
        the second damping step (conv layers: see ``conv_damping_split``). The demo uses 0.3.
      trial_step_size: :math:`\alpha` of the trial point :math:`\theta' = \theta - \alpha P`
        (scalar or schedule). :func:`kbfgs` sets it to the learning rate, so that the trial
        point is the next iterate, as in the authors' code.
      extra_pass: ``"closure"`` (default): ``update`` calls ``stats_fn(trial_params)`` for the
        trial-point statistics on the same minibatch (one extra forward and a cotangent-only
        backward). ``"lagged"``: no closure; the pair of step ``k`` is formed at step ``k + 1``
        from the means stored at step ``k`` and the ``layer_stats`` of step ``k + 1`` (taken at
        the next iterate, on the *next* minibatch), as for users who cannot pass a closure. The
        lagged pair mixes two minibatches; it is an approximation not in the papers.
      double_damping: ``"2020"`` (default; Powell on :math:`H` with :math:`\mu_1`, then Powell
        with :math:`B = I` and :math:`\mu_2`, as the NeurIPS-2020 code) or ``"lm"`` (Powell on
        :math:`H`, then :math:`y \leftarrow y + \mu_2 s`; the later form of Ren's code and of
        ASDL, attributed to arXiv 2102.06737; the attribution is unverified).
      powell_mu: :math:`\mu_1` of the Powell step on :math:`H` (0.2, hard-coded by the authors).
      conv_damping_split: for a convolution with :math:`|T|` output positions use
        :math:`\lambda_A = \sqrt{\lambda}\sqrt{|T|}` and :math:`\mu_2 = \sqrt\lambda /
        \sqrt{|T|}` ("DDV2-SqrtT" in Ren's code, ASDL's ``_get_damping``); ``False`` uses
        :math:`\sqrt\lambda` for both, as for Dense layers.
      a_side: ``"hessian_action"`` (default, as the authors' code): one BFGS update of
        :math:`H_a` per step with :math:`s_a = H_a \bar a`, :math:`y_a = (A + \lambda_A I)
        s_a`, after an explicit damped inverse at the first step. ``"inverse"``: :math:`H_a =
        (A + \lambda_A I)^{-1}` recomputed every ``inverse_every`` steps (Cholesky), which may
        be what the NeurIPS-2020 text describes (unverified).
      inverse_every: the period ``T`` of ``a_side="inverse"`` (static int; 20 in the code).
      ema_decay: decay :math:`\beta` of the EMA of ``A`` (0.9). The weight of a new batch is
        :math:`\max(1 - \beta, 1 / (n + 1))` after ``n`` batches, so the first batch (or the
        warm-start mean) is taken whole.
      pair_decay: decay of the EMA of the raw pair ``(s, y)`` (0.9, hard-coded by the authors
        when the batch is smaller than the data set; 0 uses the raw pair).
      momentum: :math:`\rho` of the EMA momentum :math:`\bar M \leftarrow \rho \bar M +
        (1 - \rho) M` (the authors' form; note the :math:`1 - \rho` weighting, unlike
        heavy-ball momentum); 0 disables it.
      skip_eps: :math:`\epsilon` of the skip rule: an update is skipped unless
        :math:`s^\top y > \epsilon\, s^\top s\, \|\bar g\|` (G side, :math:`\bar g` the
        current mean pre-activation gradient) or :math:`\|\bar a\|` (A side), and
        :math:`s^\top y > 0`. Non-finite updates are always skipped.
      layers: the blocks: ``None`` guesses them from the parameter names, or a sequence of
        :class:`LayerMeta` from :func:`kfqn_jax.flax.layer_metas` (exact).
      fallback: transform for parameters outside any block. Default: the same EMA momentum
        (``optax.ema(momentum, debias=False)``).
      on_nonfinite: what a step does when the gradients, the statistics it is given, or
        the updates and state it produces hold a NaN or an infinity: ``"skip"``
        (default) returns zero updates and the previous state with ``nonfinite_count``
        incremented (so ``count`` does not advance either); ``"raise"`` raises a
        ``FloatingPointError`` from the device (under ``jit``, surfaced by JAX as a
        ``jax.errors.JaxRuntimeError`` carrying that message); ``"ignore"`` does not
        check.
      a_statistic: ``"minibatch"`` (default here): the Hessian action uses the current batch's
        ``A`` and ``A`` is never stored (arXiv 2102.06737, ``miniBatchADamped``), so that the
        state stays near first-order size (about :math:`d_a^2 + 2 L d_g` per layer plus the
        momentum); ``"ema"``: the 2020 code's stored EMA of ``A``.

    Returns:
      As :func:`scale_by_kbfgs`.
    
    """
    # locals() holds exactly the arguments here (the first statement).
    return _scale_by_kbfgs(_Options(name="kbfgs_l", limited=True, max_growth=None, **locals()))


def kbfgs(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 0.3,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: optax.ScalarOrSchedule = 0.0,
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
    r"""K-BFGS with a learning rate: ``chain([add_decayed_weights(l2_reg)], scale_by_kbfgs,
    [add_decayed_weights(weight_decay, weight_decay_mask)], scale_by_learning_rate)``.

    Per layer, :math:`\theta \leftarrow \theta - \alpha (H_a \bar M H_g + \tau \theta)`, where
    :math:`\bar M` is the momentum of the gradient plus :math:`\lambda_2 \theta`, with
    :math:`\alpha` = ``learning_rate``, :math:`\lambda` = ``damping``, :math:`\tau` =
    ``weight_decay`` (decoupled weight decay, added after preconditioning as in
    ``optax.adamw``, on the parameters ``weight_decay_mask`` selects), :math:`\lambda_2` =
    ``l2_reg`` (a coupled L2 term added to the gradient before the momentum, as the authors'
    :math:`\tau = 10^{-5}`; it was called ``weight_decay`` before kfqn_jax 0.2, and a nonzero
    ``weight_decay`` warns of the change) and the other symbols as in :func:`scale_by_kbfgs`,
    whose keyword arguments are accepted here (``trial_step_size`` is set to
    ``learning_rate``). List ``inverse_every``, ``momentum``, ``ema_decay``, ``pair_decay`` and
    ``weight_decay`` in ``static_args`` of ``optax.inject_hyperparams``.

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

    References:
      Goldfarb, Ren & Bahamou, `Practical Quasi-Newton Methods for Training Deep Neural
      Networks <https://arxiv.org/abs/2006.08877>`_, NeurIPS 2020.
      Ren, Bahamou & Goldfarb, `Kronecker-factored Quasi-Newton Methods for Deep Learning
      <https://arxiv.org/abs/2102.06737>`_, 2021.
      Byrd, Nocedal & Schnabel, Representations of quasi-Newton matrices and their use in
      limited memory methods, Math. Programming 63, 1994 (compact form).
    """
    kw = dict(locals())  # exactly the arguments (the first statement)
    decay = {k: kw.pop(k) for k in _DECAY_ARGS}
    lr = kw.pop("learning_rate")
    return alias.build("kbfgs", scale_by_kbfgs(trial_step_size=lr, **kw), lr, **decay)


def kbfgs_l(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 0.3,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: optax.ScalarOrSchedule = 0.0,
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
    r"""K-BFGS(L) with a learning rate: ``chain([add_decayed_weights(l2_reg)],
    scale_by_kbfgs_l, [add_decayed_weights(weight_decay, weight_decay_mask)],
    scale_by_learning_rate)``.

    As :func:`kbfgs` (the same ``weight_decay``, ``weight_decay_mask`` and ``l2_reg``), with
    :math:`H_g` an L-BFGS matrix of ``memory_size`` pairs (``L``, static) and the keyword
    arguments of :func:`scale_by_kbfgs_l`.
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

    References:
      Goldfarb, Ren & Bahamou, `Practical Quasi-Newton Methods for Training Deep Neural
      Networks <https://arxiv.org/abs/2006.08877>`_, NeurIPS 2020.
      Ren, Bahamou & Goldfarb, `Kronecker-factored Quasi-Newton Methods for Deep Learning
      <https://arxiv.org/abs/2102.06737>`_, 2021.
      Byrd, Nocedal & Schnabel, Representations of quasi-Newton matrices and their use in
      limited memory methods, Math. Programming 63, 1994 (compact form).
    """
    kw = dict(locals())  # exactly the arguments (the first statement)
    decay = {k: kw.pop(k) for k in _DECAY_ARGS}
    lr = kw.pop("learning_rate")
    return alias.build("kbfgs_l", scale_by_kbfgs_l(trial_step_size=lr, **kw), lr, **decay)
