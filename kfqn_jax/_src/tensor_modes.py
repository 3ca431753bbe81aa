r"""Tensor modes: the machinery shared by TNT and Shampoo.

Both methods split every parameter tensor, after a static reshape, into *modes*
``d_1 × … × d_k`` and keep per mode a ``d_i × d_i`` statistic of the gradient ``G``,

.. math::

    C_i = G_{(i)} G_{(i)}^\top, \qquad S_i \leftarrow (1 - w) S_i + w C_i,
    \qquad w = \max(1 - β, 1 / (n + 1)),

where ``G_(i)`` is the mode-``i`` unfolding (``d_i × N/d_i``, ``N = ∏_j d_j``). Now and then a
*root* ``R_i`` is computed from each ``S_i`` (TNT: a damped inverse; Shampoo: an inverse
``p``-th root) and the direction is the mode-wise product

.. math::

    Δ = m \times_1 R_1 \times_2 \dots \times_k R_k, \qquad
    \operatorname{vec}(Δ) = \Bigl(\bigotimes_i R_i^\top\Bigr) \operatorname{vec}(m),

with ``vec`` the row-major (C-order) vectorisation (the ``R_i`` are symmetric). Modes larger
than ``max_dim`` keep only the diagonal of ``S_i`` (and of ``R_i``).

Each method describes one parameter leaf as a *mode block* (a small static object with
``init`` / ``statistics`` / ``fold_ok`` / ``accumulate`` / ``refresh`` / ``precondition``,
the per-block shape a shared curvature-block driver is planned to take); the loops over the leaves that every
step runs (statistics on their schedule, refreshes one ``lax.cond`` per leaf, momentum and the
mode products) are the functions at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kfqn_jax._src import base, linalg, safety

_HIGHEST = lax.Precision.HIGHEST

RESHAPES = ("filter_flattening", "none")
# Contractions of modes at least twice this size are assembled from half-size blocks.
_SYMMETRIC_SPLIT_MIN = 256


# ------------------------------------------------------------------------------------------------
# Layouts: how a leaf becomes modes.
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


# ------------------------------------------------------------------------------------------------
# Contractions and mode products.
# ------------------------------------------------------------------------------------------------


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
    """``tr M`` of a full mode's matrix, or the sum of a diagonal mode's vector."""
    return jnp.trace(mat) if full else jnp.sum(mat)


# ------------------------------------------------------------------------------------------------
# The pieces of a mode block: statistics and their moving average.
# ------------------------------------------------------------------------------------------------


def zero_stats_identity_roots(layout: ModeLayout, dtype: Any) -> BlockInit:
    """A leaf's block before any batch: zero statistics and identity inverses or roots
    (diagonals for modes above ``max_dim``), and the leaf's shape for its momentum."""
    return BlockInit(
        init_factors(layout, dtype, "zeros"), init_factors(layout, dtype, "eye"), layout.shape
    )


class BlockInit(NamedTuple):
    """The initial state of one leaf's block.

    Attributes:
      factors: per mode, the statistic before any batch (zeros).
      roots: per mode, the root before any refresh (identities).
      grad_shape: the shape of the block's gradient (its momentum buffer): the leaf's shape.
    """

    factors: tuple[jax.Array, ...]
    roots: tuple[jax.Array, ...]
    grad_shape: tuple[int, ...]


class Moment(NamedTuple):
    """One mode's statistic of one batch.

    Attributes:
      value: the contraction ``C_i`` (``(d_i, d_i)``, or the ``(d_i,)`` diagonal).
      diagonal: its diagonal (``(d_i,)``), for the finiteness check of the fold.
    """

    value: jax.Array
    diagonal: jax.Array


def mode_moments(g: jax.Array, layout: ModeLayout, dtype: Any) -> tuple[Moment, ...]:
    """The :class:`Moment` ``(C_i, diag C_i)`` of every mode of ``g`` (cast to ``dtype``)."""
    cs, ds = mode_contractions(g.astype(dtype), layout, with_diagonals=True)
    return tuple(Moment(c, dg) for c, dg in zip(cs, ds, strict=True))


def ema_weight(ema_decay: Any, n: jax.Array, dtype: Any, warm_start: bool) -> jax.Array:
    """``max(1 - β, 1 / (n + 1))`` (``1 / (n + 1)`` in a warm start: the arithmetic mean)."""
    run = 1.0 / (n.astype(dtype) + 1.0)
    if warm_start:
        return run
    return jnp.maximum(1.0 - jnp.asarray(ema_decay, dtype), run)


