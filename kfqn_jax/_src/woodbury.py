r"""The Sherman-Morrison-Woodbury kernel of SMW-NG and SMW-GN: ``(J^T J / m + λI)^{-1} g``
from per-layer factors of ``J``, without forming ``J``.

With a curvature subsample of ``m`` examples, the damped curvature is ``λI`` plus a matrix of
rank at most the number of rows of ``J`` (``m`` per-example gradients, or ``m·s`` per-example,
per-output Jacobian rows):

.. math::

    C = \frac{1}{m} J^T J, \qquad
    (C + λ I)^{-1} g = \frac{1}{λ} \Big[ g - \frac{1}{m} J^T \big(\tfrac{1}{m} K + λ I\big)^{-1}
    J g \Big], \qquad K = J J^T,

so only a Cholesky solve of the size of ``K`` is needed. For a Dense or Conv layer ``l`` the
row ``r`` of ``J`` restricted to the layer is the matrix ``u_r = Σ_t ã_{i(r) t} ⊗ γ_{r t}``
(``ã``: homogeneous layer input, ``γ``: per-row cotangent of the layer output, ``t``:
positions). Hence

.. math::

    K_{rr'} = \sum_l \sum_{t,t'} (ã_{i t}^T ã_{i' t'}) (γ_{r t}^T γ_{r' t'}),

which for an MLP (``T = 1``) is ``Σ_l (Ã_l Ã_l^T) ∘ (Γ_l Γ_l^T)``, and
``(J v)_r = Σ_l Σ_t ã_{i t}^T V_l γ_{r t}``, ``J^T w = Σ_l Σ_{r,t} w_r ã_{i t} γ_{r t}^T``.

Convolutions (``T > 1``) are handled exactly, by one of two equivalent contractions chosen by
``gram_mode``: ``"positions"`` forms the ``(mT) × (mT)`` Grams of inputs and cotangents and sums
their Hadamard product over position pairs (cost ``~ (mT)^2 (d_in + d_out)``, memory
``(mT)^2``); ``"per_example"`` forms the per-example layer gradients ``u_r``
(``m × d_in × d_out``) and their Gram (cost ``~ m T d_in d_out + m^2 d_in d_out``). ``"auto"``
(default) picks the cheaper per layer from the static shapes.

Rows are ordered ``r = (k, i)``: direction ``k`` (one for SMW-NG, ``s`` output directions for
SMW-GN) major, example ``i`` minor. The square roots ``L_i`` of the output-space loss Hessians
(``L_i L_i^T = ∇²_z ℓ_i``) that give SMW-GN its cotangents are :func:`hessian_sqrt_columns` and
:func:`hessian_sqrt_sketch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kfqn_jax._src import linalg
from kfqn_jax._src import losses as losses_lib

GRAM_MODES = ("auto", "positions", "per_example")


@dataclasses.dataclass(frozen=True)
class Block:
    """One layer's factors of ``J``: inputs ``a`` ``(m, T, d_a)``, cotangents ``g``
    ``(s, m, T, d_o)`` (rows ``r = (k, i)``), and the per-example gradients ``u``
    ``(s, m, d_a, d_o)`` when the per-example contraction is used."""

    a: jax.Array
    g: jax.Array
    u: jax.Array | None


def use_per_example(a_shape, g_shape, mode: str) -> bool:
    """Whether a layer contracts through its per-example gradients (``gram_mode``)."""
    if mode != "auto":
        return mode == "per_example"
    m, t, da = a_shape
    s, _, _, do = g_shape
    r = s * m
    cost_positions = (m * t) ** 2 * da + (r * t) ** 2 * do + r**2 * t**2
    cost_per_example = r * t * da * do + r**2 * da * do
    return cost_per_example < cost_positions


def make_block(a: jax.Array, g: jax.Array, mode: str) -> Block:
    """The :class:`Block` of inputs ``a`` ``(m, T, d_a)`` and cotangents ``g``
    ``(s, m, T, d_o)``, with the contraction ``mode`` of ``gram_mode``."""
    u = None
    if use_per_example(a.shape, g.shape, mode):
        u = jnp.einsum("itd,kite->kide", a, g)
    return Block(a, g, u)


def gram(blocks: Sequence[Block], rows: int, dtype: Any) -> jax.Array:
    """``K = J J^T`` of shape ``(rows, rows)``, rows ordered ``(k, i)``."""
    k_mat = jnp.zeros((rows, rows), dtype)
    for b in blocks:
        if b.u is not None:
            u2 = b.u.reshape(rows, -1)
            k_mat = k_mat + u2 @ u2.T
            continue
        s, m, t, _ = b.g.shape
        if t == 1:
            aa = b.a[:, 0] @ b.a[:, 0].T
            g2 = b.g.reshape(rows, -1)
            k_mat = k_mat + jnp.tile(aa, (s, s)) * (g2 @ g2.T)
        else:
            aa = jnp.einsum("itd,jud->itju", b.a, b.a)
            gg = jnp.einsum("kitd,ljud->kitlju", b.g, b.g)
            k_mat = k_mat + jnp.einsum("itju,kitlju->kilj", aa, gg).reshape(rows, rows)
    return k_mat


def jvp_rows(blocks: Sequence[Block], mats: Sequence[jax.Array]) -> jax.Array:
    """``J v`` (``(rows,)``) for ``v`` given per layer as homogeneous ``(d_a, d_o)`` matrices."""
    out = 0.0
    for b, v in zip(blocks, mats, strict=True):
        if b.u is not None:
            out = out + jnp.einsum("kide,de->ki", b.u, v).reshape(-1)
        else:
            av = jnp.einsum("itd,de->ite", b.a, v)
            out = out + jnp.einsum("ite,kite->ki", av, b.g).reshape(-1)
    return out


def vjp_rows(blocks: Sequence[Block], w: jax.Array) -> list[jax.Array]:
    """``J^T w`` per layer as homogeneous ``(d_a, d_o)`` matrices."""
    out = []
    for b in blocks:
        s, m = b.g.shape[:2]
        w2 = w.reshape(s, m)
        if b.u is not None:
            out.append(jnp.einsum("ki,kide->de", w2, b.u))
        else:
            h = jnp.einsum("ki,kite->ite", w2, b.g)
            out.append(jnp.einsum("itd,ite->de", b.a, h))
    return out


def smw_direction(
    blocks: Sequence[Block], grads: Sequence[jax.Array], num_examples: int, damping: jax.Array
) -> tuple[list[jax.Array], jax.Array]:
    r"""``(C + λI)^{-1} g`` restricted to the blocks, with ``C = J^T J / m``.

    Returns the per-layer directions and the Gram ``K`` (for diagnostics and the LM model).
    """
    rows = blocks[0].g.shape[0] * blocks[0].g.shape[1]
    dtype = grads[0].dtype
    k_mat = gram(blocks, rows, dtype)
    jg = jvp_rows(blocks, grads)
    v_hat = linalg.damped_cholesky_solve(k_mat / num_examples, jg, damping)
    back = vjp_rows(blocks, v_hat)
    return [(g - b / num_examples) / damping for g, b in zip(grads, back, strict=True)], k_mat


# ---------------------------------------------------------------------------------------------
# Square roots of output-space loss Hessians (SMW-GN).


def hessian_sqrt_columns(loss: losses_lib.Loss, outputs: jax.Array, cols: jax.Array) -> jax.Array:
    """Columns ``cols`` of ``L_i`` with ``L_i L_i^T = ∇²_z ℓ_i``, as ``(len(cols), m, c)``."""
    c = outputs.shape[-1]
    onehot = jax.nn.one_hot(cols, c, dtype=outputs.dtype)  # (s, c)
    if isinstance(loss, losses_lib.SoftmaxCrossEntropy):
        p = jax.nn.softmax(outputs, axis=-1)  # (m, c)
        sq = jnp.sqrt(p[:, cols]).T  # (s, m)
        return sq[:, :, None] * (onehot[:, None, :] - p[None])
    if isinstance(loss, (losses_lib.SigmoidCrossEntropy, losses_lib.SquaredError)):
        diag = loss.hvp(outputs, jnp.ones_like(outputs))  # diagonal Hessians
        sq = jnp.sqrt(jnp.maximum(diag[:, cols], 0.0)).T
        return sq[:, :, None] * onehot[:, None, :]
    sqrt = loss.hessian_sqrt(outputs)  # (m, c, c)
    return jnp.moveaxis(sqrt[:, :, cols], -1, 0)


def hessian_sqrt_sketch(loss: losses_lib.Loss, outputs: jax.Array, signs: jax.Array) -> jax.Array:
    """``L_i r_{k,i}`` for sign vectors ``signs`` of shape ``(s, m, c)``, as ``(s, m, c)``.

    With independent Rademacher ``r``, ``E[(L_i r)(L_i r)^T] = L_i L_i^T = ∇²_z ℓ_i``: each
    probe mixes every output, where a column of ``L_i`` covers one.
    """
    if isinstance(loss, losses_lib.SoftmaxCrossEntropy):
        # Column k of L_i is sqrt(p_k) (e_k - p), so L_i r = sqrt(p) * r - p (sqrt(p) . r).
        p = jax.nn.softmax(outputs, axis=-1)
        q = jnp.sqrt(p)[None] * signs
        return q - p[None] * jnp.sum(q, axis=-1, keepdims=True)
    if isinstance(loss, (losses_lib.SigmoidCrossEntropy, losses_lib.SquaredError)):
        diag = loss.hvp(outputs, jnp.ones_like(outputs))
        return jnp.sqrt(jnp.maximum(diag, 0.0))[None] * signs
    sqrt = loss.hessian_sqrt(outputs)  # (m, c, c)
    return jnp.einsum("mcd,smd->smc", sqrt, signs)
