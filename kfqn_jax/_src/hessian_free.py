"""Hessian-free (Martens 2010) and block-diagonal Hessian-free (Zhang et al. 2017).

Each step approximately minimises the damped quadratic model of the objective ``f`` at ``θ``,

.. math::

    q_λ(d) = g^T d + \\tfrac12 d^T (G + (λ + τ) I) d,

by conjugate gradient (CG), where ``g`` is the gradient (``updates``, plus ``τ θ`` for the
coupled L2 coefficient ``τ = l2_reg``), ``G`` the generalized Gauss-Newton matrix on the
curvature batch (see :mod:`kfqn_jax._src.ggn`) and ``λ`` the Levenberg-Marquardt damping. The
block-diagonal variant replaces ``G`` by ``diag(G_11, ..., G_KK)`` over a partition of the
parameters into ``K`` blocks (layers by default), so the system decouples into ``K``
independent systems ``(G_bb + (λ + τ) I) d_b = -g_b``. They are solved by one batched CG with
per-block step sizes and per-block stopping (:func:`kfqn_jax._src.cg.block_cg`); plain HF is
the case ``K = 1``.

Around CG, Martens' machinery (Martens, ICML 2010, §4, with the constants of his public demo code), one named
function each:

* warm start from ``0.95 d_prev`` (the previous step's last CG iterate) and Martens'
  relative-progress stopping rule, ``ε = 5e-4`` (:func:`solve`);
* optional diagonal preconditioner ``(s + λ + τ)^{-3/4}`` from mean squared per-example
  gradients ``s`` (an empirical-Fisher diagonal);
* for block-diagonal HF, the block solutions rescaled to minimise the full-GGN model on their
  span (:func:`subspace_combination`);
* CG-iterate backtracking: the iterates at ``i = ⌈5 · 1.3^j⌉`` and the last one are kept;
  starting from the last, walk back while the earlier iterate has an objective no larger
  (:func:`backtrack_iterates`);
* LM damping from ``ρ = (f(θ + d) − f(θ)) / (q_0(d) − q_0(0))`` with the damping switched off
  in ``q_0`` (:func:`model_reduction`): ``λ ← 3/2 λ`` if ``ρ < 1/4`` (or NaN, or the loss
  rose), ``λ ← λ / (3/2)`` if ``ρ > 3/4``, by the shared controller
  :class:`kfqn_jax._src.lm_damping.LevenbergMarquardt` (:func:`next_damping`);
* Armijo line search ``f(θ + η d) ≤ f(θ) + c η g^T d``, ``c = 1e-2``, ``η`` from 1 shrinking by
  0.8 at most 60 times, else the step is rejected (``η = 0``; :func:`armijo_line_search`).

Deviations from Martens' demo, all documented at the arguments: the reduction ratio and the
backtracking use ``loss_fn`` (the gradient batch) rather than the curvature chunk and the full
training set; the iterates kept for backtracking for block-diagonal HF are the combined vectors
after every block's ``i``-th iteration (a block that stopped keeps its last iterate).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kfqn_jax._src import alias, base, extra_args, ggn, linalg, lm_damping, safety
from kfqn_jax._src.cg import BlockCGResult, block_cg  # noqa: F401 - re-exported

PyTree = Any

# Martens (2010) demo constants; the LM rule's are in lm_damping.
_ARMIJO_C, _ARMIJO_SHRINK, _ARMIJO_MAX_STEPS = 1e-2, 0.8, 60

# Loss differences within this many ulps count as ties in CG-iterate backtracking.
_TIE_ULPS = 8


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


# ---------------------------------------------------------------------------------------------
# The maths of one step, one function each.


_vdot = optax.tree_utils.tree_vdot


def _cast(tree: PyTree, dtype: Any) -> PyTree:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


class _Point(NamedTuple):
    """What one step knows at ``θ``, in the curvature dtype."""

    dtype: Any
    theta: PyTree  # the parameters
    grad: PyTree  # g + τ θ
    tau: jax.Array  # the coupled L2 coefficient
    lam: jax.Array  # the damping λ
    shift: jax.Array  # λ + τ
    blocks: ggn.BlockMasks
    curvature: ggn.BlockGGN
    subspace: bool  # combine the block solutions on the full GGN


def model_reduction(
    grad: PyTree, step: PyTree, gvp: Callable[[PyTree], PyTree], l2: jax.Array
) -> jax.Array:
    """``q_0(d) − q_0(0) = g^T d + ½ d^T (G + τ I) d``: the model's change for ``d = step``
    with the damping off and the L2 term ``τ = l2`` on (``gvp`` is ``v ↦ G v``)."""
    curv = _vdot(step, gvp(step))
    return _vdot(grad, step) + 0.5 * (curv + l2 * _vdot(step, step))


def subspace_combination(
    step: PyTree,
    grad: PyTree,
    curvature: ggn.BlockGGN,
    blocks: ggn.BlockMasks,
    shift: jax.Array,
    l2: jax.Array,
) -> tuple[PyTree, jax.Array]:
    """The blocks ``d_b`` of ``step`` rescaled, ``Σ_b α_b d_b``, to minimise the damped model
    with the *full* GGN on their span: ``(M + (λ + τ) D) α = -c`` with
    ``M_bc = (J d_b)^T H (J d_c)``, ``D = diag(d_b^T d_b)``, ``c_b = g_b^T d_b`` and
    ``shift = λ + τ`` (blocks with ``d_b = 0`` keep ``α_b = 0``; a singular system keeps
    ``α = 1``).

    Returns:
      The combined step and its model reduction :func:`model_reduction` (damping off).
    """
    dtype = shift.dtype
    ravel = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
    us = curvature.block_jvps(step)
    u = jnp.stack([ravel(t) for t in us])
    hu = jnp.stack([ravel(curvature.hvp(t)) for t in us])
    m = u @ hu.T
    m = 0.5 * (m + m.T)
    c = blocks.inner(grad, step)
    dd = blocks.inner(step, step)
    valid = dd > 0
    eye = jnp.eye(blocks.num_blocks, dtype=dtype)
    a = jnp.where(valid[:, None] & valid[None, :], m + shift * jnp.diag(dd), eye)
    alpha = jnp.linalg.solve(a, -jnp.where(valid, c, 0.0))
    alpha = jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, jnp.ones_like(alpha))
    red = alpha @ c + 0.5 * (alpha @ (m @ alpha) + l2 * jnp.sum(alpha**2 * dd))
    scaled = jax.tree.map(lambda s, x: s * x, blocks.expand(alpha, step), step)
    return scaled, red


def backtrack_iterates(
    evaluate: Callable[[PyTree], tuple[PyTree, Any, jax.Array]],
    stored: PyTree,
    num_stored: jax.Array,
    last: tuple[PyTree, Any, jax.Array],
) -> tuple[PyTree, Any, jax.Array]:
    """Martens' CG-iterate backtracking: from the last iterate, walk back through the
    ``num_stored`` kept iterates (leaves ``(S, ...)`` of ``stored``) while the earlier one has a
    lower objective.

    Args:
      evaluate: ``x ↦ (step, reduction, objective)`` for a CG iterate ``x``: the step made
        from it, its model reduction (or ``None`` where the caller computes it) and the
        objective at ``θ + step``.
      stored: the kept iterates.
      num_stored: how many of them are valid.
      last: ``evaluate`` of the final iterate.

    Returns:
      ``(step, reduction, objective)`` of the chosen iterate.
    """
    last_step, last_red, last_f = last
    track = last_red is not None
    dtype = last_f.dtype

    def cond(c):
        j, _, done, _, _ = c
        return (~done) & (j >= 0)

    def body(c):
        j, f_cur, _, step_cur, red_cur = c
        step_j, red_j, f_j = evaluate(jax.tree.map(lambda a: a[j], stored))
        # Strictly better by more than a few ulps: a tie within rounding goes to the later
        # (more converged) iterate, so the choice does not flip with the order of summation
        # (a batch sharded across devices, another JAX version).
        better = f_j < f_cur - _TIE_ULPS * jnp.finfo(dtype).eps * jnp.abs(f_cur)
        step_cur = jax.tree.map(lambda n, o: jnp.where(better, n, o), step_j, step_cur)
        if track:
            red_cur = jnp.where(better, red_j, red_cur)
        return j - 1, jnp.where(better, f_j, f_cur), ~better, step_cur, red_cur

    init = (
        num_stored - 1,
        last_f,
        jnp.asarray(False),
        last_step,
        last_red if track else jnp.zeros([], dtype),
    )
    _, f, _, step, red = lax.while_loop(cond, body, init)
    return step, (red if track else None), f


def next_damping(
    lam: jax.Array, current: jax.Array, trial: jax.Array, model_red: jax.Array, floor: Any
) -> jax.Array:
    """The Levenberg-Marquardt update of ``λ`` after a step from ``f(θ) = current`` to
    ``f(θ + d) = trial`` whose model reduction (:func:`model_reduction`, negative for a
    predicted decrease) is ``model_red``, with Martens' rule and ``λ ≥ floor``."""
    # HF's ratio (f(θ+d) − f(θ)) / (q_0(d) − q_0(0)) is reduction_ratio(f(θ), f(θ+d),
    # −model_red), bit for bit where the loss did not rise and the model predicts a decrease
    # (both operands are negated exactly). Where the model predicts none (model_red ≥ 0) or a
    # value is NaN, HF's form gave a ratio ≤ 0, −inf or NaN and reduction_ratio gives −inf:
    # λ grows either way. They part only for a trial loss of −inf (HF's form: +inf, λ shrank).
    rho = lm_damping.reduction_ratio(current, trial, -model_red)
    return lm_damping.LevenbergMarquardt(floor=floor).update(lam, rho)


