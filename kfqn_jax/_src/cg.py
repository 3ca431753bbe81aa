"""Block conjugate gradient: ``K`` independent SPD systems solved by one batched CG loop.

Vectors are parameter-shaped trees partitioned into blocks by a
:class:`kfqn_jax._src.ggn.BlockMasks`; the operator ``A`` must be block-diagonal in that
partition, so the system decouples into ``A_b x_b = b_b``, ``b = 1, ..., K``. Every block has
its own step sizes ``α_b = r_b^T y_b / p_b^T A p_b`` and ``β_b = r_b'^T y_b' / r_b^T y_b``
(``y = M^{-1} r`` with an optional element-wise preconditioner) and its own stopping, inside a
single ``lax.while_loop``; plain CG is the case ``K = 1``.

A block stops when ``p_b^T A p_b ≤ 0`` or by Martens' (2010) relative-progress rule: at
iteration ``i``, when ``i > k``, ``φ(x_{i-k}) < 0`` and ``(φ(x_i) − φ(x_{i-k})) / φ(x_i) < k ε``
with ``k = max(10, ⌈0.1 i⌉)`` and ``φ(x) = ½ (r − b)^T x = ½ x^T A x − b^T x`` (``r = A x − b``),
the quadratic CG minimises. The loop runs while any block is active and at most ``max_iters``
times. Optionally the iterates at chosen iterations are kept (for Hessian-free's CG-iterate
backtracking).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kfqn_jax._src import ggn

PyTree = Any

__all__ = ["BlockCGResult", "block_cg", "relative_progress_stalled"]


class BlockCGResult(NamedTuple):
    """Output of :func:`block_cg`.

    Attributes:
      x: the final iterate (all blocks).
      iters: iterations of the loop (int32): the largest per-block count, or one more when
        the last iteration found ``p^T A p ≤ 0`` for the slowest block (and did not move it).
      block_iters: per-block iterations that moved the iterate, ``(K,)`` int32.
      stored: the iterates at the iterations ``store_at``, leaves ``(S, ...)``, or ``None``
        without storage.
      num_stored: how many entries of ``stored`` are valid (those at iterations ``< iters``).
    """

    x: PyTree
    iters: jax.Array
    block_iters: jax.Array
    stored: PyTree
    num_stored: jax.Array


class _Carry(NamedTuple):
    i: jax.Array  # iterations done
    x: PyTree  # iterate
    r: PyTree  # residual A x - b
    p: PyTree  # search direction
    ry: jax.Array  # (K,) r_b^T y_b
    active: jax.Array  # (K,) bool
    phis: jax.Array  # (max_iters + 1, K) the quadratic φ at every iterate
    stored: PyTree  # kept iterates, or None
    block_iters: jax.Array  # (K,) int32


class _System(NamedTuple):
    """The static parts of one solve."""

    matvec: Callable[[PyTree], PyTree]
    b: PyTree
    part: ggn.BlockMasks
    precond: PyTree | None
    progress_tol: float
    table: jax.Array  # iteration -> storage slot, or -1
    n_store: int

    def apply_precond(self, r: PyTree) -> PyTree:
        if self.precond is None:
            return r
        return jax.tree.map(jnp.multiply, r, self.precond)

    def axpy(self, alpha: jax.Array, u: PyTree, v: PyTree) -> PyTree:
        """``alpha_b u_b + v_b`` block by block."""
        return jax.tree.map(lambda a, s, c: s * a + c, u, self.part.expand(alpha, u), v)

    def phi(self, r: PyTree, x: PyTree) -> jax.Array:
        """Per block ``½ (r − b)^T x``."""
        return 0.5 * self.part.inner(jax.tree.map(jnp.subtract, r, self.b), x)


def relative_progress_stalled(
    phis: jax.Array, i: jax.Array, phi: jax.Array, progress_tol: Any
) -> jax.Array:
    """Martens' stopping rule (module docstring) per block, at iteration ``i`` with
    ``phi = φ(x_i)`` and ``phis[j] = φ(x_j)`` for ``j ≤ i``."""
    k = jnp.maximum(10, jnp.ceil(0.1 * i).astype(jnp.int32))
    phi_k = phis[jnp.maximum(i - k, 0)]
    ratio = (phi - phi_k) / jnp.where(phi != 0, phi, 1.0)
    return (i > k) & (phi_k < 0) & (ratio < k.astype(phi.dtype) * progress_tol)


def _store(system: _System, stored: PyTree, i: jax.Array, x: PyTree) -> PyTree:
    """``stored`` with ``x`` in the slot of iteration ``i``, if it has one."""
    if not system.n_store:
        return stored
    slot = system.table[i]
    return lax.cond(
        slot >= 0,
        lambda s: jax.tree.map(lambda a, v: a.at[jnp.maximum(slot, 0)].set(v), s, x),
        lambda s: s,
        stored,
    )


def _iteration(system: _System, c: _Carry) -> _Carry:
    """One CG iteration of every active block."""
    ap = system.matvec(c.p)
    pap = system.part.inner(c.p, ap)
    ok = c.active & (pap > 0)
    alpha = jnp.where(ok, c.ry / jnp.where(ok, pap, 1.0), 0.0)
    x = system.axpy(alpha, c.p, c.x)
    r = system.axpy(alpha, ap, c.r)
    y = system.apply_precond(r)
    ry_new = system.part.inner(r, y)
    beta = jnp.where(ok, ry_new / jnp.where(c.ry != 0, c.ry, 1.0), 0.0)
    # A stopped block keeps its direction: p <- beta p - y where ok, else p.
    p = jax.tree.map(
        lambda pv, bt, yv, kp: jnp.where(kp, bt * pv - yv, pv),
        c.p,
        system.part.expand(beta, c.p),
        y,
        system.part.expand(ok, c.p),
    )
    ry = jnp.where(ok, ry_new, c.ry)
    i = c.i + 1
    phi = system.phi(r, x)
    phis = c.phis.at[i].set(phi)
    stalled = relative_progress_stalled(phis, i, phi, system.progress_tol)
    return _Carry(
        i=i,
        x=x,
        r=r,
        p=p,
        ry=ry,
        active=ok & ~stalled,
        phis=phis,
        stored=_store(system, c.stored, i, x),
        block_iters=c.block_iters + ok.astype(jnp.int32),
    )


def _slot_table(store_at: tuple[int, ...], max_iters: int) -> jax.Array:
    table = np.full(max_iters + 1, -1, np.int32)
    for slot, it in enumerate(store_at):
        if 0 < it <= max_iters:
            table[it] = slot
    return jnp.asarray(table)


def _initial_carry(system: _System, x0: PyTree, max_iters: int) -> _Carry:
    k_blocks = system.part.num_blocks
    dtype = jax.tree.leaves(system.b)[0].dtype
    r0 = jax.tree.map(jnp.subtract, system.matvec(x0), system.b)
    y0 = system.apply_precond(r0)
    phis = jnp.zeros((max_iters + 1, k_blocks), dtype)
    stored = None
    if system.n_store:
        stored = jax.tree.map(lambda a: jnp.zeros((system.n_store,) + a.shape, a.dtype), x0)
    return _Carry(
        i=jnp.zeros([], jnp.int32),
        x=x0,
        r=r0,
        p=jax.tree.map(jnp.negative, y0),
        ry=system.part.inner(r0, y0),
        active=jnp.ones((k_blocks,), bool),
        phis=phis.at[0].set(system.phi(r0, x0)),
        stored=stored,
        block_iters=jnp.zeros((k_blocks,), jnp.int32),
    )


def block_cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree,
    *,
    max_iters: int,
    blocks: ggn.BlockMasks | None = None,
    progress_tol: float = 5e-4,
    precond: PyTree | None = None,
    store_at: tuple[int, ...] = (),
) -> BlockCGResult:
    """Solves ``K`` independent SPD systems ``A_b x_b = b_b`` by batched (preconditioned) CG.

    See the module docstring for the iteration and the stopping rules.

    Args:
      matvec: ``x -> A x``, block-diagonal in ``blocks``.
      b: right-hand side.
      x0: initial iterate.
      max_iters: iteration cap (static).
      blocks: the partition (:func:`kfqn_jax._src.ggn.block_masks`); ``None`` is one block
        (plain CG).
      progress_tol: ``ε`` of the relative-progress rule; 0 runs to ``max_iters`` or until
        ``p^T A p`` vanishes.
      precond: the inverse preconditioner ``M^{-1}`` as a tree like ``b`` (element-wise), or
        ``None``.
      store_at: iterations at which to keep the iterate (static).

    Returns:
      A :class:`BlockCGResult`.
    """
    system = _System(
        matvec=matvec,
        b=b,
        part=ggn.block_masks(b, "all") if blocks is None else blocks,
        precond=precond,
        progress_tol=progress_tol,
        table=_slot_table(store_at, max_iters),
        n_store=len(store_at),
    )
    out = lax.while_loop(
        lambda c: (c.i < max_iters) & jnp.any(c.active),
        lambda c: _iteration(system, c),
        _initial_carry(system, x0, max_iters),
    )
    grid = jnp.asarray(np.asarray(store_at, np.int32).reshape(-1))
    if system.n_store:
        num_stored = jnp.sum(grid < out.i, dtype=jnp.int32)
    else:
        num_stored = jnp.zeros([], jnp.int32)
    return BlockCGResult(out.x, out.i, out.block_iters, out.stored, num_stored)
