r"""TNT: Tensor Normal Training (Ren & Goldfarb, NeurIPS 2021).

Every parameter tensor, after a static reshape to ``d_1 × … × d_k`` (its *modes*), is
preconditioned by a Kronecker product of one matrix per mode. The sampled-label gradient
``Ḡ`` (labels drawn from the model, so the statistics estimate the true Fisher) is modelled as
tensor-normal with Kronecker-separable covariance ``U_1 ⊗ … ⊗ U_k``. Per mode ``i`` the
contraction of ``Ḡ`` over every other axis is averaged in time:

.. math::

    C_i = Ḡ_{(i)} Ḡ_{(i)}^\top \in \mathbb{R}^{d_i \times d_i}, \qquad
    S_i \leftarrow (1 - w) S_i + w C_i, \qquad w = \max(1 - β, 1 / (n + 1)),

where ``Ḡ_{(i)}`` is the mode-``i`` unfolding (``d_i × N/d_i``, ``N = ∏_j d_j``), ``β`` is
``ema_decay`` and ``n`` the number of earlier statistics updates. Every ``tr S_i`` equals the
running average of ``‖Ḡ‖²``. The *same-trace* normalisation

.. math::

    c = \Bigl(\frac{\operatorname{tr} S}{N}\Bigr)^{1/k}, \qquad
    U_i = \frac{S_i}{c^{k-1} \prod_{j \ne i} d_j}

gives every ``U_i`` the average eigenvalue ``c`` and ``tr(U_1 ⊗ … ⊗ U_k) = tr S``. The
direction applied to the momentum ``m ← μ m + ∇L`` is

.. math::

    Δ = m \times_1 (U_1 + ε_1 I)^{-1} \times_2 \dots \times_k (U_k + ε_k I)^{-1},
    \qquad \operatorname{vec}(Δ) = \Bigl(\bigotimes_i (U_i + ε_i I)^{-1}\Bigr)\operatorname{vec}(m),

with ``×_i`` the mode-``i`` product and ``vec`` the row-major (C-order) vectorisation.

Shared with :mod:`kfqn_jax._src.shampoo`: the reshaping rules, the contractions and the
mode products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kfqn_jax._src import base, linalg, safety

_HIGHEST = lax.Precision.HIGHEST

RESHAPES = ("filter_flattening", "none")
DAMPING_MODES = ("constant", "root", "max_eigenvalue", "mean_eigenvalue", "trace")
# Contractions of modes at least twice this size are assembled from half-size blocks.
_SYMMETRIC_SPLIT_MIN = 256


# ------------------------------------------------------------------------------------------------
# Modes: reshaping, contractions, mode products (shared with Shampoo).
# ------------------------------------------------------------------------------------------------


class ModeLayout(NamedTuple):
    """Static description of how one parameter leaf is split into modes.

    Attributes:
      shape: the leaf's shape.
      modes: the mode sizes ``(d_1, …, d_k)``, ``∏ d_i = prod(shape)``.
      full: per mode, whether it has a full ``d_i × d_i`` matrix (``d_i <= max_dim``) or a
        diagonal (a vector of ``d_i`` entries).
    """

    shape: tuple[int, ...]
    modes: tuple[int, ...]
    full: tuple[bool, ...]


def mode_sizes(path: tuple[Any, ...], shape: Sequence[int], reshape: Any) -> tuple[int, ...]:
    """The modes ``(d_1, …, d_k)`` of a leaf of ``shape`` under the rule ``reshape``.

    * ``"filter_flattening"``: a leaf of rank ``r >= 4`` keeps its last two axes and merges the
      others into one mode, ``(∏ shape[:-2], shape[-2], shape[-1])``. A Flax ``Conv`` kernel
      ``(k_1, …, k_n, C_in, C_out)`` becomes ``(k_1⋯k_n, C_in, C_out)``, the authors'
      filter flattening of PyTorch's ``(C_out, C_in, k_h k_w)``; ranks <= 3 (vectors, dense
      kernels, 3-D ``DenseGeneral``/attention kernels, 1-D conv kernels) keep every axis.
    * ``"none"``: every axis is a mode.
    * a callable ``reshape(path, shape) -> modes`` with ``∏ modes = ∏ shape``.

    Axes of size 1 are then dropped (a size-1 mode is a scalar factor that only rescales the
    step), and a leaf with no axis left (a scalar, a ``(1,)`` bias) has the single mode ``(1,)``.
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if callable(reshape):
        modes = tuple(int(d) for d in reshape(path, shape))
        if math.prod(modes) != size:
            raise ValueError(
                f"reshape({path}, {shape}) returned modes {modes} whose product is not the "
                f"leaf's size {size}."
            )
    elif reshape == "filter_flattening" and len(shape) >= 4:
        modes = (math.prod(shape[:-2]),) + shape[-2:]
    elif reshape in RESHAPES:
        modes = shape
    else:
        raise ValueError(f"reshape must be one of {RESHAPES} or a callable, got {reshape!r}.")
    modes = tuple(d for d in modes if d != 1)
    return modes or (1,)