def armijo_line_search(
    objective: Callable[[PyTree], jax.Array],
    grad: PyTree,
    direction: PyTree,
    f0: jax.Array,
    f_full: jax.Array,
) -> jax.Array:
    """The Armijo step ``η``: the first of ``1, 0.8, 0.8², ...`` (at most 60 shrinks) with
    ``objective(η d) ≤ f0 + c η g^T d``, ``c = 1e-2``, else 0 (the step is rejected).
    ``f_full`` is ``objective(d)``."""
    slope = _vdot(grad, direction)

    def armijo(rate, f):
        return f <= f0 + _ARMIJO_C * rate * slope

    def cond(c):
        t, rate, f = c
        return (~armijo(rate, f)) & (t < _ARMIJO_MAX_STEPS)

    def body(c):
        t, rate, _ = c
        rate = rate * _ARMIJO_SHRINK
        return t + 1, rate, objective(jax.tree.map(lambda d: rate * d, direction))

    init = (jnp.zeros([], jnp.int32), jnp.ones([], f0.dtype), f_full)
    _, rate, f_rate = lax.while_loop(cond, body, init)
    return jnp.where(armijo(rate, f_rate), rate, 0.0)


# ---------------------------------------------------------------------------------------------
# The transform: options, checks and the step as a sequence of the functions above.


