r"""SMW-NG and SMW-GN: subsampled natural gradient and Gauss-Newton via Sherman-Morrison-Woodbury.

Ren & Goldfarb (2019). With a curvature subsample of ``m`` examples, the damped subsampled
Fisher (or Gauss-Newton) matrix is ``λI`` plus a matrix of rank ``m`` (or ``m·c`` for ``c``
model outputs):

.. math::

    C = \frac{1}{m} J^T J, \qquad
    (C + λ I)^{-1} g = \frac{1}{λ} \Big[ g - \frac{1}{m} J^T \big(\tfrac{1}{m} K + λ I\big)^{-1}
    J g \Big], \qquad K = J J^T,

so only an ``m × m`` (or ``mc × mc``) Cholesky solve is needed. ``J`` is never formed: its rows
are per-example gradients (SMW-NG) or per-example, per-output Jacobian rows (SMW-GN), and for a
Dense or Conv layer ``l`` the row ``r`` of ``J`` restricted to the layer is the matrix
``u_r = Σ_t ã_{i(r) t} ⊗ γ_{r t}`` (``ã``: homogeneous layer input, ``γ``: per-row cotangent of
the layer output, ``t``: positions). Hence

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
loss rises. ``pred`` is ``½ ĝ^T d`` (``lm_model="damped"``, default: the reduction predicted by
the damped quadratic model, as in the authors' later code) or ``g^T d - ½ d^T (C + τI) d``
(``"undamped"``, their earlier code). The trial point is the full step ``θ - d`` whatever the
learning rate ``α``; the step taken is ``θ - α d`` (as in the authors' code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfqn_jax._src import base, linalg, safety
from kfqn_jax._src import layers as layers_lib
from kfqn_jax._src import losses as losses_lib
from kfqn_jax._src.base import LayerMeta, LayerStats

KINDS = ("dense", "conv")
GRAM_MODES = ("auto", "positions", "per_example")
LM_MODELS = ("damped", "undamped")

# Extra-arg names of SMW-GN (besides ``loss_fn``).
PROBE_STATS_FN = "probe_stats_fn"
MODEL_OUTPUTS = "model_outputs"


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
# Low-rank curvature from per-layer inputs and per-row cotangents.


@dataclasses.dataclass(frozen=True)
class _Block:
    """One layer's factors of ``J``: inputs ``a`` ``(m, T, d_a)``, cotangents ``g``
    ``(s, m, T, d_o)`` (rows ``r = (k, i)``), and the per-example gradients ``u``
    ``(s, m, d_a, d_o)`` when the per-example contraction is used."""

    a: jax.Array
    g: jax.Array
    u: jax.Array | None


def _use_per_example(a_shape, g_shape, mode: str) -> bool:
    if mode != "auto":
        return mode == "per_example"
    m, t, da = a_shape
    s, _, _, do = g_shape
    r = s * m
    cost_positions = (m * t) ** 2 * da + (r * t) ** 2 * do + r**2 * t**2
    cost_per_example = r * t * da * do + r**2 * da * do
    return cost_per_example < cost_positions


def _make_block(a: jax.Array, g: jax.Array, mode: str) -> _Block:
    u = None
    if _use_per_example(a.shape, g.shape, mode):
        u = jnp.einsum("itd,kite->kide", a, g)
    return _Block(a, g, u)


def _gram(blocks: Sequence[_Block], rows: int, dtype: Any) -> jax.Array:
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


def _jvp_rows(blocks: Sequence[_Block], mats: Sequence[jax.Array]) -> jax.Array:
    """``J v`` (``(rows,)``) for ``v`` given per layer as homogeneous ``(d_a, d_o)`` matrices."""
    out = 0.0
    for b, v in zip(blocks, mats, strict=True):
        if b.u is not None:
            out = out + jnp.einsum("kide,de->ki", b.u, v).reshape(-1)
        else:
            av = jnp.einsum("itd,de->ite", b.a, v)
            out = out + jnp.einsum("ite,kite->ki", av, b.g).reshape(-1)
    return out


def _vjp_rows(blocks: Sequence[_Block], w: jax.Array) -> list[jax.Array]:
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
    blocks: Sequence[_Block], grads: Sequence[jax.Array], num_examples: int, damping: jax.Array
) -> tuple[list[jax.Array], jax.Array]:
    r"""``(C + λI)^{-1} g`` restricted to the blocks, with ``C = J^T J / m``.

    Returns the per-layer directions and the Gram ``K`` (for diagnostics and the LM model).
    """
    rows = blocks[0].g.shape[0] * blocks[0].g.shape[1]
    dtype = grads[0].dtype
    k_mat = _gram(blocks, rows, dtype)
    jg = _jvp_rows(blocks, grads)
    v_hat = linalg.damped_cholesky_solve(k_mat / num_examples, jg, damping)
    back = _vjp_rows(blocks, v_hat)
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


# ---------------------------------------------------------------------------------------------
# The transformation, shared by both methods.


def _check_common(
    method, damping, momentum, lm_factor, lm_thresholds, lm_model, gram_mode, bounds, cbatch
):
    base.check_damping(method, damping)
    base.check_fraction(method, "momentum", momentum)
    if base.is_number(lm_factor) and not lm_factor >= 1.0:
        raise ValueError(
            f"{method}: lm_factor must be >= 1, got {lm_factor!r}; the authors use 1.01."
        )
    lo, hi = lm_thresholds
    if base.is_number(lo) and base.is_number(hi) and not lo <= hi:
        raise ValueError(
            f"{method}: lm_thresholds must be (low, high) with low <= high, got "
            f"{lm_thresholds}; the authors use (0.25, 0.75)."
        )
    base.check_choice(method, "lm_model", lm_model, LM_MODELS)
    base.check_choice(method, "gram_mode", gram_mode, GRAM_MODES)
    lo_b, hi_b = bounds
    if base.is_number(lo_b) and base.is_number(hi_b) and not 0 < lo_b < hi_b:
        raise ValueError(
            f"{method}: damping_bounds must be (min, max) with 0 < min < max, got {bounds}; "
            "e.g. (1e-8, 1e8)."
        )
    if cbatch is not None:
        base.check_positive_int(method, "curvature_batch", cbatch, what=" or None (whole batch)")


def _smw_transform(
    method: str,
    curvature: Callable[..., tuple[list[LayerMeta], list[_Block], int]],
    required: tuple[str, ...],
    *,
    damping,
    l2: float,
    momentum: float,
    adapt_damping: bool,
    lm_factor,
    lm_thresholds,
    lm_model: str,
    lm_reject: bool,
    damping_bounds,
    layers: Any,
    fallback: optax.GradientTransformation | None,
    on_nonfinite: str,
) -> optax.GradientTransformationExtraArgs:
    """The common body of both methods; ``curvature(updates, dtype, extra, count)`` returns the
    blocks' metas, their ``J`` factors and the number of curvature examples ``m``."""

    def blocks_of(tree):
        return layers_lib.resolve_layers(tree, layers, KINDS)

    masked_fallback = None
    if fallback is not None:
        masked_fallback = optax.masked(
            fallback, lambda t: layers_lib.uncovered_mask(t, blocks_of(t))
        )

    def init_fn(params):
        dtype = base.as_float(jax.tree_util.tree_leaves(params)[0].dtype)
        lam0 = damping(0) if callable(damping) else damping
        if adapt_damping:  # the adapted damping lives in damping_bounds from the start
            lam0 = jnp.clip(jnp.asarray(lam0, dtype), damping_bounds[0], damping_bounds[1])
        mom = ()
        if momentum > 0:
            mom = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
        return ScaleBySMWState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            damping=jnp.asarray(lam0, dtype),
            rho=jnp.zeros([], dtype),
            momentum=mom,
            fallback_state=masked_fallback.init(params) if masked_fallback is not None else (),
        )

    def update_fn(updates, state, params=None, **extra):
        for name in required:
            if extra.get(name) is None:
                raise base.missing_extra_arg(method, name, _FIXES[name])
        if adapt_damping and extra.get(base.LOSS_FN) is None:
            raise base.missing_extra_arg(method, base.LOSS_FN, _FIXES[base.LOSS_FN])
        if adapt_damping and params is None:
            raise ValueError(f"{method}: Levenberg-Marquardt damping needs `params` in update.")
        dtype = state.damping.dtype
        count = state.count
        if adapt_damping:
            lam = state.damping
        else:
            lam = jnp.asarray(damping(count) if callable(damping) else damping, dtype)
        lam_eff = lam + jnp.asarray(l2, dtype)

        grads32 = jax.tree.map(lambda g: g.astype(dtype), updates)
        if momentum > 0:
            k = count.astype(dtype)
            beta = jnp.minimum(1.0 - 1.0 / (k + 1.0), jnp.asarray(momentum, dtype))
            g_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, state.momentum, grads32)
            new_mom = g_hat
        else:
            g_hat = grads32
            new_mom = ()

        metas, blocks, num = curvature(updates, dtype, extra, count)
        leaves, index, treedef = layers_lib.leaf_index(g_hat)
        idx = []
        mats = []
        for m in metas:
            ki = base.match_path(tuple(m.kernel_path), index)
            bi = base.match_path(tuple(m.bias_path), index) if m.has_bias else None
            idx.append((ki, bi))
            bias = leaves[bi] if bi is not None else None
            mats.append(layers_lib.homogeneous_grad(leaves[ki], bias, m))
        # Parameters outside every block: zero curvature, so the SMW direction is g / λ'.
        d_leaves = [leaf / lam_eff for leaf in leaves]
        if blocks:
            dirs, _ = smw_direction(blocks, mats, num, lam_eff)
            for m, (ki, bi), dmat in zip(metas, idx, dirs, strict=True):
                w, b = layers_lib.split_homogeneous(dmat, m)
                d_leaves[ki] = w
                if bi is not None:
                    d_leaves[bi] = b
        fallback_d = [leaf / lam_eff for leaf in leaves]
        ok = linalg.is_finite(d_leaves)
        d_leaves = [jnp.where(ok, a, b) for a, b in zip(d_leaves, fallback_d, strict=True)]
        direction = jax.tree_util.tree_unflatten(treedef, d_leaves)

        fb_state = state.fallback_state
        if masked_fallback is not None:
            fb_out, fb_state = masked_fallback.update(updates, state.fallback_state, params)
            mask = layers_lib.uncovered_mask(updates, metas)
            direction = jax.tree.map(
                lambda use_fb, d, f: f.astype(dtype) if use_fb else d,
                mask,
                direction,
                fb_out,
            )

        new_lam, rho = lam, jnp.zeros([], dtype)
        if adapt_damping:
            rho = _reduction_ratio(
                extra, params, direction, grads32, g_hat, blocks, metas, num, l2, lm_model, dtype
            )
            lo, hi = lm_thresholds
            factor = jnp.asarray(lm_factor, dtype)
            new_lam = jnp.where(rho < lo, lam * factor, jnp.where(rho > hi, lam / factor, lam))
            new_lam = jnp.clip(new_lam, damping_bounds[0], damping_bounds[1]).astype(dtype)
            new_lam = jnp.where(jnp.isfinite(new_lam), new_lam, lam)

        if adapt_damping and lm_reject:
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

    checked = (base.LAYER_STATS, MODEL_OUTPUTS, "value")
    guarded = safety.guard_nonfinite(update_fn, on_nonfinite, method, checked, init_fn=init_fn)
    return optax.GradientTransformationExtraArgs(init_fn, guarded)


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _reduction_ratio(extra, params, direction, grads, g_hat, blocks, metas, num, l2, lm_model, dt):
    """``ρ = (L(θ) - L(θ - d)) / pred`` with ``L`` the minibatch loss plus ``τ/2 |θ|^2``."""
    loss_fn = extra[base.LOSS_FN]

    def total(p):
        val = jnp.asarray(loss_fn(p), dt)
        if l2:
            val = val + 0.5 * l2 * _tree_vdot(p, p).astype(dt)
        return val

    current = extra.get("value")
    if current is None:
        current = total(params)
    else:
        current = jnp.asarray(current, dt)
        if l2:
            current = current + 0.5 * l2 * _tree_vdot(params, params).astype(dt)
    trial_params = jax.tree.map(lambda p, d: p - d.astype(p.dtype), params, direction)
    trial = total(trial_params)
    if lm_model == "damped":
        pred = 0.5 * _tree_vdot(g_hat, direction)
    else:
        pred = _tree_vdot(grads, direction)
        curv = jnp.asarray(0.0, dt)
        if blocks:
            leaves, index, _ = layers_lib.leaf_index(direction)
            mats = []
            for m in metas:
                ki = base.match_path(tuple(m.kernel_path), index)
                bi = base.match_path(tuple(m.bias_path), index) if m.has_bias else None
                mats.append(
                    layers_lib.homogeneous_grad(
                        leaves[ki], leaves[bi] if bi is not None else None, m
                    )
                )
            jd = _jvp_rows(blocks, mats)
            curv = jnp.vdot(jd, jd) / num
        if l2:
            curv = curv + l2 * _tree_vdot(direction, direction)
        pred = pred - 0.5 * curv
    actual = current - trial
    good = (actual >= 0) & (pred > 0) & jnp.isfinite(actual) & jnp.isfinite(pred)
    return jnp.where(good, actual / jnp.where(pred > 0, pred, 1.0), -jnp.inf).astype(dt)