def layouts_of(tree: Any, reshape: Any, max_dim: int | None) -> list[ModeLayout]:
    """The :class:`ModeLayout` of every leaf of ``tree``, in ``tree_leaves`` order."""
    out = []
    for path, leaf in zip(base.tree_paths(tree), jax.tree.leaves(tree), strict=True):
        modes = mode_sizes(path, jnp.shape(leaf), reshape)
        full = tuple(max_dim is None or d <= max_dim for d in modes)
        out.append(ModeLayout(tuple(jnp.shape(leaf)), modes, full))
    return out


def _symmetric_contraction(
    x: jax.Array, axis: int, others: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """``X_(axis) X_(axis)ᵀ`` exploiting symmetry, and its diagonal: with ``x`` split in halves
    along ``axis``, ``C = [[C_00, C_01], [C_01ᵀ, C_11]]`` where the diagonal blocks recurse
    (down to ``_SYMMETRIC_SPLIT_MIN``), which saves up to half of the flops of one product.
    The diagonal is read from the products, so a caller that checks it and then consumes ``C``
    elementwise lets XLA fuse the outer assembly into that use."""
    d = x.shape[axis]
    if d < 2 * _SYMMETRIC_SPLIT_MIN:
        c = jnp.tensordot(x, x, axes=(others, others), precision=_HIGHEST)
        return c, jnp.diagonal(c)
    h = d // 2
    x0 = lax.slice_in_dim(x, 0, h, axis=axis)
    x1 = lax.slice_in_dim(x, h, d, axis=axis)
    c01 = jnp.tensordot(x0, x1, axes=(others, others), precision=_HIGHEST)
    c00, d00 = _symmetric_contraction(x0, axis, others)
    c11, d11 = _symmetric_contraction(x1, axis, others)
    return jnp.block([[c00, c01], [c01.T, c11]]), jnp.concatenate([d00, d11])


def mode_contractions(
    g: jax.Array, layout: ModeLayout, with_diagonals: bool = False
) -> list[jax.Array] | tuple[list[jax.Array], list[jax.Array]]:
    """``C_i = G_(i) G_(i)ᵀ`` per mode (its diagonal for diagonal modes) of ``g``; with
    ``with_diagonals``, also the diagonal of each (the vector itself for diagonal modes)."""
    x = g.reshape(layout.modes)
    k = len(layout.modes)
    out, diags = [], []
    for i in range(k):
        others = tuple(j for j in range(k) if j != i)
        if not layout.full[i]:
            c = jnp.sum(x * x, axis=others)
            out.append(c)
            diags.append(c)
            continue
        c, dg = _symmetric_contraction(x, i, others)
        out.append(c)
        diags.append(dg)
    return (out, diags) if with_diagonals else out


def mode_product(x: jax.Array, mat: jax.Array, axis: int, full: bool) -> jax.Array:
    """``x ×_axis mat``: ``out[…, j, …] = Σ_l mat[l, j] x[…, l, …]`` (``mat`` a diagonal
    vector when not ``full``)."""
    k = x.ndim
    if not full:
        shape = [1] * k
        shape[axis] = x.shape[axis]
        return x * mat.reshape(shape)
    if axis == k - 1:
        return jnp.tensordot(x, mat, axes=([axis], [0]), precision=_HIGHEST)
    y = jnp.tensordot(mat, x, axes=([0], [axis]), precision=_HIGHEST)
    return y if axis == 0 else jnp.moveaxis(y, 0, axis)


def precondition(g: jax.Array, mats: Sequence[jax.Array], layout: ModeLayout) -> jax.Array:
    """``g ×_1 M_1 ×_2 … ×_k M_k`` reshaped back to the leaf's shape."""
    x = g.reshape(layout.modes)
    for i, (m, f) in enumerate(zip(mats, layout.full, strict=True)):
        x = mode_product(x, m, i, f)
    return x.reshape(layout.shape)


def init_factors(layout: ModeLayout, dtype: Any, value: str) -> tuple[jax.Array, ...]:
    """Per mode a zero (``value="zeros"``) or identity (``"eye"``) matrix, or its diagonal."""
    out = []
    for d, f in zip(layout.modes, layout.full, strict=True):
        if value == "zeros":
            out.append(jnp.zeros((d, d) if f else (d,), dtype))
        elif f:
            out.append(jnp.eye(d, dtype=dtype))
        else:
            out.append(jnp.ones((d,), dtype))
    return tuple(out)


def trace_of(mat: jax.Array, full: bool) -> jax.Array:
    return jnp.trace(mat) if full else jnp.sum(mat)


def ema_weight(ema_decay: Any, n: jax.Array, dtype: Any, warm_start: bool) -> jax.Array:
    """``max(1 - β, 1 / (n + 1))`` (``1 / (n + 1)`` in a warm start: the arithmetic mean)."""
    run = 1.0 / (n.astype(dtype) + 1.0)
    if warm_start:
        return run
    return jnp.maximum(1.0 - jnp.asarray(ema_decay, dtype), run)


def check_common(method: str, ema_decay: Any, momentum: Any, max_dim: Any, reshape: Any) -> None:
    """Construction-time checks shared by TNT and Shampoo."""
    if ema_decay is not None:
        base.check_fraction(method, "ema_decay", ema_decay)
    base.check_fraction(method, "momentum", momentum, static=True)
    if max_dim is not None:
        base.check_positive_int(method, "max_dim", max_dim, what=" or None (no cap)")
    if not callable(reshape) and reshape not in RESHAPES:
        raise ValueError(
            f"{method}: reshape must be one of {', '.join(map(repr, RESHAPES))} or a callable "
            f"(path, shape) -> modes; got {reshape!r}."
        )


def flatten_like(treedef: Any, tree: Any, what: str, method: str) -> list:
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{method}: {what} must have the structure of the gradients ({treedef}); {e}"
        ) from e


