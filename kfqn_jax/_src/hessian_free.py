"""Hessian-free (Martens 2010) and block-diagonal Hessian-free (Zhang et al. 2017).

Each step approximately minimises the damped quadratic model of the objective ``f`` at ``θ``,

.. math::

    q_λ(d) = g^T d + \\tfrac12 d^T (G + (λ + τ) I) d,

by conjugate gradient (CG), where ``g`` is the gradient (``updates``, plus ``τ θ`` for the
weight decay ``τ``), ``G`` the generalized Gauss-Newton matrix on the curvature batch (see
:mod:`kfqn_jax._src.ggn`) and ``λ`` the Levenberg-Marquardt damping. The block-diagonal
variant replaces ``G`` by ``diag(G_11, ..., G_KK)`` over a partition of the parameters into
``K`` blocks (layers by default), so the system decouples into ``K`` independent systems
``(G_bb + (λ + τ) I) d_b = -g_b``. They are solved by one batched CG with per-block step sizes
``α_b``, ``β_b`` and per-block stopping, inside a single ``lax.while_loop``; plain HF is the
case ``K = 1``.

Around CG, Martens' machinery (ALGORITHMS.md §5, constants from his demo code):

* warm start from ``0.95 d_prev`` (the previous step's last CG iterate);
* stop block ``b`` at iteration ``i`` when ``i > k``, ``φ(x_{i-k}) < 0`` and
  ``(φ(x_i) − φ(x_{i-k})) / φ(x_i) < k ε`` with ``k = max(10, ⌈0.1 i⌉)``, ``ε = 5e-4`` and
  ``φ(x) = ½ (r − b)^T x`` (``r = A x − b``), or when ``p^T A p ≤ 0``;
* optional diagonal preconditioner ``(s + λ + τ)^{3/4}`` from mean squared per-example
  gradients ``s`` (an empirical-Fisher diagonal);
* CG-iterate backtracking: the iterates at ``i = ⌈5 · 1.3^j⌉`` and the last one are kept;
  starting from the last, walk back while the earlier iterate has an objective no larger;
* LM damping from ``ρ = (f(θ + d) − f(θ)) / (q_0(d) − q_0(0))`` with the damping switched off
  in ``q_0``: ``λ ← 3/2 λ`` if ``ρ < 1/4`` (or NaN; ``ρ = −∞`` when ``f`` rose),
  ``λ ← 2/3 λ`` if ``ρ > 3/4``;
* Armijo line search ``f(θ + η d) ≤ f(θ) + c η g^T d``, ``c = 1e-2``, ``η`` from 1 shrinking by
  0.8 at most 60 times, else the step is rejected (``η = 0``).

Deviations from Martens' demo, all documented at the arguments: the reduction ratio and the
backtracking use ``loss_fn`` (the gradient batch) rather than the curvature chunk and the full
training set; the iterates kept for backtracking for block-diagonal HF are the combined vectors
after every block's ``i``-th iteration (a block that stopped keeps its last iterate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from kfqn_jax._src import base, ggn, linalg, safety

PyTree = Any

# Extra-arg names (see kfqn_jax._src.base for the protocol).
MODEL_FN = "model_fn"
OUTPUT_LOSS = "output_loss"
SQ_GRADS = "sq_grads"

# Martens (2010) demo constants (ALGORITHMS.md §5).
_RHO_LOW, _RHO_HIGH = 0.25, 0.75
_LM_UP, _LM_DOWN = 1.5, 2.0 / 3.0
_ARMIJO_C, _ARMIJO_SHRINK, _ARMIJO_MAX_STEPS = 1e-2, 0.8, 60
_MIN_DAMPING, _MAX_DAMPING = 1e-8, 1e8  # default floor, ceiling


class ScaleByHessianFreeState(NamedTuple):
    """State of :func:`scale_by_hessian_free`.

    Attributes:
      count: number of steps taken (int32); a skipped step (see ``on_nonfinite``) does not
        count.
      nonfinite_count: number of steps skipped because of non-finite values (int32).
      damping: the Levenberg-Marquardt damping ``λ`` for the next step, in [min_damping, 1e8].
      direction: the last CG iterate of the previous step (its solution before backtracking),
        the warm start of the next CG run after decay; float32 (float64 with float64 params).
      cg_iters: CG iterations of the last step (for block-diagonal HF, of the slowest block).
      step_size: the line-search step ``η`` of the last step (1 without line search; 0 when
        the step was rejected).
    """

    count: jax.Array
    nonfinite_count: jax.Array
    damping: jax.Array
    direction: PyTree
    cg_iters: jax.Array
    step_size: jax.Array


class BlockCGResult(NamedTuple):
    """Output of :func:`block_cg`.

    Attributes:
      x: the final iterate (all blocks).
      iters: iterations of the loop (int32), the largest per-block count.
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


