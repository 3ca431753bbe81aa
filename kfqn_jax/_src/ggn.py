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
same block ``b``: ``(G_bd v)_b = P_b J^T H J P_b v_b`` with ``P_b`` the 0/1 mask of block ``b``.
All blocks are computed at once by mapping the product over a leading block axis of stacked
vectors (``jax.vmap``), one tangent per block, so the number of blocks is static and there is no
Python loop over layers at run time.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kfqn_jax._src import base
from kfqn_jax._src import losses as losses_lib

PyTree = Any

__all__ = [
    "BlockMasks",
    "block_masks",
    "block_inner",
    "linearize_ggn",
    "output_hvp",
    "stack_blocks",
    "unstack_blocks",
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
      ``(outputs, gvp)``. ``gvp`` is linear and can be ``jax.vmap``-ed over stacked tangents.
    """
    outputs, jvp = jax.linearize(model_fn, params)
    vjp = jax.linear_transpose(jvp, params)
    hvp = output_hvp(output_loss, outputs)

    def gvp(v):
        (out,) = vjp(hvp(jvp(v)))
        return out

    return outputs, gvp


# ----------------------------------------------------------------------------------------------
# Blocks as masks over stacked vectors.


class BlockMasks:
    """A static partition of a parameter tree into ``K`` blocks.

    Vectors of the block system are *stacked*: every leaf gets a leading axis of size ``K``
    and row ``b`` is zero outside block ``b``. ``masks`` holds, per leaf, a 0/1 numpy array of
    shape ``(K, 1, ..., 1)`` (whole leaves in one block) or ``(K, *leaf.shape)`` (a leaf split
    between blocks), which broadcasts against stacked leaves.

    Attributes:
      labels: the block labels, in block order.
      masks: list of numpy masks, in leaf order.
      treedef: the parameter tree structure.
    """

    def __init__(self, labels: Sequence[Hashable], masks: Sequence[np.ndarray], treedef: Any):
        self.labels = tuple(labels)
        self.masks = list(masks)
        self.treedef = treedef

    @property
    def num_blocks(self) -> int:
        return len(self.labels)

    def tree(self, dtype: Any) -> PyTree:
        """The masks as a tree of ``dtype`` arrays (constants under jit)."""
        return jax.tree_util.tree_unflatten(
            self.treedef, [jnp.asarray(m, dtype) for m in self.masks]
        )


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
    labels = list(order)
    k = len(labels)
    masks = []
    for label, leaf in zip(raw, leaves, strict=True):
        shape = tuple(np.shape(leaf))
        if isinstance(label, np.ndarray):
            idx = np.vectorize(order.__getitem__, otypes=[np.int64])(label)
            m = (np.arange(k).reshape((k,) + (1,) * len(shape)) == idx[None]).astype(np.float32)
        else:
            m = np.zeros((k,) + (1,) * len(shape), np.float32)
            m[order[label]] = 1.0
        masks.append(m)
    return BlockMasks(labels, masks, treedef)


def stack_blocks(tree: PyTree, masks: PyTree) -> PyTree:
    """``tree`` split into stacked per-block rows: ``out[b] = P_b tree``."""
    return jax.tree.map(lambda x, m: m * x[None], tree, masks)


def unstack_blocks(stacked: PyTree) -> PyTree:
    """The vector whose block ``b`` is row ``b`` of ``stacked`` (rows are disjoint)."""
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)


def block_inner(x: PyTree, y: PyTree) -> jax.Array:
    """Per-block inner products of stacked vectors, shape ``(K,)``."""
    parts = [
        jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    ]
    return sum(parts[1:], parts[0])


def block_gvp(gvp: Callable[[PyTree], PyTree], masks: PyTree, num_blocks: int):
    """The block-diagonal GGN product on stacked vectors: ``out[b] = P_b G P_b v[b]``.

    One ``jax.vmap`` over the block axis: ``K`` JVPs and ``K`` VJPs batched together.
    """

    def matvec(v):
        v = jax.tree.map(lambda a, m: a * m, v, masks)
        if num_blocks == 1:
            out = jax.tree.map(lambda a: a[None], gvp(jax.tree.map(lambda a: a[0], v)))
        else:
            out = jax.vmap(gvp)(v)
        return jax.tree.map(lambda a, m: a * m, out, masks)

    return matvec
