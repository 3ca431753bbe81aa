"""Generalized Gauss-Newton (GGN) vector products, whole and block-diagonal.

For a model ``z = f(θ)`` (all outputs of the curvature batch) and a loss ``L(z)`` whose Hessian
in the outputs ``H = ∇²_z L`` is positive semi-definite, the GGN is

.. math::

    G = J^T H J, \\qquad J = \\partial f / \\partial θ,

and ``G v`` costs one forward-mode product ``J v`` (JVP), one output-space product ``H (J v)``
and one reverse-mode product ``J^T u`` (VJP), never forming ``J`` (Schraudolph 2002; Martens
2010). The model is linearized once per optimizer step (:func:`jax.linearize`), so every product
reuses the stored forward pass; the VJP is the transpose of the linearized JVP.

Block-diagonal products (Zhang et al. 2017) keep only the curvature between parameters of the
same block ``b``: ``(G_bd v)_b = P_b J^T H J P_b v_b`` with ``P_b`` the restriction to block
``b``. Each block is linearized on its own (:func:`linearize_block_ggn`), so its tangents only
flow through the part of the model downstream of its parameters; all blocks are traced into one
program, so the number of blocks is static and there is no Python loop over layers at run time.

References:
  Schraudolph, `Fast curvature matrix-vector products for second-order gradient descent
  <https://doi.org/10.1162/08997660260028683>`_, Neural Computation 2002.
  Martens, `Deep learning via Hessian-free optimization
  <https://www.cs.toronto.edu/~jmartens/docs/Deep_HessianFree.pdf>`_, ICML 2010.
  Zhang, Xiong, Bradbury & Socher, `Block-diagonal Hessian-free optimization for training
  neural networks <https://arxiv.org/abs/1712.07296>`_, 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfqn_jax._src import base
from kfqn_jax._src import losses as losses_lib

PyTree = Any

__all__ = [
    "BlockGGN",
    "BlockMasks",
    "block_masks",
    "linearize_block_ggn",
    "linearize_ggn",
    "output_hvp",
]


def output_hvp(output_loss: Any, outputs: PyTree) -> Callable[[PyTree], PyTree]:
    """The product with the loss Hessian in the outputs, ``u ↦ H u``, at ``outputs``.

    Args:
      output_loss: a :class:`kfqn_jax.losses.Loss` (or its name), whose training loss is the
        mean over the leading axes of ``outputs``; then ``H u = Loss.hvp(z, u) / N`` with ``N``
        the number of leading elements (examples times positions). Or a function
        ``outputs -> scalar`` (targets closed over) with a positive semi-definite Hessian in
        ``outputs``; then ``H u`` is forward-over-reverse differentiation of it.
      outputs: the model outputs on the curvature batch.
    """
    if isinstance(output_loss, (losses_lib.Loss, str)):
        loss = losses_lib.as_loss(output_loss)
        if not isinstance(outputs, jax.Array) and not hasattr(outputs, "shape"):
            raise TypeError(
                "output_loss is a kfqn_jax.losses.Loss, so model_fn must return one array of "
                f"outputs (event axis last), got {type(outputs).__name__}. For several outputs "
                "pass output_loss as a function outputs -> scalar."
            )
        n = max(1, outputs.size // max(1, outputs.shape[-1]))
        return lambda u: loss.hvp(outputs, u) / n
    if not callable(output_loss):
        raise TypeError(
            "output_loss must be a kfqn_jax.losses.Loss, a loss name or a function "
            f"outputs -> scalar loss, got {type(output_loss).__name__}."
        )
    _, lin = jax.linearize(jax.grad(output_loss), outputs)
    return lin


def linearize_ggn(
    model_fn: Callable[[PyTree], PyTree], output_loss: Any, params: PyTree
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """Outputs ``f(θ)`` and the GGN-vector product ``v ↦ J^T H J v`` at ``θ = params``.

    Args:
      model_fn: ``params -> outputs`` on the curvature batch (the batch closed over).
      output_loss: see :func:`output_hvp`.
      params: the point ``θ``; tangents ``v`` have its structure and dtypes.

    Returns:
      ``(outputs, gvp)``; ``gvp`` is linear.
    """
    outputs, jvp = jax.linearize(model_fn, params)
    vjp = jax.linear_transpose(jvp, params)
    hvp = output_hvp(output_loss, outputs)

    def gvp(v):
        (out,) = vjp(hvp(jvp(v)))
        return out

    return outputs, gvp


# ----------------------------------------------------------------------------------------------
# Block partitions and block-diagonal products.


class BlockMasks:
    """A static partition of a parameter tree into ``K`` blocks.

    Vectors of the block system are ordinary parameter-shaped trees; block ``b`` of a vector
    is its restriction to the elements labelled ``b``. Every leaf lies either wholly in one
    block (``index[j]`` is that block's number) or is split between blocks element-wise
    (``index[j]`` is an int numpy array of the leaf's shape). Per-block scalars (CG step sizes,
    inner products) map to and from trees with :meth:`expand` and :meth:`inner`.

    Attributes:
      labels: the block labels, in block order.
      index: per leaf (in leaf order), an ``int`` block number or an int numpy array of the
        leaf's shape.
      treedef: the parameter tree structure.
    """

    def __init__(self, labels: Sequence[Hashable], index: Sequence[Any], treedef: Any):
        self.labels = tuple(labels)
        self.index = list(index)
        self.treedef = treedef

    @property
    def num_blocks(self) -> int:
        return len(self.labels)

    def leaves_of(self, b: int) -> list[int]:
        """Indices of the leaves holding elements of block ``b``."""
        return [
            j
            for j, idx in enumerate(self.index)
            if (idx == b if isinstance(idx, int) else bool(np.any(idx == b)))
        ]

    def mask(self, j: int, b: int, dtype: Any) -> jax.Array | None:
        """The 0/1 mask of block ``b`` on leaf ``j``, or ``None`` if the leaf is whole."""
        idx = self.index[j]
        if isinstance(idx, int):
            return None
        return jnp.asarray(idx == b, dtype)

    def inner(self, u: PyTree, v: PyTree) -> jax.Array:
        """Per-block inner products ``(u_b^T v_b)_b``, shape ``(K,)``."""
        k = self.num_blocks
        whole: list[list[jax.Array]] = [[] for _ in range(k)]
        split = []
        for idx, a, c in zip(self.index, jax.tree.leaves(u), jax.tree.leaves(v), strict=True):
            if isinstance(idx, int):
                whole[idx].append(jnp.vdot(a, c))
            else:
                split.append(jax.ops.segment_sum((a * c).reshape(-1), idx.reshape(-1), k))
        dtype = jnp.result_type(*jax.tree.leaves(u))
        out = jnp.stack([sum(p[1:], p[0]) if p else jnp.zeros([], dtype) for p in whole])
        return sum(split, out)

    def expand(self, s: jax.Array, like: PyTree) -> PyTree:
        """A tree broadcastable against ``like``, ``s[b]`` on the elements of block ``b``."""
        leaves = jax.tree.leaves(like)
        out = []
        for idx, leaf in zip(self.index, leaves, strict=True):
            if isinstance(idx, int):
                out.append(s[idx])
            else:
                out.append(s[jnp.asarray(idx)].reshape(np.shape(leaf)))
        return jax.tree_util.tree_unflatten(self.treedef, out)


def _layer_label(path: tuple[Any, ...]) -> Hashable:
    return tuple(path[:-1]) if len(path) > 1 else tuple(path)


def block_masks(params: PyTree, blocks: Any = "layer") -> BlockMasks:
    """Builds the partition ``blocks`` of ``params`` (shapes only; static).

    Args:
      params: the parameter tree (arrays or shape-dtype structs).
      blocks: ``"all"``: one block (full GGN, plain Hessian-free); ``"layer"``: one block per
        parent module, i.e. leaves that share their path up to the last key (a Dense layer's
        kernel and bias); ``"leaf"``: one block per leaf; or a function
        ``(path, shape) -> label`` where ``path`` is the leaf's tuple of keys and ``label`` is
        either a hashable (the whole leaf in that block) or a numpy array of the leaf's shape
        holding one hashable label per element (a leaf split between blocks, e.g. the four
        gates of a fused LSTM kernel). Leaves with equal labels share a block.

    Returns:
      A :class:`BlockMasks`; blocks are ordered by first appearance in leaf order.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = base.tree_paths(params)
    if blocks == "all":
        fn = lambda path, shape: 0  # noqa: E731
    elif blocks == "layer":
        fn = lambda path, shape: _layer_label(path)  # noqa: E731
    elif blocks == "leaf":
        fn = lambda path, shape: tuple(path)  # noqa: E731
    elif callable(blocks):
        fn = blocks
    else:
        raise ValueError(
            f"blocks must be 'all', 'layer', 'leaf' or a function (path, shape) -> label, got "
            f"{blocks!r}."
        )
    raw = []
    order: dict[Hashable, int] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        shape = tuple(np.shape(leaf))
        label = fn(path, shape)
        if isinstance(label, np.ndarray):
            if label.shape != shape:
                raise ValueError(
                    f"blocks({path!r}) returned a label array of shape {label.shape}; an "
                    f"element-wise partition must have the leaf's shape {shape}."
                )
            for lab in label.reshape(-1).tolist():
                order.setdefault(lab, len(order))
        else:
            try:
                hash(label)
            except TypeError as e:
                raise ValueError(
                    f"blocks({path!r}) returned an unhashable label {label!r}; return a "
                    "hashable (str, int, tuple) or a numpy array of them."
                ) from e
            order.setdefault(label, len(order))
        raw.append(label)
    index: list[Any] = []
    for label in raw:
        if isinstance(label, np.ndarray):
            idx = np.vectorize(order.__getitem__, otypes=[np.int32])(label)
            uniq = np.unique(idx)
            index.append(int(uniq[0]) if uniq.size == 1 else idx)
        else:
            index.append(order[label])
    return BlockMasks(list(order), index, treedef)


class BlockGGN(NamedTuple):
    """The block-diagonal GGN at a point (see :func:`linearize_block_ggn`).

    Attributes:
      outputs: the model outputs ``f(θ)``.
      matvec: ``v ↦ Σ_b P_b J^T H J P_b v`` on parameter-shaped trees.
      block_jvps: ``v ↦ [J P_1 v, ..., J P_K v]``, the output-space tangents of each block's
        part of ``v``.
      hvp: ``u ↦ H u`` in the outputs.
    """

    outputs: PyTree
    matvec: Callable[[PyTree], PyTree]
    block_jvps: Callable[[PyTree], list]
    hvp: Callable[[PyTree], PyTree]


def linearize_block_ggn(
    model_fn: Callable[[PyTree], PyTree],
    output_loss: Any,
    params: PyTree,
    blocks: BlockMasks,
) -> BlockGGN:
    """The block-diagonal GGN product ``v ↦ Σ_b P_b J^T H J P_b v`` at ``θ = params``.

    Each block gets its own linearization: the model is differentiated with respect to that
    block's leaves only, the others held constant, so the tangent computation of block ``b``
    starts where its parameters enter the model. For a chain of layers, block ``b``'s product
    costs a forward and a backward pass through the layers from ``b`` to the output only (about
    ``K/2`` plain GGN products for ``K`` equal-cost layer blocks, instead of ``K`` for products
    with masked tangents through the whole model). All blocks are traced into one program; at
    run time there is no loop over blocks. With one block this is :func:`linearize_ggn`.

    Args:
      model_fn: ``params -> outputs`` on the curvature batch.
      output_loss: see :func:`output_hvp`.
      params: the point ``θ``.
      blocks: the partition (:func:`block_masks`).

    Returns:
      A :class:`BlockGGN`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    outputs = None
    per_block = []
    for b in range(blocks.num_blocks):
        ids = blocks.leaves_of(b)

        def f_b(sub, ids=ids):
            full = list(leaves)
            for j, s in zip(ids, sub, strict=True):
                full[j] = s
            return model_fn(jax.tree_util.tree_unflatten(treedef, full))

        primal = [leaves[j] for j in ids]
        out_b, jvp_b = jax.linearize(f_b, primal)
        if outputs is None:
            outputs = out_b
        per_block.append((ids, jvp_b, jax.linear_transpose(jvp_b, primal)))
    hvp = output_hvp(output_loss, outputs)

    def tangents(vl, b, ids):
        masks = [blocks.mask(j, b, vl[j].dtype) for j in ids]
        return masks, [vl[j] if m is None else m * vl[j] for j, m in zip(ids, masks, strict=True)]

    def block_jvps(v):
        vl = jax.tree.leaves(v)
        return [jvp_b(tangents(vl, b, ids)[1]) for b, (ids, jvp_b, _) in enumerate(per_block)]

    def matvec(v):
        vl = jax.tree.leaves(v)
        out: list[Any] = [None] * len(vl)
        for b, (ids, jvp_b, vjp_b) in enumerate(per_block):
            masks, tangent = tangents(vl, b, ids)
            (cot,) = vjp_b(hvp(jvp_b(tangent)))
            for j, m, c in zip(ids, masks, cot, strict=True):
                c = c if m is None else m * c
                out[j] = c if out[j] is None else out[j] + c
        return jax.tree_util.tree_unflatten(treedef, out)

    return BlockGGN(outputs, matvec, block_jvps, hvp)