@dataclasses.dataclass(frozen=True)
class _Options:
    """The arguments of :func:`scale_by_hessian_free` (see there)."""

    damping: Any
    min_damping: Any
    blocks: Any
    max_cg_iters: int
    progress_tol: Any
    warm_start_decay: Any
    backtracking: bool
    line_search: bool
    precondition: bool
    precond_exponent: Any
    l2_reg: Any
    block_combination: str
    on_nonfinite: str

    @property
    def method(self) -> str:
        full = isinstance(self.blocks, str) and self.blocks == "all"
        return "hessian_free" if full else "block_hessian_free"

    @property
    def grid(self) -> tuple[int, ...]:
        return backtrack_grid(self.max_cg_iters) if self.backtracking else ()

    def check(self) -> None:
        method = self.method
        base.check_positive_int(method, "max_cg_iters", self.max_cg_iters)
        if not (self.blocks in ("all", "layer", "leaf") or callable(self.blocks)):
            raise ValueError(
                f"{method}: blocks must be 'all', 'layer', 'leaf' or a function (path, shape) "
                f"-> label, got {self.blocks!r}."
            )
        for name in ("progress_tol", "warm_start_decay", "l2_reg"):
            v = getattr(self, name)
            if base.is_number(v) and not v >= 0:
                raise ValueError(f"{method}: {name} must be >= 0, got {v!r}.")
        base.check_damping(method, self.damping, schedule=False)
        base.check_positive(
            method,
            "min_damping",
            self.min_damping,
            schedule=False,
            fix="min_damping is the floor of the adaptive damping; pass e.g. min_damping=1e-3.",
        )
        ceiling = lm_damping.MAX_DAMPING
        if base.is_number(self.min_damping) and not self.min_damping < ceiling:
            raise ValueError(
                f"{method}: min_damping must be < {ceiling:g}, got {self.min_damping!r}."
            )
        if self.block_combination not in ("sum", "subspace"):
            raise ValueError(
                f"{method}: block_combination must be 'sum' or 'subspace', got "
                f"{self.block_combination!r}."
            )

    def requirements(self) -> extra_args.Requirements:
        names = (extra_args.MODEL_FN, extra_args.OUTPUT_LOSS, extra_args.LOSS_FN)
        return extra_args.Requirements(
            extra_args=names + ((extra_args.SQ_GRADS,) if self.precondition else ())
        )


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