def with_warm_start(chain: optax.GradientTransformationExtraArgs, inner: Any, index: int):
    """Wraps an ``optax.chain`` so that ``update(..., warm_start=True)`` only folds statistics
    into the state of its element ``index`` (``inner``) and returns zero updates."""

    def update_fn(updates, state, params=None, *, warm_start=False, **extra):
        if not warm_start:
            return chain.update(updates, state, params, **extra)
        states = list(state)
        zeros, states[index] = inner.update(
            updates, states[index], params, warm_start=True, **extra
        )
        return zeros, tuple(states)

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)


# ------------------------------------------------------------------------------------------------
# TNT.
# ------------------------------------------------------------------------------------------------


def normalized_factors(stats: Sequence[jax.Array], layout: ModeLayout) -> list[jax.Array]:
    """The same-trace normalisation ``U_i = S_i / (c^{k-1} ∏_{j≠i} d_j)`` of one leaf.

    ``tr S`` is taken as the mean of the ``tr S_i`` (equal in exact arithmetic). Computed in log
    space; a zero trace (no statistics yet, zero gradients) leaves ``U_i = S_i = 0``.
    """
    k = len(layout.modes)
    dtype = stats[0].dtype
    t = sum(trace_of(s, f) for s, f in zip(stats, layout.full, strict=True)) / k
    safe_t = jnp.where(t > 0, t, jnp.ones((), dtype))
    log_n = math.log(math.prod(layout.modes))
    log_c = (jnp.log(safe_t) - log_n) / k
    out = []
    for s, d in zip(stats, layout.modes, strict=True):
        log_scale = math.log(d) - log_n - (k - 1) * log_c
        out.append(s * jnp.exp(log_scale).astype(dtype))
    return out