def ema_fold_ok(
    factors: Sequence[jax.Array], moments: Sequence[Moment], w: jax.Array
) -> jax.Array:
    """Whether every new ``(1 - w) S_i + w C_i`` is finite (read from the diagonals)."""
    ok = jnp.asarray(True)
    for s, mo in zip(factors, moments, strict=True):
        ok &= safety.ema_finite(w, s, mo.diagonal)
    return ok


def ema_fold(
    factors: Sequence[jax.Array], moments: Sequence[Moment], w: jax.Array, ok: jax.Array
) -> tuple[jax.Array, ...]:
    """``S_i ← (1 - w) S_i + w C_i`` where ``ok`` (else ``S_i`` unchanged)."""
    return tuple(
        jnp.where(ok, (1 - w) * s + w * mo.value, s) for s, mo in zip(factors, moments, strict=True)
    )


# ------------------------------------------------------------------------------------------------
# Construction-time checks and state plumbing.
# ------------------------------------------------------------------------------------------------


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
    """``tree`` flattened up to the gradients' ``treedef`` (a ``ValueError`` naming ``what``)."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{method}: {what} must have the structure of the gradients ({treedef}); {e}"
        ) from e


def leaf_dtypes(leaves: Sequence[Any]) -> list[Any]:
    """The statistics' dtype of every leaf: float32, or float64 for float64 parameters."""
    return [base.as_float(p.dtype) for p in leaves]


def init_momentum(leaves: Sequence[Any], treedef: Any, dtypes: Sequence[Any], mu: float) -> Any:
    """The tree of zero momentum buffers (in the statistics' dtypes), or ``()`` when ``μ = 0``."""
    if not mu > 0:
        return ()
    return treedef.unflatten([jnp.zeros(p.shape, dt) for p, dt in zip(leaves, dtypes, strict=True)])


# ------------------------------------------------------------------------------------------------
# One step over every leaf's block.
# ------------------------------------------------------------------------------------------------


def every(period: int, due: jax.Array, fn: Callable, skip: Callable, operand: Any) -> Any:
    """``fn(operand)`` on the steps where ``due``, ``skip(operand)`` on the others (one
    ``lax.cond``; a plain call when ``period == 1``)."""
    if period == 1:
        return fn(operand)
    return lax.cond(due, fn, skip, operand)


def refresh_due(count: jax.Array, inverse_every: int, do_stats: jax.Array) -> jax.Array:
    """Every ``T_2`` steps, and at every statistics step while ``count < T_2`` (the TNT
    authors' faster early schedule; at step 0 always)."""
    return (count % inverse_every == 0) | ((count < inverse_every) & do_stats)


def refresh_leaves(
    blocks: Sequence[Any],
    factors: Sequence[tuple],
    roots: Sequence[tuple],
    due: jax.Array,
    damping: Any,
    always: bool,
) -> list[tuple]:
    """Every block's roots ``block.refresh(S, damping)`` where ``due`` (one ``lax.cond`` per
    leaf, or none when ``always``); a non-finite refresh keeps the old roots."""
    out = []
    # One cond per leaf carrying only that leaf's matrices: a single cond holding every
    # LAPACK call was seen to deadlock XLA's CPU runtime (see kfac.py).
    for blk, fac, old in zip(blocks, factors, roots, strict=True):

        def refresh(ops, blk=blk):
            fac, old = ops
            return linalg.where_finite(blk.refresh(fac, damping), old)

        if always:
            out.append(refresh((fac, tuple(old))))
        else:
            out.append(lax.cond(due, refresh, lambda ops: ops[1], (fac, tuple(old))))
    return out


def precondition_leaves(
    blocks: Sequence[Any],
    leaves: Sequence[jax.Array],
    roots: Sequence[tuple],
    momentum: Any,
    mu: float,
    ok: jax.Array | None = None,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per leaf ``m ← μ m + g`` (in the roots' dtype) and ``block.precondition(R, m)``.

    Returns:
      ``(directions, momentum buffers)``: the directions in the roots' dtype; the new buffers
      (kept where not ``ok``, when given), empty when ``μ = 0``.
    """
    mom_leaves = jax.tree.leaves(momentum) if mu > 0 else None
    dirs, new_mom = [], []
    for i, (g, blk, r) in enumerate(zip(leaves, blocks, roots, strict=True)):
        x = g.astype(r[0].dtype)
        if mu > 0:
            x = mu * mom_leaves[i] + x
            new_mom.append(x if ok is None else jnp.where(ok, x, mom_leaves[i]))
        dirs.append(blk.precondition(r, x))
    return dirs, new_mom
