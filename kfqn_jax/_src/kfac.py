"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016).

For a Dense or Conv layer with homogeneous inputs ``ã = [a, 1]`` and output cotangents ``g``,
the Fisher block of the layer is approximated by ``A ⊗ G`` with

.. math::

    A = \\frac{1}{B} \\sum_{b,t} ã_{bt} ã_{bt}^T, \\qquad
    G = \\frac{1}{B |T|} \\sum_{b,t} (B g_{bt}) (B g_{bt})^T,

where ``B`` is the batch size, ``T`` the positions (conv output locations, sequence steps; one
for an MLP layer) and ``B g`` the per-example gradient with respect to the pre-activation. This
is the KFC convention for convolutions (sum over positions in ``A``, mean in ``G``). The
preconditioned gradient of the homogeneous weight ``M = [∇W; ∇b]`` (Flax layout, inputs on the
rows) is ``(A + λ_A I)^{-1} M (G + λ_G I)^{-1}`` with factored Tikhonov damping
``λ_A = π √λ``, ``λ_G = √λ / π``, ``π = sqrt((tr A / d_A) / (tr G / d_G))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kfqn_jax._src import alias, base, extra_args, linalg, safety
from kfqn_jax._src import layers as layers_lib
from kfqn_jax._src.base import LayerMeta, LayerStats

KINDS = ("dense", "conv")


class ScaleByKFACState(NamedTuple):
    """State of :func:`scale_by_kfac`.

    Attributes:
      count: number of steps taken (int32); a skipped step (see ``on_nonfinite``) does not
        count.
      nonfinite_count: number of steps skipped because of non-finite values (int32).
      stats_count: number of statistics updates folded into the factors (int32), including
        warm-start batches.
      a_factors: per block, the EMA of ``A`` (``(d_in (+1))^2``), in block order.
      g_factors: per block, the EMA of ``G`` (``d_out^2``).
      a_inverses: per block, ``(A + λ_A I)^{-1}`` from the last refresh.
      g_inverses: per block, ``(G + λ_G I)^{-1}`` from the last refresh.
      momentum: per block, the momentum buffer of the homogeneous gradient, or ``()``.
      fallback_state: state of the transform applied to parameters outside any block.
    """

    count: jax.Array
    nonfinite_count: jax.Array
    stats_count: jax.Array
    a_factors: tuple
    g_factors: tuple
    a_inverses: tuple
    g_inverses: tuple
    momentum: tuple
    fallback_state: Any