def _check_extra_args(opts: _Options, params, model_fn, output_loss, loss_fn, sq_grads) -> None:
    method = opts.method
    if params is None:
        raise ValueError(f"{method}.update needs `params` (the GGN is linearized there).")
    for name, value in ((extra_args.MODEL_FN, model_fn), (extra_args.OUTPUT_LOSS, output_loss)):
        if value is None:
            raise base.missing_extra_arg(method, name, _fix_line(method))
    if loss_fn is None:
        raise base.missing_extra_arg(method, extra_args.LOSS_FN, _fix_line(method))
    _check_callable(method, extra_args.MODEL_FN, model_fn, "a function params -> outputs")
    _check_callable(method, extra_args.LOSS_FN, loss_fn, "a function params -> scalar loss")
    if opts.precondition and sq_grads is None:
        raise base.missing_extra_arg(
            method,
            extra_args.SQ_GRADS,
            "precondition=True needs the mean squared per-example gradients, e.g.\n"
            "    per_ex = jax.vmap(jax.grad(example_loss), (None, 0, 0))(params, x, y)\n"
            "    sq_grads = jax.tree.map(lambda a: jnp.mean(a**2, 0), per_ex)",
        )
    if opts.precondition:
        base.check_tree_like(method, extra_args.SQ_GRADS, sq_grads, params, "parameters")


def _linearize(opts: _Options, updates, state, params, model_fn, output_loss) -> _Point:
    """The gradient with the L2 term and the (block) GGN at ``θ``, in the state's dtype."""
    dtype = state.damping.dtype
    theta = _cast(params, dtype)
    tau = jnp.asarray(opts.l2_reg, dtype)
    grad = jax.tree.map(lambda g, w: g + tau * w, _cast(updates, dtype), theta)
    lam = state.damping
    bm = ggn.block_masks(params, opts.blocks)

    def model32(p):
        out = model_fn(p)
        return jax.tree.map(
            lambda o: o.astype(dtype) if jnp.issubdtype(o.dtype, jnp.floating) else o, out
        )

    curvature = ggn.linearize_block_ggn(model32, output_loss, theta, bm)
    subspace = bm.num_blocks > 1 and opts.block_combination == "subspace"
    return _Point(dtype, theta, grad, tau, lam, lam + tau, bm, curvature, subspace)


def solve(opts: _Options, point: _Point, previous: PyTree, sq_grads: PyTree) -> BlockCGResult:
    """CG on ``(G + (λ + τ) I) d = -g`` (block by block), warm-started from
    ``warm_start_decay · previous``, keeping the iterates of :func:`backtrack_grid`."""
    shift = point.shift

    def matvec(v):
        return jax.tree.map(lambda gv, a: gv + shift * a, point.curvature.matvec(v), v)

    precond = None
    if opts.precondition:
        precond = jax.tree.map(
            lambda s: (s + shift) ** (-opts.precond_exponent), _cast(sq_grads, point.dtype)
        )
    return block_cg(
        matvec,
        jax.tree.map(jnp.negative, point.grad),
        jax.tree.map(lambda d: opts.warm_start_decay * d, previous),
        max_iters=opts.max_cg_iters,
        blocks=point.blocks,
        progress_tol=opts.progress_tol,
        precond=precond,
        store_at=opts.grid,
    )


def _combine(point: _Point, x: PyTree) -> tuple[PyTree, jax.Array | None]:
    """The step made from the CG iterate ``x`` and, with the subspace combination, its
    model reduction (``None``: the reduction of the step itself, :func:`model_reduction`)."""
    if not point.subspace:
        return x, None
    return subspace_combination(
        x, point.grad, point.curvature, point.blocks, point.shift, point.tau
    )


def _objective(params: PyTree, loss_fn, l2: jax.Array, dtype: Any, step: PyTree) -> jax.Array:
    """``loss_fn(θ + step) + τ/2 |θ + step|²`` (the trial point in the parameters' dtypes)."""
    trial = jax.tree.map(lambda w, s: (w.astype(dtype) + s).astype(w.dtype), params, step)
    reg = 0.5 * l2 * _vdot(_cast(trial, dtype), _cast(trial, dtype))
    return jnp.asarray(loss_fn(trial), dtype) + reg