def mode_dampings(
    factors: Sequence[jax.Array], layout: ModeLayout, damping: jax.Array, mode: str
) -> list[jax.Array]:
    """``ε_i`` per mode for the damping rule ``mode`` (see :func:`scale_by_tnt`)."""
    k = len(layout.modes)
    out = []
    for u, d, f in zip(factors, layout.modes, layout.full, strict=True):
        if mode == "constant":
            e = damping
        elif mode == "root":
            e = jnp.power(damping, 1.0 / k)
        elif mode == "max_eigenvalue":
            lam = jnp.max(u) if not f else linalg.safe_eigh(u)[0][-1]
            e = damping * lam
        elif mode == "mean_eigenvalue":
            e = damping * trace_of(u, f) / d
        else:  # "trace"
            e = damping * trace_of(u, f)
        out.append(jnp.asarray(e, u.dtype))
    return out


def tnt_inverses(
    stats: Sequence[jax.Array], layout: ModeLayout, damping: jax.Array, mode: str
) -> tuple[jax.Array, ...]:
    """``P_i = (U_i + ε_i I)^{-1}`` of one leaf (Cholesky; ``1 / (u_i + ε_i)`` when diagonal)."""
    us = normalized_factors(stats, layout)
    eps = mode_dampings(us, layout, damping, mode)
    out = []
    for u, e, f in zip(us, eps, layout.full, strict=True):
        out.append(linalg.damped_cholesky_inverse(u, e) if f else 1.0 / (u + e))
    return tuple(out)


class ScaleByTNTState(NamedTuple):
    """State of :func:`scale_by_tnt`.

    Attributes:
      count: number of steps taken (int32); a skipped step (see ``on_nonfinite``) does not
        count.
      nonfinite_count: number of steps skipped because of non-finite values (int32).
      stats_count: number of statistics updates folded into the factors (int32), warm-start
        batches included.
      factors: the tree of the parameters with, at each leaf, the tuple of per-mode statistics
        ``S_i`` (``d_i × d_i``, or the diagonal ``(d_i,)`` above ``max_dim``).
      inverses: the same tree of ``P_i = (U_i + ε_i I)^{-1}`` from the last refresh.
      momentum: the tree of momentum buffers ``m`` (float32, or float64 with float64
        parameters), or ``()`` when ``momentum == 0``.
    """

    count: jax.Array
    nonfinite_count: jax.Array
    stats_count: jax.Array
    factors: Any
    inverses: Any
    momentum: Any


def _sampled_fix_line() -> str:
    return (
        "Compute it from labels sampled from the model in the same forward pass, e.g.\n"
        "    loss, grads, sampled = kfqn_jax.value_and_sampled_grad(apply_fn, params, x,\n"
        "        targets=y, loss='softmax_cross_entropy', rng=rng)\n"
        "    updates, opt_state = tx.update(grads, opt_state, params, sampled_grads=sampled)\n"
        "(Flax: kfqn_jax.flax.value_grads_and_stats(..., sampled='grads').sampled_grads), or "
        "use fisher='empirical'."
    )