_FIXES = {
    base.LAYER_STATS: base.stats_fix_line(),
    base.LOSS_FN: (
        "Levenberg-Marquardt damping evaluates the minibatch loss at the trial point, e.g.\n"
        "    loss_fn = lambda p: loss(model.apply({'params': p}, x), y)\n"
        "    tx.update(grads, opt_state, params, ..., loss_fn=loss_fn)\n"
        "or build the optimizer with adapt_damping=False."
    ),
    PROBE_STATS_FN: (
        "It maps output cotangents v of shape (m, c) to the layer statistics on the m curvature "
        "examples, e.g.\n"
        "    probe_stats_fn = lambda v: kfqn_jax.flax.layer_stats(model, params, x[:m], "
        "targets=v, loss=kfqn_jax.OutputProbe())\n"
        "(with model_outputs=...). Alternatively pass layer_stats captured with "
        "value_grads_and_stats(..., exact_fisher=True)."
    ),
    MODEL_OUTPUTS: (
        "Pass the model outputs (logits) on the batch, e.g. model_outputs=out.aux['outputs'] "
        "from kfqn_jax.flax.value_grads_and_stats; the first m rows are used."
    ),
}


# ---------------------------------------------------------------------------------------------
# SMW-NG.


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
        as ``τ/2 |θ|^2`` to the loss of the LM ratio. It does not add ``τθ`` to the gradient:
        :func:`smw_ng` does that with ``weight_decay``.
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
        contract to the Gram (identical results; see the module docstring).
      layers: the captured layers to precondition: ``None`` guesses them from parameter names,
        or a sequence of :class:`LayerMeta` (``kfqn_jax.flax.layer_metas``).
      fallback: transform for parameters outside the captured Dense/Conv layers (norm scales,
        embeddings). Default ``None``: they get ``ĝ / λ'``, i.e. they are treated as having zero
        curvature, which is the SMW direction of the block-diagonal Fisher whose block for them
        is zero. Per-example gradients of such parameters (through ``vmap``) are not formed.
      ON_NONFINITE

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``layer_stats`` (captured
      with ``sampled="cotangents"`` for ``fisher="true"``), and ``loss_fn`` (``params ->`` the
      minibatch loss) with ``adapt_damping``; it accepts ``value`` (the loss at ``params``) to
      save one forward pass.
    """
    base.check_choice("smw_ng", "fisher", fisher, ("true", "empirical"))
    _check_common(
        "smw_ng",
        damping,
        momentum,
        lm_factor,
        lm_thresholds,
        lm_model,
        gram_mode,
        damping_bounds,
        curvature_batch,
    )

    def curvature(updates, dtype, extra, count):
        del count
        layer_stats = extra[base.LAYER_STATS]
        metas = layers_lib.resolve_layers(updates, layers, KINDS)
        base.check_layer_stats("smw_ng", layer_stats)
        stats = layers_lib.match_stats("smw_ng", metas, layer_stats)
        blocks = []
        num = 0
        for s in stats:
            g = s.g_sampled if fisher == "true" else s.g
            if g is None:
                raise ValueError(
                    f"smw_ng(fisher='true') needs sampled-label cotangents for layer "
                    f"{s.meta.name!r}: capture with sampled='cotangents' (and rng=...), or use "
                    "fisher='empirical'."
                )
            batch = s.a.shape[0]
            num = batch if curvature_batch is None else curvature_batch
            if num > batch:
                raise ValueError(
                    f"smw_ng: curvature_batch={num} exceeds the captured batch of {batch}."
                )
            a = layers_lib.inputs_matrix(s)[:num].astype(dtype)
            gam = (g[:num].astype(dtype) * batch)[None]
            blocks.append(_make_block(a, gam, gram_mode))
        return list(metas), blocks, num

    return _smw_transform(
        "smw_ng",
        curvature,
        (base.LAYER_STATS,),
        damping=damping,
        l2=l2,
        momentum=momentum,
        adapt_damping=adapt_damping,
        lm_factor=lm_factor,
        lm_thresholds=lm_thresholds,
        lm_model=lm_model,
        lm_reject=lm_reject,
        damping_bounds=damping_bounds,
        layers=layers,
        fallback=fallback,
        on_nonfinite=on_nonfinite,
    )


scale_by_smw_ng.__doc__ = scale_by_smw_ng.__doc__.replace("ON_NONFINITE", safety.ON_NONFINITE_DOC)


def _alias(scale_by, learning_rate, weight_decay, **kwargs):
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(scale_by(l2=weight_decay, **kwargs))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def smw_ng(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: optax.ScalarOrSchedule = 1.0,
    *,
    weight_decay: float = 0.0,
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

        θ ← θ - α (F + (λ + τ) I)^{-1} ĝ, \qquad
        F = \frac{1}{m} \sum_{i<m} ∇ℓ_i ∇ℓ_i^T, \qquad ĝ = ∇L(θ) + τθ \;(\text{or its EMA}),

    with ``α = learning_rate``, ``λ = damping`` (adapted by Levenberg-Marquardt), ``τ =
    weight_decay``, ``m = curvature_batch``. ``(F + λ'I)^{-1} ĝ`` costs one ``m × m`` Cholesky
    solve of ``K/m + λ'I`` with ``K = Σ_l (Ã_l Ã_l^T) ∘ (Γ_l Γ_l^T)`` built from the captured
    layer inputs ``Ã_l`` and per-example output cotangents ``Γ_l`` (no per-example gradient
    of the network is formed), and a back-projection ``J^T v̂`` per layer. Keyword arguments
    are those of :func:`scale_by_smw_ng`; ``curvature_batch``, ``momentum``, ``weight_decay``,
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

    References:
      Ren & Goldfarb, `Efficient Subsampled Gauss-Newton and Natural Gradient Methods for
      Training Neural Networks <https://arxiv.org/abs/1906.02353>`_, 2019.
    """
    return _alias(
        scale_by_smw_ng,
        learning_rate,
        weight_decay,
        damping=damping,
        fisher=fisher,
        curvature_batch=curvature_batch,
        momentum=momentum,
        adapt_damping=adapt_damping,
        lm_factor=lm_factor,
        lm_thresholds=lm_thresholds,
        lm_model=lm_model,
        lm_reject=lm_reject,
        damping_bounds=damping_bounds,
        gram_mode=gram_mode,
        layers=layers,
        fallback=fallback,
        on_nonfinite=on_nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# SMW-GN.


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
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs:

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

      Alternatively, without ``probe_stats_fn``: ``layer_stats`` captured with
      ``kfqn_jax.flax.value_grads_and_stats(..., exact_fisher=True)``, whose ``g_exact`` holds
      the same cotangents for all ``c`` outputs on the whole batch (``c`` backward passes over
      ``B`` rather than ``m`` examples; ``Q`` then comes from the capture's loss, and
      ``output_samples`` only shrinks the system, not the backward cost).
    """
    if output_samples is not None:
        base.check_positive_int("smw_gn", "output_samples", output_samples, what=" or None (all)")
    base.check_choice("smw_gn", "output_sampling", output_sampling, ("columns", "sketch"))
    base.check_positive_int("smw_gn", "max_system_size", max_system_size)
    _check_common(
        "smw_gn",
        damping,
        momentum,
        lm_factor,
        lm_thresholds,
        lm_model,
        gram_mode,
        damping_bounds,
        curvature_batch,
    )
    loss_obj = losses_lib.as_loss(loss)

    def n_directions(c: int, num: int) -> int:
        n_dirs = c if output_samples is None or output_samples >= c else output_samples
        if num * n_dirs > max_system_size:
            raise ValueError(
                f"smw_gn: the Gauss-Newton system would be {num * n_dirs} x {num * n_dirs} "
                f"(curvature batch m={num} times {n_dirs} output directions), above "
                f"max_system_size={max_system_size}. Use output_samples=s (s random output "
                f"directions per step, e.g. s={max(1, max_system_size // num)}), a smaller "
                "curvature_batch, or raise max_system_size."
            )
        return n_dirs

    def directions(c: int, num: int, count):
        n_dirs = n_directions(c, num)
        if n_dirs == c:
            return jnp.arange(c), 1.0
        key = jax.random.fold_in(jax.random.key(seed), count)
        return jax.random.choice(key, c, (n_dirs,), replace=False), (c / n_dirs) ** 0.5

    def sketch_signs(c: int, num: int, count, dtype):
        """Rademacher signs ``(s, m, c)`` for ``output_sampling="sketch"`` with ``s < c``;
        ``None`` when the output columns themselves are used."""
        n_dirs = n_directions(c, num)
        if output_sampling != "sketch" or n_dirs == c:
            return None
        key = jax.random.fold_in(jax.random.key(seed), count)
        return jax.random.rademacher(key, (n_dirs, num, c), dtype)

    def from_exact(updates, dtype, layer_stats, count):
        # Rows from the capture's exact-GGN cotangents (value_grads_and_stats(...,
        # exact_fisher=True)): all c outputs on the whole batch, then the first m examples.
        metas = layers_lib.resolve_layers(updates, layers, KINDS)
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
            num = batch if curvature_batch is None else curvature_batch
            if num > batch:
                raise ValueError(
                    f"smw_gn: curvature_batch={num} exceeds the captured batch of {batch}."
                )
            c = st.g_exact.shape[0]
            a = layers_lib.inputs_matrix(st)[:num].astype(dtype)
            signs = sketch_signs(c, num, count, dtype)
            if signs is not None:
                # Backprop is linear: the sketch of the columns' cotangents is their signed sum.
                g_cols = st.g_exact[:, :num].astype(dtype)
                gam = jnp.einsum("cn...,snc->sn...", g_cols, signs)
                gam = gam * (batch / jnp.sqrt(float(signs.shape[0])))
            else:
                cols, scale = directions(c, num, count)
                gam = st.g_exact[cols, :num].astype(dtype) * (batch * scale)
            blocks.append(_make_block(a, gam, gram_mode))
        return list(metas), blocks, num

    def curvature(updates, dtype, extra, count):
        probe_fn = extra.get(PROBE_STATS_FN)
        if probe_fn is None:
            if extra.get(base.LAYER_STATS) is not None:
                return from_exact(updates, dtype, extra[base.LAYER_STATS], count)
            raise base.missing_extra_arg("smw_gn", PROBE_STATS_FN, _FIXES[PROBE_STATS_FN])
        if extra.get(MODEL_OUTPUTS) is None:
            raise base.missing_extra_arg("smw_gn", MODEL_OUTPUTS, _FIXES[MODEL_OUTPUTS])
        outputs = jnp.asarray(extra[MODEL_OUTPUTS])
        metas = layers_lib.resolve_layers(updates, layers, KINDS)
        if outputs.ndim != 2:
            raise ValueError(
                f"smw_gn: model_outputs must have shape (batch, outputs), got {outputs.shape}."
            )
        c = outputs.shape[-1]
        num = outputs.shape[0] if curvature_batch is None else curvature_batch
        if num > outputs.shape[0]:
            raise ValueError(
                f"smw_gn: curvature_batch={num} but model_outputs has only {outputs.shape[0]} rows."
            )
        if not metas:
            return [], [], num
        z = jax.lax.stop_gradient(outputs[:num]).astype(dtype)
        signs = sketch_signs(c, num, count, dtype)
        if signs is not None:
            probes = hessian_sqrt_sketch(loss_obj, z, signs) / jnp.sqrt(float(signs.shape[0]))
        else:
            cols, scale = directions(c, num, count)
            probes = hessian_sqrt_columns(loss_obj, z, cols) * scale  # (s, m, c)
        stats_all = jax.vmap(probe_fn)(probes.astype(outputs.dtype))
        # Per-layer statistics: inputs do not depend on the probe (take one copy).
        stats = layers_lib.match_stats("smw_gn", metas, stats_all)
        blocks = []
        for st in stats:
            if st.a.shape[1] != num:
                raise ValueError(
                    f"smw_gn: probe_stats_fn returned layer {st.meta.name!r} with "
                    f"{st.a.shape[1]} examples, expected {num}."
                )
            a = layers_lib.inputs_matrix(LayerStats(a=st.a[0], g=st.g[0], meta=st.meta)).astype(
                dtype
            )
            gam = st.g.astype(dtype) * num  # cotangent of the probe mean -> per example
            blocks.append(_make_block(a, gam, gram_mode))
        return list(metas), blocks, num

    return _smw_transform(
        "smw_gn",
        curvature,
        (),
        damping=damping,
        l2=l2,
        momentum=momentum,
        adapt_damping=adapt_damping,
        lm_factor=lm_factor,
        lm_thresholds=lm_thresholds,
        lm_model=lm_model,
        lm_reject=lm_reject,
        damping_bounds=damping_bounds,
        layers=layers,
        fallback=fallback,
        on_nonfinite=on_nonfinite,
    )


def smw_gn(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    damping: optax.ScalarOrSchedule = 1.0,
    *,
    loss: Any = "softmax_cross_entropy",
    weight_decay: float = 0.0,
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

        θ ← θ - α \Big(\frac{1}{m} \sum_{i<m} J_i^T Q_i J_i + (λ + τ) I\Big)^{-1} ĝ,

    with ``α = learning_rate``, ``λ = damping`` (adapted by Levenberg-Marquardt), ``τ =
    weight_decay``, ``J_i = ∂z_i/∂θ``, ``Q_i = ∇²_z ℓ_i`` for ``loss`` (softmax or sigmoid
    cross-entropy, squared error, or any :class:`kfqn_jax.losses.Loss`), ``ĝ`` the gradient
    plus ``τθ`` (or its moving average). Costs ``c`` backward passes over the ``m`` curvature
    examples and an ``(mc) × (mc)`` Cholesky solve; ``output_samples`` bounds ``c``. Keyword
    arguments are those of :func:`scale_by_smw_gn`; ``curvature_batch``, ``output_samples``,
    ``max_system_size``, ``seed``, ``momentum``, ``weight_decay``, ``adapt_damping`` and
    ``lm_reject`` are static. Steps with non-finite values are skipped and counted
    (``on_nonfinite``, as in :func:`smw_ng`).

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

    References:
      Ren & Goldfarb, `Efficient Subsampled Gauss-Newton and Natural Gradient Methods for
      Training Neural Networks <https://arxiv.org/abs/1906.02353>`_, 2019.
    """
    return _alias(
        scale_by_smw_gn,
        learning_rate,
        weight_decay,
        damping=damping,
        loss=loss,
        curvature_batch=curvature_batch,
        output_samples=output_samples,
        output_sampling=output_sampling,
        max_system_size=max_system_size,
        seed=seed,
        momentum=momentum,
        adapt_damping=adapt_damping,
        lm_factor=lm_factor,
        lm_thresholds=lm_thresholds,
        lm_model=lm_model,
        lm_reject=lm_reject,
        damping_bounds=damping_bounds,
        gram_mode=gram_mode,
        layers=layers,
        fallback=fallback,
        on_nonfinite=on_nonfinite,
    )