def _update(opts: _Options, updates, state, params, model_fn, output_loss, loss_fn, sq_grads):
    """One step: CG, combination, backtracking, damping update and line search."""
    point = _linearize(opts, updates, state, params, model_fn, output_loss)
    dtype, tau = point.dtype, point.tau
    res = solve(opts, point, state.direction, sq_grads)

    def objective(step):
        return _objective(params, loss_fn, tau, dtype, step)

    def evaluate(x):
        step, red = _combine(point, x)
        return step, red, objective(step)

    f0 = jnp.asarray(loss_fn(params), dtype) + 0.5 * tau * _vdot(point.theta, point.theta)
    last = evaluate(res.x)
    if opts.grid:
        direction, red, f_p = backtrack_iterates(evaluate, res.stored, res.num_stored, last)
    else:
        direction, red, f_p = last
    if red is None:
        red = model_reduction(point.grad, direction, point.curvature.matvec, tau)
    new_lam = next_damping(point.lam, f0, f_p, red, opts.min_damping)
    if opts.line_search:
        rate = armijo_line_search(objective, point.grad, direction, f0, f_p)
    else:
        rate = jnp.ones([], dtype)
    return _finish(state, updates, res, direction, rate, new_lam)


def _finish(state, updates, res: BlockCGResult, direction, rate, new_lam):
    """``-η d`` in the updates' dtypes (zero for a non-finite step) and the next state."""
    dtype = state.damping.dtype
    ok = linalg.is_finite(direction) & jnp.isfinite(rate)
    out = jax.tree.map(
        lambda d, u: jnp.where(ok, -rate * d, 0.0).astype(u.dtype), direction, updates
    )
    keep = linalg.is_finite(res.x)
    new_state = ScaleByHessianFreeState(
        count=optax.safe_increment(state.count),
        nonfinite_count=state.nonfinite_count,
        damping=new_lam.astype(dtype),
        direction=jax.tree.map(lambda f: jnp.where(keep, f, 0.0), res.x),
        cg_iters=res.iters,
        step_size=jnp.where(ok, rate, 0.0).astype(dtype),
    )
    return out, new_state


def _transform(opts: _Options) -> optax.GradientTransformationExtraArgs:
    def init_fn(params):
        dtype = base.as_float(jax.tree.leaves(params)[0].dtype)
        damping = jnp.asarray(opts.damping, dtype)
        damping = jnp.clip(damping, opts.min_damping, lm_damping.MAX_DAMPING)
        return ScaleByHessianFreeState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            damping=damping,
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
        _check_extra_args(opts, params, model_fn, output_loss, loss_fn, sq_grads)
        return _update(opts, updates, state, params, model_fn, output_loss, loss_fn, sq_grads)

    guarded = safety.guard_nonfinite(
        update_fn, opts.on_nonfinite, opts.method, (extra_args.SQ_GRADS,), init_fn=init_fn
    )
    return optax.GradientTransformationExtraArgs(
        init_fn, extra_args.announce(guarded, opts.requirements())
    )