def factor_stats(
    stats: LayerStats, fisher: str, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``A`` and ``G`` of one batch (see the module docstring) and their diagonals
    ``(A, G, diag A, diag G)``, the diagonals read from the products (see
    :func:`linalg.gram`)."""
    b = stats.a.shape[0]
    t = stats.a.shape[1]
    layers_lib.check_matrix_inputs(stats)
    # The homogeneous 1 of a bias is appended inside the Gram, without copying the inputs.
    a = stats.a.astype(dtype)
    g = {"true": stats.g_sampled, "empirical": stats.g, "exact": stats.g_exact}[fisher]
    g = g.astype(dtype)
    # 2-D matmuls (one contracting axis) so that every backend uses its GEMM kernel.
    a2 = a.reshape(-1, a.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])  # "exact": the Hessian-root columns are summed over too
    a_f, a_d = linalg.gram(a2, with_diagonal=True, append_one=stats.meta.has_bias)
    g_f, g_d = linalg.gram(g2, with_diagonal=True)
    a_f, a_d = a_f / b, a_d / b
    g_f, g_d = g_f * (b / t), g_d * (b / t)
    return a_f, g_f, a_d, g_d


def _group_by_size(mats: Sequence[jax.Array]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(m.shape[-1], []).append(i)
    return groups


def batched_damped_inverses(
    mats: Sequence[jax.Array], dampings: Sequence[jax.Array], batch: bool | None = None
) -> list:
    """Damped Cholesky inverses, stacking matrices of equal size into one batched call.

    ``batch=None`` batches on accelerators only: on the CPU backend, batched LAPACK calls inside
    a ``lax.cond`` were seen to deadlock XLA's CPU runtime (jax 0.10), and batching buys
    nothing there.
    """
    if batch is None:
        batch = jax.default_backend() != "cpu"
    if not batch:
        return [
            linalg.damped_cholesky_inverse(m, jnp.asarray(d, m.dtype))
            for m, d in zip(mats, dampings, strict=True)
        ]
    out: list = [None] * len(mats)
    for _, idx in _group_by_size(mats).items():
        stacked = jnp.stack([mats[i] for i in idx])
        damp = jnp.stack([jnp.asarray(dampings[i], stacked.dtype) for i in idx])
        inv = linalg.damped_cholesky_inverse(stacked, damp)
        for j, i in enumerate(idx):
            out[i] = inv[j]
    return out


def _factor_dampings(a_factors, g_factors, damping, use_pi: bool):
    da, dg = [], []
    for a, g in zip(a_factors, g_factors, strict=True):
        if use_pi:
            x, y = linalg.pi_damping(a, g, damping)
        else:
            x = y = jnp.sqrt(damping)
        da.append(x)
        dg.append(y)
    return da, dg


def scale_by_kfac(
    damping: optax.ScalarOrSchedule = 1e-3,
    *,
    ema_decay: float = 0.95,
    fisher: str = "true",
    stats_every: int = 1,
    inverse_every: int = 20,
    inverse_schedule: str = "all",
    pi_damping: bool = True,
    momentum: float = 0.9,
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """Preconditions Dense and Conv kernels with KFAC; no learning rate (see :func:`kfac`).

    Args:
      damping: Tikhonov damping ``λ`` (scalar or schedule of the step count), split between
        the two factors (``pi_damping``) or ``√λ`` on each.
      ema_decay: decay ``β`` of the factor moving averages. The weight of a new batch is
        ``max(1 - β, 1 / (n + 1))`` after ``n`` earlier batches, so early factors are exact
        running means rather than biased towards zero.
      fisher: ``"true"`` (default): ``G`` from cotangents of targets sampled from the model
        (capture with ``sampled="cotangents"``); ``"empirical"``: from the training targets'
        cotangents (no extra backward pass); ``"exact"``: the expectation over the predictive
        distribution, from the loss Hessian's square-root columns (capture with
        ``exact_fisher=True``; one backward pass per model output, for small outputs). For
        these losses the Fisher equals the generalised Gauss-Newton matrix, so ``"exact"``
        gives KFAC's GGN factors.
      stats_every: update the factors every this many steps (static int ``T_stats``).
      inverse_every: refresh the damped inverses every this many steps (static int ``T_inv``),
        and at every statistics update during the first ``T_inv`` steps.
      inverse_schedule: ``"all"`` refreshes every block together (equal-size factors are
        inverted in one batched call); ``"staggered"`` refreshes a share of the blocks at each
        step, block ``i`` when ``(step + i) % T_inv == 0``, so that no single step pays for all
        inversions.
      pi_damping: factored damping with ``π`` (True) or ``√λ`` on each factor (False, as the
        K-BFGS and TNT papers' KFAC baselines).
      momentum: heavy-ball momentum ``μ`` on the gradient before preconditioning
        (``m ← μ m + ∇``); 0 disables it.
      layers: the blocks: ``None`` guesses them from the parameter names (every ``kernel`` of
        rank >= 2 with its sibling ``bias``), or a sequence of :class:`LayerMeta` from
        :func:`kfqn_jax.flax.layer_metas` (exact). Embeddings are not preconditioned.
      fallback: transform for parameters outside any block (norm scales, embeddings, unknown
        layers). Default: ``optax.trace(momentum)`` (plain momentum SGD), as the papers treat
        BatchNorm parameters.
      on_nonfinite: what a step does when the gradients, the statistics or the updates and
        state it produces hold a NaN or an infinity: ``"skip"`` (default) returns zero updates
        and the previous state with ``nonfinite_count`` incremented (``count`` does not
        advance); ``"raise"`` raises a ``FloatingPointError`` from the device (under ``jit``,
        surfaced as a ``jax.errors.JaxRuntimeError`` carrying that message); ``"ignore"``
        does not check.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``layer_stats=captured.stats`` (or ``captured.stats_fn``, evaluated only on statistics
      steps: with ``stats_every > 1`` this skips the sampled-label backward pass on the other
      steps). Pass ``warm_start=True`` to fold a batch into the factors
      (arithmetic mean) without taking a step.
    """
    base.check_choice("kfac", "fisher", fisher, ("true", "empirical", "exact"))
    base.check_choice("kfac", "inverse_schedule", inverse_schedule, ("all", "staggered"))
    base.check_positive_int("kfac", "stats_every", stats_every)
    base.check_positive_int("kfac", "inverse_every", inverse_every)
    base.check_fraction("kfac", "ema_decay", ema_decay, static=True)
    base.check_fraction("kfac", "momentum", momentum, static=True)
    base.check_damping("kfac", damping)
    safety.check_on_nonfinite("kfac", on_nonfinite)
    fused = on_nonfinite == "skip"
    if fallback is None:
        fallback = optax.trace(decay=momentum) if momentum > 0 else optax.identity()

    def blocks(tree):
        return layers_lib.resolve_layers(tree, layers, KINDS)

    masked_fallback = optax.masked(
        fallback, lambda tree: layers_lib.uncovered_mask(tree, blocks(tree))
    )

    def init_fn(params):
        metas = blocks(params)
        dtype = base.as_float(jax.tree_util.tree_leaves(params)[0].dtype) if metas else jnp.float32
        a_dims = [m.in_features + int(m.has_bias) for m in metas]
        g_dims = [m.out_features for m in metas]
        eye = lambda n: jnp.eye(n, dtype=dtype)  # noqa: E731
        zeros = lambda n: jnp.zeros((n, n), dtype)  # noqa: E731
        mom = ()
        if momentum > 0:
            mom = tuple(jnp.zeros((da, dg), dtype) for da, dg in zip(a_dims, g_dims, strict=True))
        return ScaleByKFACState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            stats_count=jnp.zeros([], jnp.int32),
            a_factors=tuple(zeros(n) for n in a_dims),
            g_factors=tuple(zeros(n) for n in g_dims),
            a_inverses=tuple(eye(n) for n in a_dims),
            g_inverses=tuple(eye(n) for n in g_dims),
            momentum=mom,
            fallback_state=masked_fallback.init(params),
        )

    def update_fn(updates, state, params=None, *, layer_stats=None, warm_start=False, **extra):
        del extra
        if layer_stats is None:
            raise base.missing_extra_arg("kfac", base.LAYER_STATS, base.stats_fix_line())
        metas = blocks(updates)
        # A callable is evaluated lazily, inside the statistics branch (Captured.stats_fn).
        lazy = callable(layer_stats)
        shapes = jax.eval_shape(layer_stats) if lazy else layer_stats
        base.check_layer_stats("kfac", shapes)
        stats = layers_lib.match_stats("kfac", metas, shapes)
        for s in stats:
            if fisher == "true" and s.g_sampled is None:
                raise ValueError(
                    f"kfac(fisher='true') needs sampled-label cotangents for layer "
                    f"{s.meta.name!r}: capture with sampled='cotangents' (and rng=...), or "
                    "use fisher='empirical'."
                )
            if fisher == "exact" and s.g_exact is None:
                raise ValueError(
                    f"kfac(fisher='exact') needs g_exact for layer {s.meta.name!r}: capture "
                    "with exact_fisher=True."
                )
        dtype = state.a_factors[0].dtype if metas else jnp.float32
        count = state.count
        damp = damping(count) if callable(damping) else damping
        damp = jnp.asarray(damp, dtype)
        # on_nonfinite="skip" is fused into the step: every state update below is gated by
        # `ok` inside the elementwise op that makes it, instead of a select over the whole
        # state afterwards (a memory pass that cost about 10% of a step on CPU).
        grads_ok = linalg.is_finite(jax.tree_util.tree_leaves(updates)) if fused else True

        def new_factors(operand):
            a_old, g_old, n = operand
            cur = layers_lib.match_stats("kfac", metas, layer_stats()) if lazy else stats
            w = jnp.maximum(1.0 - ema_decay, 1.0 / (n.astype(dtype) + 1.0))
            if warm_start:
                w = 1.0 / (n.astype(dtype) + 1.0)
            ok = jnp.asarray(grads_ok)
            # The finiteness check reads the diagonals from the products, so that the factors'
            # panel assembly fuses into the EMA below instead of being written out twice.
            batch = [factor_stats(s, fisher, dtype) for s in cur]
            if fused:
                for (_, _, ad, gd), ao, go in zip(batch, a_old, g_old, strict=True):
                    ok &= safety.ema_finite(w, ao, ad) & safety.ema_finite(w, go, gd)
            a_new, g_new = [], []
            for (af, gf, _, _), ao, go in zip(batch, a_old, g_old, strict=True):
                a_new.append(jnp.where(ok, (1 - w) * ao + w * af, ao))
                g_new.append(jnp.where(ok, (1 - w) * go + w * gf, go))
            return tuple(a_new), tuple(g_new), jnp.where(ok, n + 1, n), ok

        do_stats = (count % stats_every) == 0
        if warm_start:
            a_f, g_f, n_stats, ok = new_factors(
                (state.a_factors, state.g_factors, state.stats_count)
            )
            zero = jax.tree.map(jnp.zeros_like, updates)
            return zero, state._replace(
                a_factors=a_f,
                g_factors=g_f,
                stats_count=n_stats,
                nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
            )
        operand = (state.a_factors, state.g_factors, state.stats_count)
        if stats_every == 1:
            a_f, g_f, n_stats, ok = new_factors(operand)
        else:
            a_f, g_f, n_stats, ok = lax.cond(
                do_stats, new_factors, lambda op: (*op, jnp.asarray(grads_ok)), operand
            )

        # Inverse refresh.
        def refresh(idx: Sequence[int], a_facs, g_facs):
            da, dg = _factor_dampings(a_facs, g_facs, damp, pi_damping)
            invs = batched_damped_inverses(list(a_facs) + list(g_facs), da + dg)
            return invs[: len(idx)], invs[len(idx) :]

        early = (count < inverse_every) & do_stats & ok
        a_inv, g_inv = list(state.a_inverses), list(state.g_inverses)
        nb = len(metas)
        if nb and inverse_schedule == "all" and jax.default_backend() != "cpu":
            # One cond; equal-size factors inverted in one batched call.
            do_inv = ((count % inverse_every == 0) & ok) | early

            def branch(ops):
                new = refresh(range(nb), a_f, g_f)
                return tuple(
                    linalg.where_finite((na, ng), (oa, og))
                    for na, ng, oa, og in zip(*new, *ops, strict=True)
                )

            res = lax.cond(
                do_inv,
                branch,
                lambda ops: tuple(zip(*ops, strict=True)),
                (tuple(a_inv), tuple(g_inv)),
            )
            a_inv = [r[0] for r in res]
            g_inv = [r[1] for r in res]
        else:
            # One cond per block, carrying only that block's matrices. On the CPU backend this
            # is also used for the "all" schedule: a single cond holding every LAPACK call was
            # seen to deadlock XLA's CPU runtime (jax 0.10) on a two-core machine.
            for i in range(nb):
                phase = i if inverse_schedule == "staggered" else 0
                do_i = ((((count + phase) % inverse_every == 0) | (count == 0)) & ok) | early

                def branch(ops, i=i):
                    (na,), (ng,) = refresh([i], [ops[0]], [ops[1]])
                    return linalg.where_finite((na, ng), (ops[2], ops[3]))

                a_inv[i], g_inv[i] = lax.cond(
                    do_i, branch, lambda ops: (ops[2], ops[3]), (a_f[i], g_f[i], a_inv[i], g_inv[i])
                )
        a_inv, g_inv = tuple(a_inv), tuple(g_inv)

        # Fallback for everything outside the blocks.
        out, fb_state = masked_fallback.update(updates, state.fallback_state, params)
        leaves, index, treedef = layers_lib.leaf_index(out)
        grad_leaves = jax.tree_util.tree_leaves(updates)
        new_mom = []
        for bi, m in enumerate(metas):
            ki = base.match_path(tuple(m.kernel_path), index)
            bi_idx = base.match_path(tuple(m.bias_path), index) if m.has_bias else None
            kernel = grad_leaves[ki]
            bias = grad_leaves[bi_idx] if bi_idx is not None else None
            mat = layers_lib.homogeneous_grad(kernel, bias, m).astype(dtype)
            if momentum > 0:
                mat = momentum * state.momentum[bi] + mat
                new_mom.append(jnp.where(ok, mat, state.momentum[bi]))
            pre = linalg.kron_mvp(a_inv[bi], g_inv[bi], mat)
            w, b = layers_lib.split_homogeneous(pre, m)
            leaves[ki] = w.astype(kernel.dtype)
            if bi_idx is not None:
                leaves[bi_idx] = b.astype(bias.dtype)
        nonfinite = state.nonfinite_count
        new_count = optax.safe_increment(count)
        if fused:
            leaves, new_count, nonfinite = safety.finish_skip(ok, leaves, count, nonfinite)
            fb_state = safety.select_tree(ok, fb_state, state.fallback_state)
        new_updates = jax.tree_util.tree_unflatten(treedef, leaves)
        new_state = ScaleByKFACState(
            count=new_count,
            nonfinite_count=nonfinite,
            stats_count=n_stats,
            a_factors=a_f,
            g_factors=g_f,
            a_inverses=a_inv,
            g_inverses=g_inv,
            momentum=tuple(new_mom),
            fallback_state=fb_state,
        )
        return new_updates, new_state

    guarded = safety.guard_nonfinite(
        update_fn, on_nonfinite, "kfac", (base.LAYER_STATS,), init_fn=init_fn, fused=True
    )
    reqs = extra_args.Requirements(
        extra_args=(extra_args.LAYER_STATS,),
        sampled="cotangents" if fisher == "true" else None,
        exact_fisher=fisher == "exact",
    )
    return optax.GradientTransformationExtraArgs(init_fn, extra_args.announce(guarded, reqs))


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 1e-3,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: Any = 0.0,
    ema_decay: float = 0.95,
    fisher: str = "true",
    stats_every: int = 1,
    inverse_every: int = 20,
    inverse_schedule: str = "all",
    pi_damping: bool = True,
    momentum: float = 0.9,
    layers: Any = None,
    fallback: optax.GradientTransformation | None = None,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    """KFAC with a learning rate: ``chain([add_decayed_weights(l2_reg)], scale_by_kfac,
    [add_decayed_weights(weight_decay, weight_decay_mask)], scale_by_learning_rate)``.

    Update: ``θ ← θ − α ((A + λ_A I)^{-1} (μ m + ∇L + λ₂ θ) (G + λ_G I)^{-1} + τ θ)`` per
    layer, with ``α = learning_rate``, ``λ = damping``, ``λ₂ = l2_reg`` (coupled L2 added to
    the gradient before preconditioning, as in the papers), ``τ = weight_decay`` (decoupled,
    as in ``optax.adamw``, on the parameters ``weight_decay_mask`` selects; before release 0.2
    ``weight_decay`` was the coupled term, and a nonzero value now warns once) and the other
    symbols as in
    :func:`scale_by_kfac`, whose keyword arguments are accepted here. The step-count
    arguments (``stats_every``, ``inverse_every``) are static: list them in ``static_args``
    of ``optax.inject_hyperparams``. With ``on_nonfinite="skip"`` (default) a step with NaN
    or infinite gradients, statistics or results is skipped and counted in
    ``nonfinite_count`` of the state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> from kfqn_jax import flax as kfx
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 1])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> tx = kfqn_jax.kfac(learning_rate=0.1, damping=1e-2)
      >>> opt_state = tx.init(params)
      >>> out = kfx.value_grads_and_stats(model, params, x, targets=y,
      ...     loss="softmax_cross_entropy", rng=jax.random.key(1), sampled="cotangents")
      >>> updates, opt_state = tx.update(out.grads, opt_state, params, layer_stats=out.stats)
      >>> params = optax.apply_updates(params, updates)

    References:
      Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
      Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
      Grosse & Martens, `A Kronecker-factored approximate Fisher matrix for convolution
      layers <https://arxiv.org/abs/1602.01407>`_, 2016.
    """
    scale = scale_by_kfac(
        damping,
        ema_decay=ema_decay,
        fisher=fisher,
        stats_every=stats_every,
        inverse_every=inverse_every,
        inverse_schedule=inverse_schedule,
        pi_damping=pi_damping,
        momentum=momentum,
        layers=layers,
        fallback=fallback,
        on_nonfinite=on_nonfinite,
    )
    return alias.build(
        "kfac",
        scale,
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        l2_reg=l2_reg,
    )
