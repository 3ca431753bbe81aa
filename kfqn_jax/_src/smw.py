r"""SMW-NG and SMW-GN: subsampled natural gradient and Gauss-Newton via Sherman-Morrison-Woodbury.

Ren & Goldfarb (2019). With a curvature subsample of ``m`` examples, the damped subsampled
Fisher (or Gauss-Newton) matrix ``C = J^T J / m`` plus ``λI`` is inverted through the Woodbury
identity, so only an ``m × m`` (or ``mc × mc`` for ``c`` model outputs) Cholesky solve is
needed; ``J`` is never formed. The kernel (the Gram ``K = J J^T`` from per-layer inputs and
per-row cotangents, ``J v``, ``J^T w``, the exact conv contractions chosen by ``gram_mode``) is
``kfqn_jax._src.woodbury``; this module builds the rows of ``J`` and the transforms.

Rows of ``J``
-------------
* **SMW-NG** (:func:`scale_by_smw_ng`): ``γ_{i t} = B g_{i t}`` for the first ``m`` examples of
  the captured batch of size ``B`` (``g`` is the cotangent of the batch-mean loss, so ``B g`` is
  the per-example one). The cotangents are those of labels sampled from the model
  (``fisher="true"``, default: the Fisher) or of the training labels (``"empirical"``).
* **SMW-GN** (:func:`scale_by_smw_gn`): with ``Q_i = L_i L_i^T`` the Hessian of the per-example
  loss with respect to the model outputs ``z_i`` (``c`` outputs), the Gauss-Newton matrix
  ``(1/m) Σ_i J_i^T Q_i J_i`` has rows ``L_i[:, k]^T J_i``: the backward pass of the
  cotangent ``L_i[:, k]`` (one pass per ``k``, vectorised with ``jax.vmap``). Closed forms of
  ``L_i``: softmax cross-entropy ``diag(√p) - p √p^T``; sigmoid cross-entropy
  ``diag(√(p(1-p)))``; squared error ``I / σ``; any other :class:`kfqn_jax.losses.Loss` through
  ``eigh`` of its Hessian. This gives a symmetric system solved by Cholesky; the authors' code
  solves the equivalent non-symmetric ``(KQ/m + λI)`` with LU (the two are algebraically equal).

Levenberg-Marquardt damping
---------------------------
After the direction ``d = (C + λ' I)^{-1} ĝ`` (``λ' = λ + τ``, ``τ`` the L2 coefficient folded
into the damping, ``ĝ`` the gradient or its moving average) the loss is evaluated at the trial
point ``θ - d`` on the same minibatch (``loss_fn`` extra arg) and

.. math::

    ρ = \frac{L(θ) - L(θ - d)}{\mathrm{pred}}, \qquad
    λ ← \begin{cases} ω λ & ρ < ρ_{lo} \\ λ / ω & ρ > ρ_{hi} \\ λ & \text{else} \end{cases}

with ``ω = 1.01``, ``ρ_lo = 0.25``, ``ρ_hi = 0.75`` (the authors' code) and ``ρ = -∞`` when the
loss rises (the shared controller ``lm_damping.LevenbergMarquardt`` and
``lm_damping.reduction_ratio``). ``pred`` is ``½ ĝ^T d``
(``lm_model="damped"``, default: the reduction predicted by the damped quadratic model, as in
the authors' later code) or ``g^T d - ½ d^T (C + τI) d`` (``"undamped"``, their earlier code).
The trial point is the full step ``θ - d`` whatever the learning rate ``α``; the step taken is
``θ - α d`` (as in the authors' code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfqn_jax._src import alias, base, extra_args, linalg, lm_damping, safety, woodbury
from kfqn_jax._src import layers as layers_lib
from kfqn_jax._src import losses as losses_lib
from kfqn_jax._src.base import LayerMeta, LayerStats

KINDS = ("dense", "conv")
GRAM_MODES = woodbury.GRAM_MODES
LM_MODELS = ("damped", "undamped")


class ScaleBySMWState(NamedTuple):
    """State of :func:`scale_by_smw_ng` and :func:`scale_by_smw_gn`.

    Attributes:
      count: number of steps taken (int32); a skipped step (see ``on_nonfinite``) does not
        count.
      nonfinite_count: number of steps skipped because of non-finite values (int32).
      damping: the current Levenberg-Marquardt damping ``λ`` (scalar, float32 or float64),
        kept within ``damping_bounds``.
      rho: the last reduction ratio ``ρ`` (0 before the first step and without LM; a rising
        loss, ``ρ = -∞``, is stored as the most negative finite float so the state stays
        finite).
      momentum: moving average ``ĝ`` of the gradient (tree like the parameters, float32), or
        ``()`` without momentum.
      fallback_state: state of the user's ``fallback`` transform, or ``()``.
    """

    count: jax.Array
    nonfinite_count: jax.Array
    damping: jax.Array
    rho: jax.Array
    momentum: Any
    fallback_state: Any


@dataclasses.dataclass(frozen=True)
class OutputProbe(losses_lib.Loss):
    """The linear "loss" ``ℓ_i = <z_i, v_i>``, whose output cotangent is the probe ``v_i``.

    Pass it to :func:`kfqn_jax.flax.layer_stats` with ``targets=v`` to obtain, in each
    layer's ``g``, the backward pass of the cotangents ``v / m`` (``m`` the batch): this is how
    SMW-GN gets per-example output-Jacobian rows from the Flax capture (see
    :func:`scale_by_smw_gn`). It has no predictive distribution.
    """

    name: str = dataclasses.field(default="output_probe", init=False)

    def per_example(self, outputs, targets):
        return jnp.sum(outputs * jnp.asarray(targets, outputs.dtype), axis=-1)

    def sample(self, rng, outputs):
        raise TypeError("OutputProbe has no predictive distribution.")

    def hvp(self, outputs, v):
        return jnp.zeros_like(v)


# ---------------------------------------------------------------------------------------------
# The transformation, shared by both methods.


@dataclasses.dataclass(frozen=True)
class _Options:
    """The arguments both methods share (documented in :func:`scale_by_smw_ng`)."""

    method: str
    damping: Any
    curvature_batch: int | None
    l2: float
    momentum: float
    adapt_damping: bool
    lm_factor: Any
    lm_thresholds: Any
    lm_model: str
    lm_reject: bool
    damping_bounds: Any
    gram_mode: str
    layers: Any
    fallback: optax.GradientTransformation | None
    on_nonfinite: str

    def check(self) -> None:
        method = self.method
        base.check_damping(method, self.damping)
        base.check_fraction(method, "momentum", self.momentum)
        if base.is_number(self.lm_factor) and not self.lm_factor >= 1.0:
            raise ValueError(
                f"{method}: lm_factor must be >= 1, got {self.lm_factor!r}; the authors use 1.01."
            )
        lo, hi = self.lm_thresholds
        if base.is_number(lo) and base.is_number(hi) and not lo <= hi:
            raise ValueError(
                f"{method}: lm_thresholds must be (low, high) with low <= high, got "
                f"{self.lm_thresholds}; the authors use (0.25, 0.75)."
            )
        base.check_choice(method, "lm_model", self.lm_model, LM_MODELS)
        base.check_choice(method, "gram_mode", self.gram_mode, GRAM_MODES)
        lo_b, hi_b = self.damping_bounds
        if base.is_number(lo_b) and base.is_number(hi_b) and not 0 < lo_b < hi_b:
            raise ValueError(
                f"{method}: damping_bounds must be (min, max) with 0 < min < max, got "
                f"{self.damping_bounds}; e.g. (1e-8, 1e8)."
            )
        if self.curvature_batch is not None:
            base.check_positive_int(
                method, "curvature_batch", self.curvature_batch, what=" or None (whole batch)"
            )

    def controller(self) -> lm_damping.LevenbergMarquardt:
        lo, hi = self.lm_thresholds
        floor, ceiling = self.damping_bounds
        return lm_damping.LevenbergMarquardt(lo, hi, self.lm_factor, floor, ceiling)

    def metas(self, tree: Any) -> tuple[LayerMeta, ...]:
        return layers_lib.resolve_layers(tree, self.layers, KINDS)


#: ``curvature(updates, dtype, extra, count)`` returns the blocks' metas, their ``J`` factors
#: and the number of curvature examples ``m``.
Curvature = Callable[..., tuple[list[LayerMeta], list[woodbury.Block], int]]


def _smw_transform(
    opts: _Options,
    curvature: Curvature,
    required: tuple[str, ...],
    reqs: extra_args.Requirements,
) -> optax.GradientTransformationExtraArgs:
    """The common body of both methods: init, the guarded update and its requirements
    (``opts`` already checked)."""
    masked_fallback = None
    if opts.fallback is not None:
        masked_fallback = optax.masked(
            opts.fallback, lambda t: layers_lib.uncovered_mask(t, opts.metas(t))
        )

    def init_fn(params):
        return _init(opts, masked_fallback, params)

    def update_fn(updates, state, params=None, **extra):
        return _update(opts, curvature, required, masked_fallback, updates, state, params, extra)

    checked = (extra_args.LAYER_STATS, extra_args.MODEL_OUTPUTS, "value")
    guarded = safety.guard_nonfinite(
        update_fn, opts.on_nonfinite, opts.method, checked, init_fn=init_fn
    )
    return optax.GradientTransformationExtraArgs(init_fn, extra_args.announce(guarded, reqs))


def _init(opts: _Options, masked_fallback, params) -> ScaleBySMWState:
    dtype = base.as_float(jax.tree_util.tree_leaves(params)[0].dtype)
    lam0 = opts.damping(0) if callable(opts.damping) else opts.damping
    if opts.adapt_damping:  # the adapted damping lives in damping_bounds from the start
        lo, hi = opts.damping_bounds
        lam0 = jnp.clip(jnp.asarray(lam0, dtype), lo, hi)
    mom = ()
    if opts.momentum > 0:
        mom = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
    return ScaleBySMWState(
        count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        damping=jnp.asarray(lam0, dtype),
        rho=jnp.zeros([], dtype),
        momentum=mom,
        fallback_state=masked_fallback.init(params) if masked_fallback is not None else (),
    )


def _check_extra(opts: _Options, required, extra, params) -> None:
    for name in required:
        if extra.get(name) is None:
            raise base.missing_extra_arg(opts.method, name, _FIXES[name])
    if opts.adapt_damping and extra.get(extra_args.LOSS_FN) is None:
        raise base.missing_extra_arg(opts.method, extra_args.LOSS_FN, _FIXES[extra_args.LOSS_FN])
    if opts.adapt_damping and params is None:
        raise ValueError(f"{opts.method}: Levenberg-Marquardt damping needs `params` in update.")


def _update(opts: _Options, curvature, required, masked_fallback, updates, state, params, extra):
    """One step (before the non-finite guard): direction, fallback, LM damping, new state."""
    _check_extra(opts, required, extra, params)
    dtype = state.damping.dtype
    count = state.count
    if opts.adapt_damping:
        lam = state.damping
    else:
        lam = jnp.asarray(opts.damping(count) if callable(opts.damping) else opts.damping, dtype)
    lam_eff = lam + jnp.asarray(opts.l2, dtype)
    grads32, g_hat, new_mom = _averaged_gradient(opts.momentum, updates, state, dtype)

    metas, blocks, num = curvature(updates, dtype, extra, count)
    direction = _smw_tree(g_hat, metas, blocks, num, lam_eff)

    fb_state = state.fallback_state
    if masked_fallback is not None:
        fb_out, fb_state = masked_fallback.update(updates, state.fallback_state, params)
        mask = layers_lib.uncovered_mask(updates, metas)
        direction = jax.tree.map(
            lambda use_fb, d, f: f.astype(dtype) if use_fb else d, mask, direction, fb_out
        )

    new_lam, rho = lam, jnp.zeros([], dtype)
    if opts.adapt_damping:
        rho = _reduction_ratio(
            opts, extra, params, direction, grads32, g_hat, blocks, metas, num, dtype
        )
        new_lam = opts.controller().update(lam, rho)
        if opts.lm_reject:
            # rho is -inf exactly when the trial loss rose or was not finite.
            accept = rho > -jnp.inf
            direction = jax.tree.map(lambda d: jnp.where(accept, d, jnp.zeros_like(d)), direction)
    out = jax.tree.map(lambda d, u: d.astype(u.dtype), direction, updates)
    new_state = ScaleBySMWState(
        count=optax.safe_increment(count),
        nonfinite_count=state.nonfinite_count,
        damping=new_lam,
        rho=jnp.maximum(rho, jnp.finfo(dtype).min).astype(dtype),
        momentum=new_mom,
        fallback_state=fb_state,
    )
    return out, new_state


def _averaged_gradient(momentum: float, updates, state: ScaleBySMWState, dtype):
    """``(g, ĝ, new momentum state)``: the gradient in ``dtype`` and its moving average."""
    grads32 = jax.tree.map(lambda g: g.astype(dtype), updates)
    if momentum > 0:
        k = state.count.astype(dtype)
        beta = jnp.minimum(1.0 - 1.0 / (k + 1.0), jnp.asarray(momentum, dtype))
        g_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.momentum, grads32)
        return grads32, g_hat, g_hat
    return grads32, grads32, ()


def _layer_matrices(tree, metas):
    """The leaves of ``tree``, its treedef, the ``(kernel, bias)`` leaf indices of each layer
    and the layers' homogeneous ``(d_a, d_o)`` matrices."""
    leaves, index, treedef = layers_lib.leaf_index(tree)
    idx, mats = [], []
    for m in metas:
        ki = base.match_path(tuple(m.kernel_path), index)
        bi = base.match_path(tuple(m.bias_path), index) if m.has_bias else None
        idx.append((ki, bi))
        bias = leaves[bi] if bi is not None else None
        mats.append(layers_lib.homogeneous_grad(leaves[ki], bias, m))
    return leaves, treedef, idx, mats