# Loss differences within this many ulps count as ties in CG-iterate backtracking.
_TIE_ULPS = 8


def backtrack_grid(max_iters: int) -> tuple[int, ...]:
    """Martens' CG iterations whose iterates are kept: ``⌈5 · 1.3^j⌉ < max_iters``, distinct."""
    out: list[int] = []
    j = 0
    while True:
        i = math.ceil(5 * 1.3**j - 1e-9)
        if i >= max_iters:
            return tuple(out)
        if not out or i != out[-1]:
            out.append(i)
        j += 1


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

    Vectors are parameter-shaped trees partitioned by ``blocks``; ``A`` must be block-diagonal
    in that partition. Every block has its own ``α_b = r_b^T y_b / p_b^T A p_b`` and ``β_b``,
    and stops on its own by Martens' relative-progress rule (see the module docstring) or when
    ``p_b^T A p_b ≤ 0``; the loop runs while any block is active and at most ``max_iters``
    times.

    Args:
      matvec: ``x -> A x``.
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
    part = ggn.block_masks(b, "all") if blocks is None else blocks
    k_blocks = part.num_blocks
    dtype = jax.tree.leaves(b)[0].dtype
    sub = lambda u, v: jax.tree.map(jnp.subtract, u, v)  # noqa: E731

    def apply_precond(r):
        if precond is None:
            return r
        return jax.tree.map(jnp.multiply, r, precond)

    def axpy(alpha, u, v):  # alpha per block
        return jax.tree.map(lambda a, s, c: s * a + c, u, part.expand(alpha, u), v)

    r0 = sub(matvec(x0), b)
    y0 = apply_precond(r0)
    p0 = jax.tree.map(jnp.negative, y0)
    ry0 = part.inner(r0, y0)
    phis = jnp.zeros((max_iters + 1, k_blocks), dtype)
    phis = phis.at[0].set(0.5 * part.inner(sub(r0, b), x0))

    n_store = len(store_at)
    table = np.full(max_iters + 1, -1, np.int32)
    for slot, it in enumerate(store_at):
        if 0 < it <= max_iters:
            table[it] = slot
    table = jnp.asarray(table)
    stored = None
    if n_store:
        stored = jax.tree.map(lambda a: jnp.zeros((n_store,) + a.shape, a.dtype), x0)

    def cond(c):
        i, active = c[0], c[5]
        return (i < max_iters) & jnp.any(active)

    def body(c):
        i, x, r, p, ry, active, phis, stored, block_iters = c
        ap = matvec(p)
        pap = part.inner(p, ap)
        ok = active & (pap > 0)
        alpha = jnp.where(ok, ry / jnp.where(ok, pap, 1.0), 0.0)
        x = axpy(alpha, p, x)
        r = axpy(alpha, ap, r)
        y = apply_precond(r)
        ry_new = part.inner(r, y)
        beta = jnp.where(ok, ry_new / jnp.where(ry != 0, ry, 1.0), 0.0)
        # A stopped block keeps its direction: p <- beta p - y where ok, else p.
        p = jax.tree.map(
            lambda pv, bt, yv, kp: jnp.where(kp, bt * pv - yv, pv),
            p,
            part.expand(beta, p),
            y,
            part.expand(ok, p),
        )
        ry = jnp.where(ok, ry_new, ry)
        i = i + 1
        phi = 0.5 * part.inner(sub(r, b), x)
        phis = phis.at[i].set(phi)
        k = jnp.maximum(10, jnp.ceil(0.1 * i).astype(jnp.int32))
        phi_k = phis[jnp.maximum(i - k, 0)]
        ratio = (phi - phi_k) / jnp.where(phi != 0, phi, 1.0)
        stalled = (i > k) & (phi_k < 0) & (ratio < k.astype(dtype) * progress_tol)
        block_iters = block_iters + ok.astype(jnp.int32)
        active = ok & ~stalled
        if n_store:
            slot = table[i]
            stored = lax.cond(
                slot >= 0,
                lambda s: jax.tree.map(lambda a, v: a.at[jnp.maximum(slot, 0)].set(v), s, x),
                lambda s: s,
                stored,
            )
        return i, x, r, p, ry, active, phis, stored, block_iters

    init = (
        jnp.zeros([], jnp.int32),
        x0,
        r0,
        p0,
        ry0,
        jnp.ones((k_blocks,), bool),
        phis,
        stored,
        jnp.zeros((k_blocks,), jnp.int32),
    )
    i, x, _, _, _, _, _, stored, block_iters = lax.while_loop(cond, body, init)
    grid = jnp.asarray(np.asarray(store_at, np.int32).reshape(-1))
    num_stored = jnp.sum(grid < i, dtype=jnp.int32) if n_store else jnp.zeros([], jnp.int32)
    return BlockCGResult(x, i, block_iters, stored, num_stored)