def _l2_from_deprecated(l2_reg: Any, weight_decay: Any) -> Any:
    """``l2_reg``, or the deprecated spelling ``weight_decay`` of it (with a warning)."""
    if weight_decay is None:
        return l2_reg
    warnings.warn(
        "scale_by_hessian_free: weight_decay is deprecated and will be removed; it is the "
        f"coupled L2 coefficient, now called l2_reg. Pass l2_reg={weight_decay!r} instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    if not (base.is_number(l2_reg) and l2_reg == 0):
        raise ValueError("scale_by_hessian_free: pass l2_reg or weight_decay, not both.")
    return weight_decay


# ---------------------------------------------------------------------------------------------
# Public transforms.


def scale_by_hessian_free(
    damping: float = 1.0,
    *,
    min_damping: float = lm_damping.MIN_DAMPING,
    blocks: Any = "all",
    max_cg_iters: int = 250,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    line_search: bool = True,
    precondition: bool = False,
    precond_exponent: float = 0.75,
    l2_reg: float = 0.0,
    block_combination: str = "subspace",
    on_nonfinite: str = "skip",
    weight_decay: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free direction (full or block-diagonal GGN); no learning rate.

    ``update`` returns ``-η d``, where ``d`` approximately solves
    ``(G + (λ + τ) I) d = -(g + τ θ)`` (block by block for ``blocks != "all"``) and ``η`` is
    the line-search step, so that ``optax.scale_by_learning_rate(1.0)`` applies ``θ + η d``.
    Symbols: ``g = updates``, ``θ = params``, ``λ`` the adaptive damping (initially
    ``damping``), ``τ = l2_reg``, ``G`` the GGN of ``output_loss ∘ model_fn``.

    Args:
      damping: initial Levenberg-Marquardt damping ``λ_0``, adapted every step from the
        reduction ratio (×3/2 below 1/4, ÷3/2 above 3/4) and kept in [``min_damping``, 1e8],
        ``λ_0`` included. Martens' demo starts at 45 for losses summed over outputs.
      min_damping: the floor of ``λ`` (default 1e-8, in effect none). The reduction ratio is
        measured on the gradient batch, so it cannot see a step that overfits it; a floor of
        1e-3 to 1e-2 keeps such steps in check on long runs with small curvature batches
        (see the documentation page and ``benchmarks/RESULTS.md``).
      blocks: ``"all"`` (plain HF), ``"layer"`` (one block per Flax module), ``"leaf"``, or a
        function ``(path, shape) -> label`` (:func:`kfqn_jax._src.ggn.block_masks`; put it in
        ``static_args`` of ``optax.inject_hyperparams``).
      max_cg_iters: CG iteration cap (static). Martens: 250.
      progress_tol: ``ε`` of Martens' relative-progress stopping rule (5e-4).
      warm_start_decay: CG starts from this times the previous step's CG solution (0.95).
      backtracking: pick among the CG iterates at ``⌈5 · 1.3^j⌉`` by ``loss_fn`` (Martens);
        an earlier iterate must be better by more than 8 ulps of the loss. Costs one
        ``loss_fn`` evaluation per iterate visited.
      line_search: Armijo backtracking on the chosen iterate (``c = 1e-2``, shrink 0.8, at most
        60 times, else the step is rejected).
      precondition: precondition CG by ``M = (s + λ + τ)^{precond_exponent}`` element-wise,
        ``s`` the extra arg ``sq_grads`` (mean squared per-example gradients, Martens').
      precond_exponent: the exponent of ``M`` (Martens: 3/4).
      l2_reg: coupled L2 coefficient ``τ``: the objective is ``loss_fn(θ) + τ/2 ||θ||²``, whose
        gradient ``τ θ`` and curvature ``τ I`` are added here (do not also chain
        ``optax.add_decayed_weights``).
      block_combination: how the block solutions ``d_b`` make the step (block-diagonal HF
        only): ``"sum"``, ``d = Σ_b d_b`` as in the paper, with the block-diagonal model in
        the reduction ratio; ``"subspace"`` (default), ``d = Σ_b α_b d_b`` with ``α``
        minimising the damped model with the *full* GGN on the span of the ``d_b``
        (:func:`subspace_combination`), which then also gives the reduction ratio's model;
        one forward-mode product per block and a ``K × K`` solve per candidate step.
      on_nonfinite: ``"skip"`` (default), ``"raise"`` or ``"ignore"``: what a step does when
        the gradients, ``sq_grads`` or its results hold a NaN or an infinity (skip: zero
        updates, the previous state with ``nonfinite_count`` incremented; see
        :mod:`kfqn_jax._src.safety`).
      weight_decay: deprecated spelling of ``l2_reg`` (a ``DeprecationWarning``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params, *,
      model_fn, output_loss, loss_fn[, sq_grads])`` needs ``params`` and the extra args
      (declared for :func:`kfqn_jax.requirements`; ``sq_grads`` only with
      ``precondition=True``):

      * ``model_fn``: ``params -> outputs`` on the curvature batch (may be a slice of the
        gradient batch);
      * ``output_loss``: a :class:`kfqn_jax.losses.Loss` (or its name) whose mean over the
        outputs' leading axes is the curvature-batch loss, or a function ``outputs -> scalar``
        with a positive semi-definite Hessian in the outputs (targets closed over);
      * ``loss_fn``: ``params -> scalar`` training loss on the gradient batch, for the
        reduction ratio, the backtracking and the line search;
      * ``sq_grads`` (only with ``precondition=True``): a tree like ``params``.

      ``updates`` come back in the parameter dtype; the curvature work runs in float32
      (float64 for float64 parameters).
    """
    opts = _Options(
        damping=damping, min_damping=min_damping, blocks=blocks, max_cg_iters=max_cg_iters,
        progress_tol=progress_tol, warm_start_decay=warm_start_decay,
        backtracking=backtracking, line_search=line_search, precondition=precondition,
        precond_exponent=precond_exponent, l2_reg=_l2_from_deprecated(l2_reg, weight_decay),
        block_combination=block_combination, on_nonfinite=on_nonfinite,
    )  # fmt: skip
    opts.check()
    return _transform(opts)


def _alias(method, learning_rate, weight_decay, weight_decay_mask, **kw):
    # The coupled L2 term is HF's own (in its CG system, reduction ratio and line search), so
    # l2_reg goes to scale_by_hessian_free only, not also to the gradient.
    return alias.build(
        method,
        scale_by_hessian_free(**kw),
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        l2_reg=0.0,
    )


def hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1.0,
    *,
    min_damping: float = lm_damping.MIN_DAMPING,
    max_cg_iters: int = 250,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    line_search: bool = True,
    precondition: bool = False,
    precond_exponent: float = 0.75,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: float = 0.0,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free optimization (Martens 2010): CG on the damped Gauss-Newton model.

    Update: ``θ ← θ + α (η d − ω θ)`` with ``d ≈ -(G + (λ + τ) I)^{-1} (∇L + τ θ)`` by at most
    ``max_cg_iters`` CG iterations, ``α = learning_rate`` (1 is Martens' method; the reduction
    ratio and line search assume ``α = 1``), ``η`` the Armijo step, ``λ`` the adaptive damping
    starting at ``damping``, ``τ = l2_reg`` the coupled L2 coefficient (part of the objective
    CG, the reduction ratio and the line search see) and ``ω = weight_decay`` decoupled weight
    decay (after the step, as in ``optax.adamw``; ``weight_decay_mask`` selects the
    parameters). See :func:`scale_by_hessian_free` for every other argument and the extra
    args. Defaults follow Martens' demo code except the initial damping (his 45 suits losses
    summed over many outputs). ``on_nonfinite`` (``"skip"``, ``"raise"`` or ``"ignore"``) says
    what a step with NaN or infinite gradients or results does; by default it is skipped and
    counted in ``nonfinite_count`` of the state.

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
    return _alias(
        "hessian_free", learning_rate, weight_decay, weight_decay_mask,
        damping=damping, min_damping=min_damping, blocks="all", max_cg_iters=max_cg_iters,
        progress_tol=progress_tol, warm_start_decay=warm_start_decay,
        backtracking=backtracking, line_search=line_search, precondition=precondition,
        precond_exponent=precond_exponent, l2_reg=l2_reg, on_nonfinite=on_nonfinite,
    )  # fmt: skip


def block_hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: float = 1.0,
    *,
    min_damping: float = lm_damping.MIN_DAMPING,
    blocks: Any = "layer",
    max_cg_iters: int = 50,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    backtracking: bool = True,
    line_search: bool = True,
    precondition: bool = False,
    precond_exponent: float = 0.75,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: float = 0.0,
    block_combination: str = "subspace",
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Block-diagonal Hessian-free (Zhang et al. 2017): independent CG per block.

    Update as :func:`hessian_free` (``weight_decay`` decoupled, ``l2_reg`` coupled) with the
    GGN restricted to ``diag(G_11, ..., G_KK)``: every block solves
    ``(G_bb + (λ + τ) I) d_b = -(∇L + τ θ)_b`` with its own CG (all blocks batched in one
    loop; block ``b``'s product runs only the part of the model downstream of its
    parameters), and the block solutions are combined (``block_combination``: by default
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

    Defaults chosen here (arXiv 1712.07296 does not state its constants):
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
    return _alias(
        "block_hessian_free", learning_rate, weight_decay, weight_decay_mask,
        damping=damping, min_damping=min_damping, blocks=blocks, max_cg_iters=max_cg_iters,
        progress_tol=progress_tol, warm_start_decay=warm_start_decay,
        backtracking=backtracking, line_search=line_search, precondition=precondition,
        precond_exponent=precond_exponent, l2_reg=l2_reg,
        block_combination=block_combination, on_nonfinite=on_nonfinite,
    )  # fmt: skip