def _smw_tree(g_hat, metas, blocks, num, lam_eff):
    """``(C + λ'I)^{-1} ĝ`` as a tree like ``ĝ``; ``ĝ / λ'`` outside the blocks, and
    everywhere when the solve is not finite."""
    leaves, treedef, idx, mats = _layer_matrices(g_hat, metas)
    # Parameters outside every block: zero curvature, so the SMW direction is g / λ'.
    d_leaves = [leaf / lam_eff for leaf in leaves]
    if blocks:
        dirs, _ = woodbury.smw_direction(blocks, mats, num, lam_eff)
        for m, (ki, bi), dmat in zip(metas, idx, dirs, strict=True):
            w, b = layers_lib.split_homogeneous(dmat, m)
            d_leaves[ki] = w
            if bi is not None:
                d_leaves[bi] = b
    fallback_d = [leaf / lam_eff for leaf in leaves]
    ok = linalg.is_finite(d_leaves)
    d_leaves = [jnp.where(ok, a, b) for a, b in zip(d_leaves, fallback_d, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, d_leaves)


def _has_l2(l2: Any) -> bool:
    """Whether the L2 terms are formed: not for a static zero (an ``l2`` traced by
    ``optax.inject_hyperparams`` may be zero at run time, and then adds exactly zero)."""
    return not (base.is_number(l2) and l2 == 0)


def _objective(value, params, l2: Any, dt):
    """The minibatch loss ``value`` plus ``τ/2 |θ|^2``, in ``dt``."""
    val = jnp.asarray(value, dt)
    if _has_l2(l2):
        val = val + 0.5 * l2 * optax.tree_utils.tree_vdot(params, params).astype(dt)
    return val


def _reduction_ratio(
    opts: _Options, extra, params, direction, grads, g_hat, blocks, metas, num, dt
) -> jax.Array:
    """``ρ = (L(θ) - L(θ - d)) / pred`` with ``L`` the minibatch loss plus ``τ/2 |θ|^2``."""
    l2 = opts.l2
    loss_fn = extra[extra_args.LOSS_FN]
    value = extra.get("value")
    current = _objective(loss_fn(params) if value is None else value, params, l2, dt)
    trial_params = jax.tree.map(lambda p, d: p - d.astype(p.dtype), params, direction)
    trial = _objective(loss_fn(trial_params), trial_params, l2, dt)
    vdot = optax.tree_utils.tree_vdot
    if opts.lm_model == "damped":
        pred = 0.5 * vdot(g_hat, direction)
    else:
        pred = vdot(grads, direction)
        curv = jnp.asarray(0.0, dt)
        if blocks:
            jd = woodbury.jvp_rows(blocks, _layer_matrices(direction, metas)[3])
            curv = jnp.vdot(jd, jd) / num
        if _has_l2(l2):
            curv = curv + l2 * vdot(direction, direction)
        pred = pred - 0.5 * curv
    return lm_damping.reduction_ratio(current, trial, pred).astype(dt)


_FIXES = {
    extra_args.LAYER_STATS: base.stats_fix_line(),
    extra_args.LOSS_FN: (
        "Levenberg-Marquardt damping evaluates the minibatch loss at the trial point, e.g.\n"
        "    loss_fn = lambda p: loss(model.apply({'params': p}, x), y)\n"
        "    tx.update(grads, opt_state, params, ..., loss_fn=loss_fn)\n"
        "or build the optimizer with adapt_damping=False."
    ),
    extra_args.PROBE_STATS_FN: (
        "It maps output cotangents v of shape (m, c) to the layer statistics on the m curvature "
        "examples, e.g.\n"
        "    probe_stats_fn = lambda v: kfqn_jax.flax.layer_stats(model, params, x[:m], "
        "targets=v, loss=kfqn_jax.OutputProbe())\n"
        "(with model_outputs=...). Alternatively pass layer_stats captured with "
        "value_grads_and_stats(..., exact_fisher=True)."
    ),
    extra_args.MODEL_OUTPUTS: (
        "Pass the model outputs (logits) on the batch, e.g. model_outputs=out.aux['outputs'] "
        "from kfqn_jax.flax.value_grads_and_stats; the first m rows are used."
    ),
}


def _lm_needs(adapt_damping: bool) -> tuple[str, ...]:
    return (extra_args.LOSS_FN,) if adapt_damping else ()


# ---------------------------------------------------------------------------------------------
# SMW-NG.


@dataclasses.dataclass(frozen=True)
class _FisherRows:
    """SMW-NG's rows of ``J``: per-example gradients of the first ``m`` captured examples."""

    fisher: str
    opts: _Options

    def __call__(self, updates, dtype, extra, count):
        del count
        layers, cbatch, mode = self.opts.layers, self.opts.curvature_batch, self.opts.gram_mode
        layer_stats = extra[extra_args.LAYER_STATS]
        metas = layers_lib.resolve_layers(updates, layers, KINDS)
        base.check_layer_stats("smw_ng", layer_stats)
        stats = layers_lib.match_stats("smw_ng", metas, layer_stats)
        blocks = []
        num = 0
        for s in stats:
            g = s.g_sampled if self.fisher == "true" else s.g
            if g is None:
                raise ValueError(
                    f"smw_ng(fisher='true') needs sampled-label cotangents for layer "
                    f"{s.meta.name!r}: capture with sampled='cotangents' (and rng=...), or use "
                    "fisher='empirical'."
                )
            batch = s.a.shape[0]
            num = batch if cbatch is None else cbatch
            if num > batch:
                raise ValueError(
                    f"smw_ng: curvature_batch={num} exceeds the captured batch of {batch}."
                )
            a = layers_lib.inputs_matrix(s)[:num].astype(dtype)
            gam = (g[:num].astype(dtype) * batch)[None]
            blocks.append(woodbury.make_block(a, gam, mode))
        return list(metas), blocks, num


def scale_by_smw_ng(
    damping: optax.ScalarOrSchedule = 1.0,
    *,
    fisher: str = "true",
    curvature_batch: int | None = None,
    l2: float = 0.0,
    momentum: float = 0.0,
    adapt_damping: bool = True,
    lm_factor: float = 1.01,
    lm_thresholds: tuple[float, float] = (0.25, 0.75),
    lm_model: str = "damped",
    lm_reject: bool = False,
    damping_bounds: tuple[float, float] = (1e-8, 1e8),
    gram_mode: str = "auto",
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions with the damped subsampled Fisher through SMW; no learning rate.

    Returns ``d = (F + λ' I)^{-1} ĝ`` with ``F = (1/m) Σ_{i<m} ∇ℓ_i ∇ℓ_i^T`` over the first
    ``m = curvature_batch`` examples of the captured batch, ``λ' = damping + l2`` and ``ĝ`` the
    gradient (or its moving average). See the module docstring for the identity and the
    Levenberg-Marquardt rule; :func:`smw_ng` adds the learning rate.

    Args:
      damping: the initial ``λ`` with ``adapt_damping`` (a schedule is evaluated at step 0),
        else ``λ`` itself (scalar or schedule).
      fisher: ``"true"`` (default): per-example gradients of labels sampled from the model
        (capture with ``sampled="cotangents"``); ``"empirical"``: of the training labels.
      curvature_batch: ``m``, the number of leading examples of the captured batch that form
        the curvature subsample (static int); ``None``: the whole batch. Shuffle the data, as
        usual, so that the first ``m`` are a random subsample.
      l2: L2 coefficient ``τ`` folded into the damping of the solve (``λ' = λ + τ``) and added
        as ``τ/2 |θ|^2`` to the loss of the LM ratio (a scalar, which
        ``optax.inject_hyperparams`` may trace). It does not add ``τθ`` to the gradient:
        :func:`smw_ng` does that with ``l2_reg``.
      momentum: ``β_max`` of the gradient moving average ``ĝ ← β_k ĝ + (1 - β_k) g`` with
        ``β_k = min(1 - 1/(k+1), β_max)`` (the authors' rule, unbiased from the first step);
        0 (default) disables it. Static.
      adapt_damping: Levenberg-Marquardt adaptation of ``λ`` (needs the ``loss_fn`` extra arg).
      lm_factor: ``ω``: ``λ ← ωλ`` when ``ρ < ρ_lo``, ``λ ← λ/ω`` when ``ρ > ρ_hi``.
      lm_thresholds: ``(ρ_lo, ρ_hi)``.
      lm_model: the predicted reduction: ``"damped"`` ``½ ĝ^T d`` or ``"undamped"``
        ``g^T d - ½ d^T (F + τI) d`` (see the module docstring).
      lm_reject: reject steps that do not decrease the loss: when the trial loss
        ``L(θ - d)`` is above ``L(θ)`` (or not finite), the update is zero (``λ`` still grows
        by ``ω``), as in classical Levenberg-Marquardt. Default ``False``: the authors' code
        always takes the step. With a fast ``lm_factor`` (e.g. 1.5) this lets ``λ`` shrink
        quickly without a single bad step ruining the run.
      damping_bounds: ``λ`` is clipped to ``[min, max]`` at the start and after each
        adaptation (with ``adapt_damping``): ``min`` is the damping floor.
      gram_mode: ``"auto"``, ``"positions"`` or ``"per_example"``: how conv layers (``T > 1``)
        contract to the Gram (identical results; see ``kfqn_jax._src.woodbury``).
      layers: the captured layers to precondition: ``None`` guesses them from parameter names,
        or a sequence of :class:`LayerMeta` (``kfqn_jax.flax.layer_metas``).
      fallback: transform for parameters outside the captured Dense/Conv layers (norm scales,
        embeddings). Default ``None``: they get ``ĝ / λ'``, i.e. they are treated as having zero
        curvature, which is the SMW direction of the block-diagonal Fisher whose block for them
        is zero. Per-example gradients of such parameters (through ``vmap``) are not formed.
      on_nonfinite: what a step does when the gradients, the statistics it is given, or
        the updates and state it produces hold a NaN or an infinity: ``"skip"``
        (default) returns zero updates and the previous state with ``nonfinite_count``
        incremented (so ``count`` does not advance either); ``"raise"`` raises a
        ``FloatingPointError`` from the device (under ``jit``, surfaced by JAX as a
        ``jax.errors.JaxRuntimeError`` carrying that message); ``"ignore"`` does not
        check.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``layer_stats``
      (captured with ``sampled="cotangents"`` for ``fisher="true"``) and, with
      ``adapt_damping``, ``loss_fn`` (``params ->`` the minibatch loss); it accepts ``value``
      (the loss at ``params``) to save one forward pass. It declares these requirements to
      :func:`kfqn_jax.requirements`.
    """
    base.check_choice("smw_ng", "fisher", fisher, ("true", "empirical"))
    opts = _Options(
        method="smw_ng", damping=damping, curvature_batch=curvature_batch, l2=l2,
        momentum=momentum, adapt_damping=adapt_damping, lm_factor=lm_factor,
        lm_thresholds=lm_thresholds, lm_model=lm_model, lm_reject=lm_reject,
        damping_bounds=damping_bounds, gram_mode=gram_mode, layers=layers, fallback=fallback,
        on_nonfinite=on_nonfinite,
    )  # fmt: skip
    opts.check()
    reqs = extra_args.Requirements(
        extra_args=(extra_args.LAYER_STATS, *_lm_needs(adapt_damping)),
        sampled="cotangents" if fisher == "true" else None,
    )
    return _smw_transform(opts, _FisherRows(fisher, opts), (extra_args.LAYER_STATS,), reqs)


def smw_ng(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: optax.ScalarOrSchedule = 1.0,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: float = 0.0,
    fisher: str = "true",
    curvature_batch: int | None = None,
    momentum: float = 0.0,
    adapt_damping: bool = True,
    lm_factor: float = 1.01,
    lm_thresholds: tuple[float, float] = (0.25, 0.75),
    lm_model: str = "damped",
    lm_reject: bool = False,
    damping_bounds: tuple[float, float] = (1e-8, 1e8),
    gram_mode: str = "auto",
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""SMW-NG: natural gradient with the subsampled Fisher, solved by Sherman-Morrison-Woodbury.

    .. math::

        θ ← θ - α \big[(F + (λ + λ_2) I)^{-1} ĝ + τθ\big], \qquad
        F = \frac{1}{m} \sum_{i<m} ∇ℓ_i ∇ℓ_i^T, \qquad ĝ = ∇L(θ) + λ_2θ \;(\text{or its EMA}),

    with ``α = learning_rate``, ``λ = damping`` (adapted by Levenberg-Marquardt), ``λ₂ =
    l2_reg`` (coupled L2: added to the gradient, folded into the damping and into the loss of
    the LM ratio), ``τ = weight_decay`` (decoupled, after the preconditioner, on the parameters
    selected by ``weight_decay_mask``; before kfqn_jax 0.2 ``weight_decay`` meant ``l2_reg``),
    ``m = curvature_batch``. ``(F + λ'I)^{-1} ĝ`` costs one ``m × m`` Cholesky solve of
    ``K/m + λ'I`` with ``K = Σ_l (Ã_l Ã_l^T) ∘ (Γ_l Γ_l^T)`` built from the captured layer
    inputs ``Ã_l`` and per-example output cotangents ``Γ_l`` (no per-example gradient of the
    network is formed), and a back-projection ``J^T v̂`` per layer. The other keyword
    arguments are those of :func:`scale_by_smw_ng`; ``curvature_batch``, ``momentum``,
    ``adapt_damping`` and ``lm_reject`` are static for ``optax.inject_hyperparams``.
    ``on_nonfinite`` (``"skip"``, ``"raise"`` or ``"ignore"``) says what a step with NaN or
    infinite gradients, statistics or results does; by default it is skipped and counted in
    ``nonfinite_count`` of the state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> from kfqn_jax import flax as kfx
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 1])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> loss = kfqn_jax.losses.softmax_cross_entropy()
      >>> tx = kfqn_jax.smw_ng(learning_rate=1.0, damping=1.0, curvature_batch=2)
      >>> opt_state = tx.init(params)
      >>> out = kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss,
      ...     rng=jax.random.key(1), sampled="cotangents")
      >>> loss_fn = lambda p: loss(model.apply({"params": p}, x), y)
      >>> updates, opt_state = tx.update(out.grads, opt_state, params,
      ...     layer_stats=out.stats, loss_fn=loss_fn, value=out.loss)
      >>> params = optax.apply_updates(params, updates)

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the extra arguments
      of :func:`scale_by_smw_ng`.

    References:
      Ren & Goldfarb, `Efficient Subsampled Gauss-Newton and Natural Gradient Methods for
      Training Neural Networks <https://arxiv.org/abs/1906.02353>`_, 2019.
    """
    inner = scale_by_smw_ng(
        damping, fisher=fisher, curvature_batch=curvature_batch, l2=l2_reg, momentum=momentum,
        adapt_damping=adapt_damping, lm_factor=lm_factor, lm_thresholds=lm_thresholds,
        lm_model=lm_model, lm_reject=lm_reject, damping_bounds=damping_bounds,
        gram_mode=gram_mode, layers=layers, fallback=fallback, on_nonfinite=on_nonfinite,
    )  # fmt: skip
    return alias.build(
        "smw_ng",
        inner,
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        l2_reg=l2_reg,
    )


# ---------------------------------------------------------------------------------------------
# SMW-GN.


@dataclasses.dataclass(frozen=True)
class _GaussNewtonRows:
    """SMW-GN's rows of ``J``: backward passes of the columns (or sketches) of ``L_i``, from
    ``probe_stats_fn`` or from the capture's exact-GGN cotangents ``g_exact``."""

    loss: losses_lib.Loss
    output_samples: int | None
    output_sampling: str
    max_system_size: int
    seed: int
    opts: _Options

    def n_directions(self, c: int, num: int) -> int:
        s = self.output_samples
        n_dirs = c if s is None or s >= c else s
        if num * n_dirs > self.max_system_size:
            raise ValueError(
                f"smw_gn: the Gauss-Newton system would be {num * n_dirs} x {num * n_dirs} "
                f"(curvature batch m={num} times {n_dirs} output directions), above "
                f"max_system_size={self.max_system_size}. Use output_samples=s (s random output "
                f"directions per step, e.g. s={max(1, self.max_system_size // num)}), a smaller "
                "curvature_batch, or raise max_system_size."
            )
        return n_dirs

    def directions(self, c: int, num: int, count):
        """The output columns used this step and their scale ``√(c/s)``."""
        n_dirs = self.n_directions(c, num)
        if n_dirs == c:
            return jnp.arange(c), 1.0
        key = jax.random.fold_in(jax.random.key(self.seed), count)
        return jax.random.choice(key, c, (n_dirs,), replace=False), (c / n_dirs) ** 0.5

    def sketch_signs(self, c: int, num: int, count, dtype):
        """Rademacher signs ``(s, m, c)`` for ``output_sampling="sketch"`` with ``s < c``;
        ``None`` when the output columns themselves are used."""
        n_dirs = self.n_directions(c, num)
        if self.output_sampling != "sketch" or n_dirs == c:
            return None
        key = jax.random.fold_in(jax.random.key(self.seed), count)
        return jax.random.rademacher(key, (n_dirs, num, c), dtype)

    def from_exact(self, updates, dtype, layer_stats, count):
        """Rows from the capture's exact-GGN cotangents (``value_grads_and_stats(...,
        exact_fisher=True)``): all ``c`` outputs on the whole batch, then the first ``m``."""
        metas = self.opts.metas(updates)
        base.check_layer_stats("smw_gn", layer_stats)
        stats = layers_lib.match_stats("smw_gn", metas, layer_stats)
        blocks, num = [], 1
        for st in stats:
            if st.g_exact is None:
                raise ValueError(
                    f"smw_gn: layer {st.meta.name!r} has no g_exact: capture with "
                    "kfqn_jax.flax.value_grads_and_stats(..., exact_fisher=True), or pass "
                    "probe_stats_fn and model_outputs."
                )
            batch = st.a.shape[0]
            num = batch if self.opts.curvature_batch is None else self.opts.curvature_batch
            if num > batch:
                raise ValueError(
                    f"smw_gn: curvature_batch={num} exceeds the captured batch of {batch}."
                )
            c = st.g_exact.shape[0]
            a = layers_lib.inputs_matrix(st)[:num].astype(dtype)
            signs = self.sketch_signs(c, num, count, dtype)
            if signs is not None:
                # Backprop is linear: the sketch of the columns' cotangents is their signed sum.
                g_cols = st.g_exact[:, :num].astype(dtype)
                gam = jnp.einsum("cn...,snc->sn...", g_cols, signs)
                gam = gam * (batch / jnp.sqrt(float(signs.shape[0])))
            else:
                cols, scale = self.directions(c, num, count)
                gam = st.g_exact[cols, :num].astype(dtype) * (batch * scale)
            blocks.append(woodbury.make_block(a, gam, self.opts.gram_mode))
        return list(metas), blocks, num

    def __call__(self, updates, dtype, extra, count):
        probe_fn = extra.get(extra_args.PROBE_STATS_FN)
        if probe_fn is None:
            if extra.get(extra_args.LAYER_STATS) is not None:
                return self.from_exact(updates, dtype, extra[extra_args.LAYER_STATS], count)
            name = extra_args.PROBE_STATS_FN
            raise base.missing_extra_arg("smw_gn", name, _FIXES[name])
        if extra.get(extra_args.MODEL_OUTPUTS) is None:
            name = extra_args.MODEL_OUTPUTS
            raise base.missing_extra_arg("smw_gn", name, _FIXES[name])
        outputs = jnp.asarray(extra[extra_args.MODEL_OUTPUTS])
        metas = self.opts.metas(updates)
        if outputs.ndim != 2:
            raise ValueError(
                f"smw_gn: model_outputs must have shape (batch, outputs), got {outputs.shape}."
            )
        c, cbatch = outputs.shape[-1], self.opts.curvature_batch
        num = outputs.shape[0] if cbatch is None else cbatch
        if num > outputs.shape[0]:
            raise ValueError(
                f"smw_gn: curvature_batch={num} but model_outputs has only {outputs.shape[0]} rows."
            )
        if not metas:
            return [], [], num
        z = jax.lax.stop_gradient(outputs[:num]).astype(dtype)
        signs = self.sketch_signs(c, num, count, dtype)
        if signs is not None:
            probes = woodbury.hessian_sqrt_sketch(self.loss, z, signs)
            probes = probes / jnp.sqrt(float(signs.shape[0]))
        else:
            cols, scale = self.directions(c, num, count)
            probes = woodbury.hessian_sqrt_columns(self.loss, z, cols) * scale  # (s, m, c)
        stats_all = jax.vmap(probe_fn)(probes.astype(outputs.dtype))
        return list(metas), self.probe_blocks(metas, stats_all, num, dtype), num

    def probe_blocks(self, metas, stats_all, num: int, dtype) -> list[woodbury.Block]:
        """Blocks of the probes' statistics (vmapped over the ``s`` directions)."""
        # Per-layer statistics: inputs do not depend on the probe (take one copy).
        stats = layers_lib.match_stats("smw_gn", metas, stats_all)
        blocks = []
        for st in stats:
            if st.a.shape[1] != num:
                raise ValueError(
                    f"smw_gn: probe_stats_fn returned layer {st.meta.name!r} with "
                    f"{st.a.shape[1]} examples, expected {num}."
                )
            one = LayerStats(a=st.a[0], g=st.g[0], meta=st.meta)
            a = layers_lib.inputs_matrix(one).astype(dtype)
            gam = st.g.astype(dtype) * num  # cotangent of the probe mean -> per example
            blocks.append(woodbury.make_block(a, gam, self.opts.gram_mode))
        return blocks


def scale_by_smw_gn(
    damping: optax.ScalarOrSchedule = 1.0,
    *,
    loss: Any = "softmax_cross_entropy",
    curvature_batch: int | None = None,
    output_samples: int | None = None,
    output_sampling: str = "columns",
    max_system_size: int = 8192,
    seed: int = 0,
    l2: float = 0.0,
    momentum: float = 0.0,
    adapt_damping: bool = True,
    lm_factor: float = 1.01,
    lm_thresholds: tuple[float, float] = (0.25, 0.75),
    lm_model: str = "damped",
    lm_reject: bool = False,
    damping_bounds: tuple[float, float] = (1e-8, 1e8),
    gram_mode: str = "auto",
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions with the damped subsampled Gauss-Newton matrix through SMW.

    Returns ``d = (G + λ' I)^{-1} ĝ`` with ``G = (1/m) Σ_{i<m} J_i^T Q_i J_i``, ``J_i`` the
    Jacobian of the outputs ``z_i`` (``c`` of them) with respect to the parameters and ``Q_i``
    the Hessian of the per-example loss with respect to ``z_i``. The ``(mc) × (mc)`` system is
    symmetric (``Q_i = L_i L_i^T``, see the module docstring) and solved by Cholesky.

    Args:
      damping: as in :func:`scale_by_smw_ng`.
      loss: the loss on the outputs (a :class:`kfqn_jax.losses.Loss` or its name), for ``Q``.
      curvature_batch: ``m`` (static int): the first ``m`` rows of ``model_outputs`` are the
        curvature examples, and ``probe_stats_fn`` must run exactly these. ``None``: all rows.
      output_samples: ``s``: use ``s < c`` random columns of ``L_i`` per step (the same for
        all examples), scaled by ``√(c/s)`` so that ``G`` is unbiased, and solve an
        ``(ms) × (ms)`` system instead. ``None``: all ``c``. Static. Columns come from
        ``fold_in(key(seed), step)``.
      output_sampling: how the ``s`` directions are drawn: ``"columns"`` (default) as above,
        or ``"sketch"``: ``s`` random sign combinations ``L_i r / √s`` of all columns, per
        example (also unbiased). For losses with diagonal Hessians and many outputs (an
        autoencoder's pixels), a column covers one output and a sketch covers all of them,
        so the sketch estimate of ``G`` has far less variance. Static.
      max_system_size: largest ``m·c`` (or ``m·s``) allowed (static). A larger system raises
        ``ValueError`` at trace time, naming ``output_samples`` and the curvature batch.
      seed: seed of the output subsampling (static).
      l2, momentum, adapt_damping, lm_factor, lm_thresholds: as in :func:`scale_by_smw_ng`.
      lm_model, lm_reject, damping_bounds, gram_mode, layers, fallback, on_nonfinite: as in
        :func:`scale_by_smw_ng`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs (and declares to
      :func:`kfqn_jax.requirements`):

      * ``probe_stats_fn``: ``v -> dict[str, LayerStats]`` for output cotangents ``v`` of
        shape ``(m, c)``: the layer statistics of the linear loss ``mean_i <z_i, v_i>`` on the
        ``m`` curvature examples, i.e.
        ``lambda v: kfqn_jax.flax.layer_stats(model, params, x[:m], targets=v,
        loss=kfqn_jax.OutputProbe())``. It is called under ``jax.vmap`` over the ``c`` (or
        ``s``) output directions: one forward and ``c`` backward passes.
      * ``model_outputs``: the model outputs ``(B, c)`` with ``B >= m`` (the first ``m`` rows
        are the curvature examples), e.g. ``out.aux["outputs"]`` of the capture. Only 2-D
        outputs (one event axis, no sequence axis) are supported.
      * ``loss_fn`` with ``adapt_damping`` (``value`` optional), as for SMW-NG.

      Alternatively (declared optional), without ``probe_stats_fn``: ``layer_stats`` captured
      with ``kfqn_jax.flax.value_grads_and_stats(..., exact_fisher=True)``, whose ``g_exact``
      holds the same cotangents for all ``c`` outputs on the whole batch (``c`` backward passes
      over ``B`` rather than ``m`` examples; ``Q`` then comes from the capture's loss, and
      ``output_samples`` only shrinks the system, not the backward cost).
    """
    if output_samples is not None:
        base.check_positive_int("smw_gn", "output_samples", output_samples, what=" or None (all)")
    base.check_choice("smw_gn", "output_sampling", output_sampling, ("columns", "sketch"))
    base.check_positive_int("smw_gn", "max_system_size", max_system_size)
    opts = _Options(
        method="smw_gn", damping=damping, curvature_batch=curvature_batch, l2=l2,
        momentum=momentum, adapt_damping=adapt_damping, lm_factor=lm_factor,
        lm_thresholds=lm_thresholds, lm_model=lm_model, lm_reject=lm_reject,
        damping_bounds=damping_bounds, gram_mode=gram_mode, layers=layers, fallback=fallback,
        on_nonfinite=on_nonfinite,
    )  # fmt: skip
    opts.check()
    rows = _GaussNewtonRows(
        losses_lib.as_loss(loss), output_samples, output_sampling, max_system_size, seed, opts
    )
    reqs = extra_args.Requirements(
        extra_args=(
            *_lm_needs(adapt_damping), extra_args.MODEL_OUTPUTS, extra_args.PROBE_STATS_FN
        ),
        optional=(extra_args.LAYER_STATS,),
    )
    return _smw_transform(opts, rows, (), reqs)


def smw_gn(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: optax.ScalarOrSchedule = 1.0,
    *,
    loss: Any = "softmax_cross_entropy",
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: float = 0.0,
    curvature_batch: int | None = None,
    output_samples: int | None = None,
    output_sampling: str = "columns",
    max_system_size: int = 8192,
    seed: int = 0,
    momentum: float = 0.0,
    adapt_damping: bool = True,
    lm_factor: float = 1.01,
    lm_thresholds: tuple[float, float] = (0.25, 0.75),
    lm_model: str = "damped",
    lm_reject: bool = False,
    damping_bounds: tuple[float, float] = (1e-8, 1e8),
    gram_mode: str = "auto",
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""SMW-GN: subsampled Gauss-Newton with Levenberg-Marquardt damping, solved through SMW.

    .. math::

        θ ← θ - α \Big[\Big(\frac{1}{m} \sum_{i<m} J_i^T Q_i J_i + (λ + λ_2) I\Big)^{-1} ĝ
        + τθ\Big],

    with ``α = learning_rate``, ``λ = damping`` (adapted by Levenberg-Marquardt), ``λ₂ =
    l2_reg`` (coupled L2, as in :func:`smw_ng`), ``τ = weight_decay`` (decoupled, masked by
    ``weight_decay_mask``), ``J_i = ∂z_i/∂θ``, ``Q_i = ∇²_z ℓ_i`` for ``loss`` (softmax or
    sigmoid cross-entropy, squared error, or any :class:`kfqn_jax.losses.Loss`), ``ĝ`` the
    gradient plus ``λ₂θ`` (or its moving average). Costs ``c`` backward passes over the ``m``
    curvature examples and an ``(mc) × (mc)`` Cholesky solve; ``output_samples`` bounds ``c``.
    The other keyword arguments are those of :func:`scale_by_smw_gn`; ``curvature_batch``,
    ``output_samples``, ``max_system_size``, ``seed``, ``momentum``, ``adapt_damping`` and
    ``lm_reject`` are static. Steps with non-finite values are skipped
    and counted (``on_nonfinite``, as in :func:`smw_ng`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> from kfqn_jax import flax as kfx
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 1])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> loss = kfqn_jax.losses.softmax_cross_entropy()
      >>> m = 2  # curvature subsample: the first m examples
      >>> tx = kfqn_jax.smw_gn(learning_rate=1.0, damping=1.0, loss=loss, curvature_batch=m)
      >>> opt_state = tx.init(params)
      >>> value, grads = jax.value_and_grad(lambda p: loss(model.apply({"params": p}, x), y))(
      ...     params)
      >>> updates, opt_state = tx.update(grads, opt_state, params, value=value,
      ...     model_outputs=model.apply({"params": params}, x[:m]),
      ...     probe_stats_fn=lambda v: kfx.layer_stats(model, params, x[:m], targets=v,
      ...                                                loss=kfqn_jax.OutputProbe()),
      ...     loss_fn=lambda p: loss(model.apply({"params": p}, x), y))
      >>> params = optax.apply_updates(params, updates)

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the extra arguments
      of :func:`scale_by_smw_gn`.

    References:
      Ren & Goldfarb, `Efficient Subsampled Gauss-Newton and Natural Gradient Methods for
      Training Neural Networks <https://arxiv.org/abs/1906.02353>`_, 2019.
    """
    inner = scale_by_smw_gn(
        damping, loss=loss, curvature_batch=curvature_batch, output_samples=output_samples,
        output_sampling=output_sampling, max_system_size=max_system_size, seed=seed,
        l2=l2_reg, momentum=momentum, adapt_damping=adapt_damping, lm_factor=lm_factor,
        lm_thresholds=lm_thresholds, lm_model=lm_model, lm_reject=lm_reject,
        damping_bounds=damping_bounds, gram_mode=gram_mode, layers=layers, fallback=fallback,
        on_nonfinite=on_nonfinite,
    )  # fmt: skip
    return alias.build(
        "smw_gn",
        inner,
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        l2_reg=l2_reg,
    )