def _tree_vdot(u: PyTree, v: PyTree) -> jax.Array:
    parts = [jnp.vdot(a, c) for a, c in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True)]
    return sum(parts[1:], parts[0]) if parts else jnp.zeros([])


def _check_callable(method: str, name: str, value: Any, what: str) -> None:
    if not callable(value):
        raise TypeError(
            f"{method}: the extra arg `{name}` must be {what}, got {type(value).__name__}."
        )


def _fix_line(method: str) -> str:
    return (
        "Pass the model on the curvature batch, the loss on its outputs and the training loss "
        "on the gradient batch, e.g.\n"
        f"    updates, opt_state = tx.update(grads, opt_state, params,\n"
        "        model_fn=lambda p: model.apply({'params': p}, x_curv),\n"
        "        output_loss=kfqn_jax.losses.softmax_cross_entropy(),\n"
        "        loss_fn=lambda p: loss(model.apply({'params': p}, x), y))\n"
        f"({method} evaluates the GGN with model_fn and output_loss, and the reduction ratio "
        "and line search with loss_fn.)"
    )


def scale_by_hessian_free(
    damping: float = 1.0,
    *,
    min_damping: float = _MIN_DAMPING,
    blocks: Any = "all",
    max_cg_iters: int = 250,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    line_search: bool = True,
    precondition: bool = False,
    precond_exponent: float = 0.75,
    weight_decay: float = 0.0,
    block_combination: str = "subspace",
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free direction (full or block-diagonal GGN); no learning rate.

    ``update`` returns ``-η d``, where ``d`` approximately solves
    ``(G + (λ + τ) I) d = -(g + τ θ)`` (block by block for ``blocks != "all"``) and ``η`` is
    the line-search step, so that ``optax.scale_by_learning_rate(1.0)`` applies ``θ + η d``.
    Symbols: ``g = updates``, ``θ = params``, ``λ`` the adaptive damping (initially
    ``damping``), ``τ = weight_decay``, ``G`` the GGN of ``output_loss ∘ model_fn``.

    Args:
      damping: initial Levenberg-Marquardt damping ``λ_0``, adapted every step from the
        reduction ratio (×3/2 below 1/4, ×2/3 above 3/4; kept in
        [``min_damping``, 1e8], ``λ_0`` included). Martens' demo
        starts at 45 for losses summed over outputs and averaged over examples.
      min_damping: the floor of ``λ`` (default 1e-8, in effect no floor). The reduction ratio
        is measured on the gradient batch the step was fitted to, so it cannot see a step
        that overfits that batch; with long runs on small curvature batches ``λ`` can then
        fall to the floor and the loss on *other* batches rises. A floor such as 1e-3 to 1e-2
        keeps such steps in check (see ``benchmarks/RESULTS.md``: block-diagonal HF on the
        character LSTM). A ``damping`` below the floor starts at the floor.
      blocks: ``"all"`` (plain HF), ``"layer"`` (one block per Flax module: a layer's kernel
        and bias), ``"leaf"``, or a function ``(path, shape) -> label`` (see
        :func:`kfqn_jax._src.ggn.block_masks`; put it in ``static_args`` of
        ``optax.inject_hyperparams``).
      max_cg_iters: CG iteration cap (static). Martens: 250.
      progress_tol: ``ε`` of Martens' relative-progress stopping rule (5e-4).
      warm_start_decay: CG starts from this times the previous step's CG solution (0.95).
      backtracking: pick among the CG iterates at ``⌈5 · 1.3^j⌉`` by ``loss_fn`` (Martens);
        an earlier iterate must be better by more than 8 ulps of the loss (rounding ties go to
        the later one).
        Costs one ``loss_fn`` evaluation per iterate visited.
      line_search: Armijo backtracking on the chosen iterate (``c = 1e-2``, shrink 0.8, at most
        60 times, else the step is rejected).
      precondition: precondition CG by ``M = (s + λ + τ)^{precond_exponent}`` element-wise,
        with ``s`` the extra arg ``sq_grads`` (mean over examples of squared per-example
        gradients, Martens' choice).
      precond_exponent: the exponent of ``M`` (Martens: 3/4).
      weight_decay: L2 coefficient ``τ``: the objective is ``loss_fn(θ) + τ/2 ||θ||²``, whose
        gradient term ``τ θ`` and curvature ``τ I`` are added here (do not also chain
        ``optax.add_decayed_weights``).
      block_combination: how the block solutions ``d_b`` make the step (block-diagonal HF
        only). ``"sum"``: ``d = Σ_b d_b`` as in the paper; the reduction ratio then uses the
        block-diagonal model. ``"subspace"`` (default): ``d = Σ_b α_b d_b`` with ``α``
        minimising the damped quadratic model with the *full* GGN over the span of the
        ``d_b``, ``(M + (λ + τ) D) α = -c`` with ``M_bc = (J d_b)^T H (J d_c)``,
        ``D = diag(d_b^T d_b)``, ``c_b = g_b^T d_b`` (the ``K``-dimensional analogue of
        KFAC's rescaling by the exact model); the reduction ratio uses the full GGN model.
        Costs one forward-mode product per block and a ``K × K`` solve per candidate step.
        Independent block steps ignore the coupling between layers and overshoot when the
        layers' steps reinforce each other: on the deep autoencoder, ``"sum"`` needs line
        search steps of 0.2-0.6 and stalls on the loss plateau that ``"subspace"`` leaves.
      ON_NONFINITE

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params, *,
      model_fn, output_loss, loss_fn[, sq_grads])`` needs ``params`` and the extra args:

      * ``model_fn``: ``params -> outputs`` on the curvature batch (may differ from the
        gradient batch, e.g. a slice of it);
      * ``output_loss``: a :class:`kfqn_jax.losses.Loss` (or its name) whose mean over the
        outputs' leading axes is the curvature-batch loss, or a function ``outputs -> scalar``
        with a positive semi-definite Hessian in the outputs (targets closed over);
      * ``loss_fn``: ``params -> scalar`` training loss on the gradient batch, for the
        reduction ratio, the backtracking and the line search;
      * ``sq_grads`` (only with ``precondition=True``): a tree like ``params``.

      ``updates`` come back in the parameter dtype; the curvature work runs in float32
      (float64 for float64 parameters).
    """
    full = isinstance(blocks, str) and blocks == "all"
    method = "hessian_free" if full else "block_hessian_free"
    base.check_positive_int(method, "max_cg_iters", max_cg_iters)
    if not (blocks in ("all", "layer", "leaf") or callable(blocks)):
        raise ValueError(
            f"{method}: blocks must be 'all', 'layer', 'leaf' or a function (path, shape) -> "
            f"label, got {blocks!r}."
        )
    for name, v in (
        ("progress_tol", progress_tol),
        ("warm_start_decay", warm_start_decay),
        ("weight_decay", weight_decay),
    ):
        if base.is_number(v) and not v >= 0:
            raise ValueError(f"{method}: {name} must be >= 0, got {v!r}.")
    base.check_damping(method, damping, schedule=False)
    base.check_positive(
        method,
        "min_damping",
        min_damping,
        schedule=False,
        fix="min_damping is the floor of the adaptive damping; pass e.g. min_damping=1e-3.",
    )
    if base.is_number(min_damping) and not min_damping < _MAX_DAMPING:
        raise ValueError(f"{method}: min_damping must be < {_MAX_DAMPING:g}, got {min_damping!r}.")
    if block_combination not in ("sum", "subspace"):
        raise ValueError(
            f"{method}: block_combination must be 'sum' or 'subspace', got {block_combination!r}."
        )
    grid = backtrack_grid(max_cg_iters) if backtracking else ()

    def init_fn(params):
        dtype = base.as_float(jax.tree.leaves(params)[0].dtype)
        return ScaleByHessianFreeState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            damping=jnp.clip(jnp.asarray(damping, dtype), min_damping, _MAX_DAMPING),
            direction=jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params),
            cg_iters=jnp.zeros([], jnp.int32),
            step_size=jnp.zeros([], dtype),
        )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        model_fn=None,
        output_loss=None,
        loss_fn=None,
        sq_grads=None,
        **extra,
    ):
        del extra
        if params is None:
            raise ValueError(f"{method}.update needs `params` (the GGN is linearized there).")
        for name, value in ((MODEL_FN, model_fn), (OUTPUT_LOSS, output_loss)):
            if value is None:
                raise base.missing_extra_arg(method, name, _fix_line(method))
        if loss_fn is None:
            raise base.missing_extra_arg(method, base.LOSS_FN, _fix_line(method))
        _check_callable(method, MODEL_FN, model_fn, "a function params -> outputs")
        _check_callable(method, base.LOSS_FN, loss_fn, "a function params -> scalar loss")
        if precondition and sq_grads is None:
            raise base.missing_extra_arg(
                method,
                SQ_GRADS,
                "precondition=True needs the mean squared per-example gradients, e.g.\n"
                "    per_ex = jax.vmap(jax.grad(example_loss), (None, 0, 0))(params, x, y)\n"
                "    sq_grads = jax.tree.map(lambda a: jnp.mean(a**2, 0), per_ex)",
            )
        if precondition:
            base.check_tree_like(method, SQ_GRADS, sq_grads, params, "parameters")

        dtype = state.damping.dtype
        cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
        theta = cast(params)
        tau = jnp.asarray(weight_decay, dtype)
        grad = jax.tree.map(lambda g, w: g + tau * w, cast(updates), theta)
        lam = state.damping
        shift = lam + tau

        bm = ggn.block_masks(params, blocks)

        def model32(p):
            out = model_fn(p)
            return jax.tree.map(
                lambda o: o.astype(dtype) if jnp.issubdtype(o.dtype, jnp.floating) else o, out
            )

        lin = ggn.linearize_block_ggn(model32, output_loss, theta, bm)
        g_matvec = lin.matvec

        def matvec(v):
            return jax.tree.map(lambda gv, a: gv + shift * a, g_matvec(v), v)

        precond = None
        if precondition:
            precond = jax.tree.map(lambda s: (s + shift) ** (-precond_exponent), cast(sq_grads))
        res = block_cg(
            matvec,
            jax.tree.map(jnp.negative, grad),
            jax.tree.map(lambda d: warm_start_decay * d, state.direction),
            max_iters=max_cg_iters,
            blocks=bm,
            progress_tol=progress_tol,
            precond=precond,
            store_at=grid,
        )
        final = res.x
        subspace = bm.num_blocks > 1 and block_combination == "subspace"

        def model_reduction(step):
            """``q_0(step) - q_0(0)`` of the model CG solved (damping off, weight decay on)."""
            curv = _tree_vdot(step, g_matvec(step))
            return _tree_vdot(grad, step) + 0.5 * (curv + tau * _tree_vdot(step, step))

        def combine(step):
            """The block rows of ``step`` rescaled to minimise the full damped GN model.

            Returns the combined step and its undamped full-GGN model reduction.
            """
            if not subspace:
                return step, None
            ravel = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
            us = lin.block_jvps(step)
            u = jnp.stack([ravel(t) for t in us])
            hu = jnp.stack([ravel(lin.hvp(t)) for t in us])
            m = u @ hu.T
            m = 0.5 * (m + m.T)
            c = bm.inner(grad, step)
            dd = bm.inner(step, step)
            valid = dd > 0
            eye = jnp.eye(bm.num_blocks, dtype=dtype)
            a = jnp.where(valid[:, None] & valid[None, :], m + shift * jnp.diag(dd), eye)
            alpha = jnp.linalg.solve(a, -jnp.where(valid, c, 0.0))
            alpha = jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, jnp.ones_like(alpha))
            red = alpha @ c + 0.5 * (alpha @ (m @ alpha) + tau * jnp.sum(alpha**2 * dd))
            scaled = jax.tree.map(lambda s, x: s * x, bm.expand(alpha, step), step)
            return scaled, red

        def objective(step):
            trial = jax.tree.map(lambda w, s: (w.astype(dtype) + s).astype(w.dtype), params, step)
            reg = 0.5 * tau * _tree_vdot(cast(trial), cast(trial))
            return jnp.asarray(loss_fn(trial), dtype) + reg

        f0 = jnp.asarray(loss_fn(params), dtype) + 0.5 * tau * _tree_vdot(theta, theta)
        final_step, final_red = combine(final)
        f_final = objective(final_step)
        zero = jnp.zeros([], dtype)
        if grid:

            def bt_cond(c):
                j, _, done, _, _ = c
                return (~done) & (j >= 0)

            def bt_body(c):
                j, f_cur, _, step_cur, red_cur = c
                step_j, red_j = combine(jax.tree.map(lambda a: a[j], res.stored))
                f_j = objective(step_j)
                # Strictly better by more than a few ulps: a tie within rounding goes to the
                # later (more converged) iterate, so the choice does not flip with the order
                # of summation (a batch sharded across devices, another JAX version).
                better = f_j < f_cur - _TIE_ULPS * jnp.finfo(dtype).eps * jnp.abs(f_cur)
                step_cur = jax.tree.map(lambda n, o: jnp.where(better, n, o), step_j, step_cur)
                if subspace:
                    red_cur = jnp.where(better, red_j, red_cur)
                return j - 1, jnp.where(better, f_j, f_cur), ~better, step_cur, red_cur

            _, f_p, _, direction, red = lax.while_loop(
                bt_cond,
                bt_body,
                (
                    res.num_stored - 1,
                    f_final,
                    jnp.asarray(False),
                    final_step,
                    final_red if subspace else zero,
                ),
            )
        else:
            direction, f_p, red = final_step, f_final, final_red

        # Reduction ratio with the damping switched off in the model (weight decay kept).
        model_red = red if subspace else model_reduction(direction)
        rho = jnp.where(f_p > f0, -jnp.inf, (f_p - f0) / model_red)
        new_lam = jnp.where(
            (rho < _RHO_LOW) | jnp.isnan(rho),
            lam * _LM_UP,
            jnp.where(rho > _RHO_HIGH, lam * _LM_DOWN, lam),
        )
        new_lam = jnp.clip(new_lam, min_damping, _MAX_DAMPING)

        if line_search:
            slope = _tree_vdot(grad, direction)

            def armijo(rate, f):
                return f <= f0 + _ARMIJO_C * rate * slope

            def ls_cond(c):
                t, rate, f = c
                return (~armijo(rate, f)) & (t < _ARMIJO_MAX_STEPS)

            def ls_body(c):
                t, rate, _ = c
                rate = rate * _ARMIJO_SHRINK
                return t + 1, rate, objective(jax.tree.map(lambda d: rate * d, direction))

            _, rate, f_rate = lax.while_loop(
                ls_cond, ls_body, (jnp.zeros([], jnp.int32), jnp.ones([], dtype), f_p)
            )
            rate = jnp.where(armijo(rate, f_rate), rate, 0.0)
        else:
            rate = jnp.ones([], dtype)

        ok = linalg.is_finite(direction) & jnp.isfinite(rate)
        out = jax.tree.map(
            lambda d, u: jnp.where(ok, -rate * d, 0.0).astype(u.dtype), direction, updates
        )
        keep = linalg.is_finite(final)
        new_state = ScaleByHessianFreeState(
            count=optax.safe_increment(state.count),
            nonfinite_count=state.nonfinite_count,
            damping=new_lam.astype(dtype),
            direction=jax.tree.map(lambda f: jnp.where(keep, f, 0.0), final),
            cg_iters=res.iters,
            step_size=jnp.where(ok, rate, 0.0).astype(dtype),
        )
        return out, new_state

    guarded = safety.guard_nonfinite(update_fn, on_nonfinite, method, (SQ_GRADS,), init_fn=init_fn)
    return optax.GradientTransformationExtraArgs(init_fn, guarded)


scale_by_hessian_free.__doc__ = scale_by_hessian_free.__doc__.replace(
    "ON_NONFINITE", safety.ON_NONFINITE_DOC
)


def _with_lr(inner, learning_rate):
    return optax.chain(inner, optax.scale_by_learning_rate(learning_rate))


def hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1.0,
    *,
    min_damping: float = _MIN_DAMPING,
    max_cg_iters: int = 250,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    line_search: bool = True,
    precondition: bool = False,
    precond_exponent: float = 0.75,
    weight_decay: float = 0.0,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free optimization (Martens 2010): CG on the damped Gauss-Newton model.

    Update: ``θ ← θ + α η d`` with ``d ≈ -(G + (λ + τ) I)^{-1} (∇L + τ θ)`` by at most
    ``max_cg_iters`` CG iterations, ``α = learning_rate`` (1 is Martens' method; the reduction
    ratio and line search assume ``α = 1``), ``η`` the Armijo step, ``λ`` the adaptive damping
    starting at ``damping`` and ``τ = weight_decay``. See :func:`scale_by_hessian_free` for
    every argument and the extra args. Defaults follow Martens' demo code except the initial
    damping (his 45 suits losses summed over many outputs). ``on_nonfinite`` (``"skip"``,
    ``"raise"`` or ``"ignore"``) says what a step with NaN or infinite gradients or results
    does; by default it is skipped and counted in ``nonfinite_count`` of the state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
      >>> x, y = jnp.ones((16, 5)), jnp.arange(16) % 3
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> xent = kfqn_jax.losses.softmax_cross_entropy()
      >>> loss_fn = lambda p: xent(model.apply({"params": p}, x), y)
      >>> tx = kfqn_jax.hessian_free(damping=1.0, max_cg_iters=20)
      >>> opt_state = tx.init(params)
      >>> grads = jax.grad(loss_fn)(params)
      >>> updates, opt_state = tx.update(grads, opt_state, params,
      ...     model_fn=lambda p: model.apply({"params": p}, x[:8]),  # curvature batch
      ...     output_loss=xent, loss_fn=loss_fn)
      >>> params = optax.apply_updates(params, updates)

    References:
      Martens, `Deep learning via Hessian-free optimization
      <https://www.cs.toronto.edu/~jmartens/docs/Deep_HessianFree.pdf>`_, ICML 2010.
      Martens & Sutskever, `Training deep and recurrent networks with Hessian-free
      optimization <https://doi.org/10.1007/978-3-642-35289-8_27>`_, 2012.
    """
    return _with_lr(
        scale_by_hessian_free(
            damping,
            min_damping=min_damping,
            blocks="all",
            max_cg_iters=max_cg_iters,
            progress_tol=progress_tol,
            warm_start_decay=warm_start_decay,
            backtracking=backtracking,
            line_search=line_search,
            precondition=precondition,
            precond_exponent=precond_exponent,
            weight_decay=weight_decay,
            on_nonfinite=on_nonfinite,
        ),
        learning_rate,
    )


def block_hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1.0,
    *,
    min_damping: float = _MIN_DAMPING,
    blocks: Any = "layer",
    max_cg_iters: int = 50,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    line_search: bool = True,
    precondition: bool = False,
    precond_exponent: float = 0.75,
    weight_decay: float = 0.0,
    block_combination: str = "subspace",
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Block-diagonal Hessian-free (Zhang et al. 2017): independent CG per block.

    Update as :func:`hessian_free` with the GGN restricted to ``diag(G_11, ..., G_KK)``: every
    block solves ``(G_bb + (λ + τ) I) d_b = -(∇L + τ θ)_b`` with its own CG (all blocks
    batched in one loop; block ``b``'s product runs only the part of the model downstream of
    its parameters), and the block solutions are combined (``block_combination``: by default
    rescaled to minimise the full-GGN model on their span, see :func:`scale_by_hessian_free`)
    before backtracking, the LM update of one shared ``λ`` and the line search.

    Blocks (``blocks``): one per Flax module by default (a Dense layer's kernel and bias;
    each gate Dense of a ``flax.linen.LSTMCell``). A function ``(path, shape) -> label``
    groups differently, e.g. one block per top-level module (each LSTM layer with all its
    gates) with ``blocks=lambda path, shape: path[0]``, or the input and hidden weights of
    each gate of ``LSTMCell_*`` modules together::

        blocks=lambda path, shape: (
            (path[0], path[1][1]) if path[0].startswith("LSTMCell") else path[:-1])

    or returns a numpy array of labels (one per element) to split a fused kernel.

    Defaults chosen here (the paper's constants are not public, ALGORITHMS.md §5):
    ``max_cg_iters = 50`` (blocks are smaller and better conditioned than the full system),
    ``block_combination="subspace"``, and Martens' values for everything else.
    Steps with non-finite values are skipped and counted (``on_nonfinite``, as in
    :func:`hessian_free`).

    References:
      Zhang, Xiong, Bradbury & Socher, `Block-diagonal Hessian-free optimization for
      training neural networks <https://arxiv.org/abs/1712.07296>`_, 2017.
      Martens, `Deep learning via Hessian-free optimization
      <https://www.cs.toronto.edu/~jmartens/docs/Deep_HessianFree.pdf>`_, ICML 2010.
    """
    if blocks == "all":
        raise ValueError("block_hessian_free(blocks='all') is hessian_free; use that instead.")
    return _with_lr(
        scale_by_hessian_free(
            damping,
            min_damping=min_damping,
            blocks=blocks,
            max_cg_iters=max_cg_iters,
            progress_tol=progress_tol,
            warm_start_decay=warm_start_decay,
            backtracking=backtracking,
            line_search=line_search,
            precondition=precondition,
            precond_exponent=precond_exponent,
            weight_decay=weight_decay,
            block_combination=block_combination,
            on_nonfinite=on_nonfinite,
        ),
        learning_rate,
    )