def scale_by_tnt(
    damping: optax.ScalarOrSchedule = 0.1,
    *,
    ema_decay: jax.typing.ArrayLike = 0.9,
    fisher: str = "true",
    stats_every: int = 1,
    inverse_every: int = 20,
    damping_mode: str = "constant",
    momentum: float = 0.9,
    reshape: str | Callable[[tuple[Any, ...], tuple[int, ...]], Sequence[int]] = (
        "filter_flattening"
    ),
    max_dim: int | None = 4096,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions every parameter with TNT; no learning rate (see :func:`tnt`).

    With ``Ḡ`` the sampled-label gradient of the batch-mean loss (``fisher="true"``) or the
    gradient itself (``"empirical"``), per leaf and mode ``i`` (see the module docstring):

    .. math::

        S_i \leftarrow (1 - w) S_i + w\, Ḡ_{(i)} Ḡ_{(i)}^\top \ \text{every } T_1 \text{ steps},
        \qquad P_i = (U_i + ε_i I)^{-1}\ \text{every } T_2 \text{ steps},\\
        m \leftarrow μ m + g, \qquad Δ = m \times_1 P_1 \times_2 \dots \times_k P_k,

    where ``T_1`` = ``stats_every``, ``T_2`` = ``inverse_every``, ``μ`` = ``momentum``,
    ``w = max(1 − β, 1/(n+1))`` with ``β`` = ``ema_decay``, ``U_i`` is the same-trace
    normalisation of ``S_i`` and ``ε_i`` comes from ``damping`` by ``damping_mode``. While the
    step count is below ``T_2`` the inverses are refreshed at every statistics update (the
    authors' faster early schedule); at step 0 always.

    Args:
      damping: ``ε`` (scalar or schedule of the step count). Scale: ``Ḡ`` is the gradient of
        the batch *mean*, so ``U`` estimates ``F / batch`` and ``ε`` is relative to that.
      ema_decay: ``β``; early updates are exact running means (no bias towards zero).
      fisher: ``"true"`` (default): statistics from the ``sampled_grads`` extra argument;
        ``"empirical"``: from the incoming gradient (the authors' ``EF`` ablation).
      stats_every: ``T_1`` (static int).
      inverse_every: ``T_2`` (static int).
      damping_mode: ``ε_i`` per mode. ``"constant"`` (default, the authors' code): ``ε`` on
        every mode, equal to π-adjusted damping of the whole Kronecker product with total
        ``ε^k``. ``"root"`` (the authors' ``noPerDimDamping``): ``ε^{1/k}``, π-adjusted with
        total ``ε``. ``"max_eigenvalue"``: ``ε λ_max(U_i)``. ``"mean_eigenvalue"``:
        ``ε tr(U_i) / d_i`` (``= ε c``, the same for every mode). ``"trace"``: ``ε tr(U_i)``.
        The paper's own wording could not be checked; the default follows the code.
      momentum: ``μ`` of the heavy-ball momentum ``m ← μ m + g`` on the training gradient
        (static; 0 disables it and its buffer).
      reshape: how leaves become modes: ``"filter_flattening"`` (default), ``"none"`` or a
        callable; see :func:`mode_sizes`. Size-1 axes are dropped.
      max_dim: modes larger than this keep only a diagonal ``S_i`` (``U_i`` and ``P_i``
        diagonal too; the normalisation uses the same traces). ``None``: no cap. Static.
      ON_NONFINITE

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``sampled_grads`` (a
      pytree like the gradients, or a zero-argument function returning one, called only on
      statistics steps: see ``value_and_sampled_grad(..., lazy=True)``) unless
      ``fisher="empirical"``. With ``warm_start=True`` it folds the batch into the statistics
      as an arithmetic mean, returns zero updates and leaves ``count`` unchanged (the authors'
      warm start: one pass over the training set at the initial parameters).
    """
    base.check_choice("tnt", "fisher", fisher, ("true", "empirical"))
    base.check_choice("tnt", "damping_mode", damping_mode, DAMPING_MODES)
    base.check_positive_int("tnt", "stats_every", stats_every)
    base.check_positive_int("tnt", "inverse_every", inverse_every)
    check_common("tnt", ema_decay, momentum, max_dim, reshape)
    base.check_damping("tnt", damping)
    safety.check_on_nonfinite("tnt", on_nonfinite)
    # on_nonfinite="skip" is fused into the step (as in kfac.py): the state updates below are
    # gated by `ok` inside the operations that make them, instead of a select over the whole
    # state afterwards, a memory pass that cost about 16% of a TNT step on CPU.
    fused = on_nonfinite == "skip"

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        layouts = layouts_of(params, reshape, max_dim)
        dtypes = [base.as_float(p.dtype) for p in leaves]
        factors = [init_factors(lo, dt, "zeros") for lo, dt in zip(layouts, dtypes, strict=True)]
        inverses = [init_factors(lo, dt, "eye") for lo, dt in zip(layouts, dtypes, strict=True)]
        mom = ()
        if momentum > 0:
            mom = treedef.unflatten(
                [jnp.zeros(p.shape, dt) for p, dt in zip(leaves, dtypes, strict=True)]
            )
        return ScaleByTNTState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            stats_count=jnp.zeros([], jnp.int32),
            factors=treedef.unflatten(factors),
            inverses=treedef.unflatten(inverses),
            momentum=mom,
        )

    def update_fn(updates, state, params=None, *, sampled_grads=None, warm_start=False, **extra):
        del params, extra
        if fisher == "true" and sampled_grads is None:
            raise base.missing_extra_arg("tnt", base.SAMPLED_GRADS, _sampled_fix_line())
        leaves, treedef = jax.tree.flatten(updates)
        layouts = layouts_of(updates, reshape, max_dim)
        factors = flatten_like(treedef, state.factors, "state.factors", "tnt")
        inverses = flatten_like(treedef, state.inverses, "state.inverses", "tnt")
        count = state.count

        def source():
            if fisher == "empirical":
                return leaves
            tree = sampled_grads() if callable(sampled_grads) else sampled_grads
            return base.check_tree_like("tnt", base.SAMPLED_GRADS, tree, updates, "gradients")

        grads_ok = linalg.is_finite(leaves) if fused else jnp.asarray(True)

        def new_stats(operand):
            old, n = operand
            src = source()
            ok = grads_ok
            pairs = []
            for g, lo, fac in zip(src, layouts, old, strict=True):
                dt = fac[0].dtype
                w = ema_weight(ema_decay, n, dt, warm_start)
                cs, ds = mode_contractions(g.astype(dt), lo, with_diagonals=True)
                pairs.append((w, cs))
                if fused:
                    for s_, dg in zip(fac, ds, strict=True):
                        ok &= safety.ema_finite(w, s_, dg)
            out = []
            for (w, cs), fac in zip(pairs, old, strict=True):
                out.append(
                    tuple(
                        jnp.where(ok, (1 - w) * s_ + w * c, s_)
                        for s_, c in zip(fac, cs, strict=True)
                    )
                )
            return out, jnp.where(ok, n + 1, n), ok

        operand = (factors, state.stats_count)
        if warm_start:
            factors, n_stats, ok = new_stats(operand)
            zeros = jax.tree.map(jnp.zeros_like, updates)
            return zeros, state._replace(
                factors=treedef.unflatten([tuple(f) for f in factors]),
                stats_count=n_stats,
                nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
            )
        do_stats = (count % stats_every) == 0
        if stats_every == 1:
            factors, n_stats, ok = new_stats(operand)
        else:
            factors, n_stats, ok = lax.cond(
                do_stats, new_stats, lambda op: (*op, grads_ok), operand
            )

        damp = damping(count) if callable(damping) else damping
        do_inv = ((count % inverse_every == 0) | ((count < inverse_every) & do_stats)) & ok
        new_inv = []
        # One cond per leaf carrying only that leaf's matrices: a single cond holding every
        # LAPACK call was seen to deadlock XLA's CPU runtime (see kfac.py).
        for lo, fac, inv in zip(layouts, factors, inverses, strict=True):
            dt = fac[0].dtype

            def refresh(ops, lo=lo, dt=dt):
                fac, inv = ops
                new = tnt_inverses(fac, lo, jnp.asarray(damp, dt), damping_mode)
                return linalg.where_finite(new, inv)

            if inverse_every == 1 and not fused:
                new_inv.append(refresh((fac, inv)))
            else:
                new_inv.append(lax.cond(do_inv, refresh, lambda ops: ops[1], (fac, tuple(inv))))

        mom_leaves = jax.tree.leaves(state.momentum) if momentum > 0 else None
        out, new_mom = [], []
        for i, (g, lo, inv) in enumerate(zip(leaves, layouts, new_inv, strict=True)):
            x = g.astype(inv[0].dtype)
            if momentum > 0:
                x = momentum * mom_leaves[i] + x
                new_mom.append(jnp.where(ok, x, mom_leaves[i]))
            out.append(precondition(x, inv, lo).astype(g.dtype))
        nonfinite = state.nonfinite_count
        new_count = optax.safe_increment(count)
        if fused:
            out, new_count, nonfinite = safety.finish_skip(ok, out, count, nonfinite)
        new_state = ScaleByTNTState(
            count=new_count,
            nonfinite_count=nonfinite,
            stats_count=n_stats,
            factors=treedef.unflatten([tuple(f) for f in factors]),
            inverses=treedef.unflatten(new_inv),
            momentum=treedef.unflatten(new_mom) if momentum > 0 else (),
        )
        return treedef.unflatten(out), new_state

    guarded = safety.guard_nonfinite(
        update_fn, on_nonfinite, "tnt", (base.SAMPLED_GRADS,), init_fn=init_fn, fused=True
    )
    return optax.GradientTransformationExtraArgs(init_fn, guarded)


scale_by_tnt.__doc__ = scale_by_tnt.__doc__.replace("ON_NONFINITE", safety.ON_NONFINITE_DOC)


def tnt(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 0.1,
    *,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    ema_decay: jax.typing.ArrayLike = 0.9,
    fisher: str = "true",
    stats_every: int = 1,
    inverse_every: int = 20,
    damping_mode: str = "constant",
    momentum: float = 0.9,
    reshape: str | Callable[[tuple[Any, ...], tuple[int, ...]], Sequence[int]] = (
        "filter_flattening"
    ),
    max_dim: int | None = 4096,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Tensor Normal Training with a learning rate and decoupled weight decay.

    ``chain(scale_by_tnt, add_decayed_weights, scale_by_learning_rate)``:

    .. math::

        θ \leftarrow θ - α\,(Δ + τ θ) = (1 - α τ)\, θ - α Δ,

    with ``α`` = ``learning_rate``, ``τ`` = ``weight_decay`` (decoupled: not preconditioned,
    as in the authors' code) and ``Δ`` the TNT direction of :func:`scale_by_tnt`, whose
    keyword arguments are accepted here. ``stats_every``, ``inverse_every``, ``momentum``,
    ``max_dim``, ``reshape``, ``fisher`` and ``damping_mode`` fix the state's structure or the
    Python control flow: list the numeric ones in ``static_args`` of
    ``optax.inject_hyperparams``. The authors' settings: autoencoders ``lr 1e-4, ε 0.1,
    T₁ 1, T₂ 20``; CNNs ``lr 1e-4, ε 0.01, τ 10, T₁ 10, T₂ 100``. ``on_nonfinite``
    (``"skip"``, ``"raise"`` or ``"ignore"``) says what a step with NaN or infinite gradients,
    statistics or results does; by default it is skipped (zero direction; the decoupled weight
    decay still applies) and counted in ``nonfinite_count`` of the state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 1])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> apply_fn = lambda p, x: model.apply({"params": p}, x)
      >>> tx = kfqn_jax.tnt(learning_rate=1e-3, damping=0.1)
      >>> opt_state = tx.init(params)
      >>> loss, grads, sampled = kfqn_jax.value_and_sampled_grad(
      ...     apply_fn, params, x, targets=y, loss="softmax_cross_entropy",
      ...     rng=jax.random.key(1))
      >>> updates, opt_state = tx.update(grads, opt_state, params, sampled_grads=sampled)
      >>> params = optax.apply_updates(params, updates)

    References:
      Ren & Goldfarb, `Tensor Normal Training for Deep Learning Models
      <https://arxiv.org/abs/2106.02925>`_, NeurIPS 2021.
    """
    inner = scale_by_tnt(
        damping,
        ema_decay=ema_decay,
        fisher=fisher,
        stats_every=stats_every,
        inverse_every=inverse_every,
        damping_mode=damping_mode,
        momentum=momentum,
        reshape=reshape,
        max_dim=max_dim,
        on_nonfinite=on_nonfinite,
    )
    parts = [inner]
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return with_warm_start(optax.chain(*parts), inner, 0)
