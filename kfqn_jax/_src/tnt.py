r"""TNT: Tensor Normal Training (Ren & Goldfarb, NeurIPS 2021).

Every parameter tensor, after a static reshape to ``d_1 × … × d_k`` (its *modes*), is
preconditioned by a Kronecker product of one matrix per mode. The sampled-label gradient
``Ḡ`` (labels drawn from the model, so the statistics estimate the true Fisher) is modelled as
tensor-normal with Kronecker-separable covariance ``U_1 ⊗ … ⊗ U_k``. Per mode ``i`` the
contraction of ``Ḡ`` over every other axis is averaged in time:

.. math::

    C_i = Ḡ_{(i)} Ḡ_{(i)}^\top \in \mathbb{R}^{d_i \times d_i}, \qquad
    S_i \leftarrow (1 - w) S_i + w C_i, \qquad w = \max(1 - β, 1 / (n + 1)),

where ``Ḡ_{(i)}`` is the mode-``i`` unfolding (``d_i × N/d_i``, ``N = ∏_j d_j``), ``β`` is
``ema_decay`` and ``n`` the number of earlier statistics updates. Every ``tr S_i`` equals the
running average of ``‖Ḡ‖²``. The *same-trace* normalisation

.. math::

    c = \Bigl(\frac{\operatorname{tr} S}{N}\Bigr)^{1/k}, \qquad
    U_i = \frac{S_i}{c^{k-1} \prod_{j \ne i} d_j}

gives every ``U_i`` the average eigenvalue ``c`` and ``tr(U_1 ⊗ … ⊗ U_k) = tr S``. The
direction applied to the momentum ``m ← μ m + ∇L`` is

.. math::

    Δ = m \times_1 (U_1 + ε_1 I)^{-1} \times_2 \dots \times_k (U_k + ε_k I)^{-1},
    \qquad \operatorname{vec}(Δ) = \Bigl(\bigotimes_i (U_i + ε_i I)^{-1}\Bigr)\operatorname{vec}(m),

with ``×_i`` the mode-``i`` product and ``vec`` the row-major (C-order) vectorisation.

Each leaf is one *mode block* (:class:`TNTBlock`: init, statistics and their moving average,
refresh of the inverses, preconditioning); the reshaping rules, the contractions, the mode
products and the loops over the leaves are shared with Shampoo in
:mod:`kfqn_jax._src.tensor_modes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfqn_jax._src import alias, base, extra_args, linalg, safety
from kfqn_jax._src import tensor_modes as tm
# ModeLayout, mode_contractions and mode_sizes are re-exported: tests reach them through here.
from kfqn_jax._src.tensor_modes import ModeLayout as ModeLayout
from kfqn_jax._src.tensor_modes import mode_contractions as mode_contractions
from kfqn_jax._src.tensor_modes import mode_sizes as mode_sizes

DAMPING_MODES = ("constant", "root", "max_eigenvalue", "mean_eigenvalue", "trace")


# ------------------------------------------------------------------------------------------------
# The maths of one leaf: normalisation, per-mode damping, inverses.
# ------------------------------------------------------------------------------------------------


def normalized_factors(stats: Sequence[jax.Array], layout: tm.ModeLayout) -> list[jax.Array]:
    """The same-trace normalisation ``U_i = S_i / (c^{k-1} ∏_{j≠i} d_j)`` of one leaf.

    ``tr S`` is taken as the mean of the ``tr S_i`` (equal in exact arithmetic). Computed in log
    space; a zero trace (no statistics yet, zero gradients) leaves ``U_i = S_i = 0``.
    """
    k = len(layout.modes)
    dtype = stats[0].dtype
    t = sum(tm.trace_of(s, f) for s, f in zip(stats, layout.full, strict=True)) / k
    safe_t = jnp.where(t > 0, t, jnp.ones((), dtype))
    log_n = math.log(math.prod(layout.modes))
    log_c = (jnp.log(safe_t) - log_n) / k
    out = []
    for s, d in zip(stats, layout.modes, strict=True):
        log_scale = math.log(d) - log_n - (k - 1) * log_c
        out.append(s * jnp.exp(log_scale).astype(dtype))
    return out


def mode_dampings(
    factors: Sequence[jax.Array], layout: tm.ModeLayout, damping: jax.Array, mode: str
) -> list[jax.Array]:
    """``ε_i`` per mode for the damping rule ``mode`` (see :func:`scale_by_tnt`)."""
    k = len(layout.modes)
    out = []
    for u, d, f in zip(factors, layout.modes, layout.full, strict=True):
        if mode == "constant":
            e = damping
        elif mode == "root":
            e = jnp.power(damping, 1.0 / k)
        elif mode == "max_eigenvalue":
            lam = jnp.max(u) if not f else linalg.safe_eigh(u)[0][-1]
            e = damping * lam
        elif mode == "mean_eigenvalue":
            e = damping * tm.trace_of(u, f) / d
        else:  # "trace"
            e = damping * tm.trace_of(u, f)
        out.append(jnp.asarray(e, u.dtype))
    return out


def tnt_inverses(
    stats: Sequence[jax.Array], layout: tm.ModeLayout, damping: jax.Array, mode: str
) -> tuple[jax.Array, ...]:
    """``P_i = (U_i + ε_i I)^{-1}`` of one leaf (Cholesky; ``1 / (u_i + ε_i)`` when diagonal)."""
    us = normalized_factors(stats, layout)
    eps = mode_dampings(us, layout, damping, mode)
    out = []
    for u, e, f in zip(us, eps, layout.full, strict=True):
        out.append(linalg.damped_cholesky_inverse(u, e) if f else 1.0 / (u + e))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# One leaf's curvature block, and the pieces of a step.
# ------------------------------------------------------------------------------------------------


class TNTBlock(NamedTuple):
    """One parameter leaf's TNT curvature block (static).

    Attributes:
      layout: the leaf's :class:`~kfqn_jax._src.tensor_modes.ModeLayout`.
      damping_mode: the rule for ``ε_i`` (see :func:`scale_by_tnt`).
    """

    layout: tm.ModeLayout
    damping_mode: str

    def init(self, dtype: Any) -> tm.BlockInit:
        """Zero statistics ``S_i``, identity inverses ``P_i`` (diagonals above ``max_dim``)."""
        return tm.zero_stats_identity_roots(self.layout, dtype)

    def statistics(self, g: jax.Array, dtype: Any) -> tuple[tm.Moment, ...]:
        """The contractions ``Ḡ_(i) Ḡ_(i)ᵀ`` of one batch, with their diagonals."""
        return tm.mode_moments(g, self.layout, dtype)

    def fold_ok(self, factors: tuple, moments: tuple, w: jax.Array) -> jax.Array:
        """Whether the new moving averages are finite."""
        return tm.ema_fold_ok(factors, moments, w)

    def accumulate(self, factors: tuple, moments: tuple, w: jax.Array, ok: jax.Array) -> tuple:
        """``S_i ← (1 - w) S_i + w Ḡ_(i) Ḡ_(i)ᵀ`` where ``ok``."""
        return tm.ema_fold(factors, moments, w, ok)

    def refresh(self, factors: tuple, damping: Any) -> tuple[jax.Array, ...]:
        """``P_i = (U_i + ε_i I)^{-1}`` from the statistics."""
        damping = jnp.asarray(damping, factors[0].dtype)
        return tnt_inverses(factors, self.layout, damping, self.damping_mode)

    def precondition(self, roots: tuple, x: jax.Array) -> jax.Array:
        """``x ×_1 P_1 ×_2 … ×_k P_k``."""
        return tm.precondition(x, roots, self.layout)


class TNTOptions(NamedTuple):
    """The static settings of one :func:`scale_by_tnt` (see its arguments).

    ``fused``: ``on_nonfinite="skip"`` is fused into the step (as in kfac.py): the state
    updates are gated by ``ok`` inside the operations that make them, instead of a select over
    the whole state afterwards, a memory pass that cost about 16% of a TNT step on CPU.
    """

    damping: Any
    ema_decay: Any
    fisher: str
    stats_every: int
    inverse_every: int
    damping_mode: str
    momentum: float
    reshape: Any
    max_dim: int | None
    fused: bool


def tnt_blocks(tree: Any, opts: TNTOptions) -> list[TNTBlock]:
    """The :class:`TNTBlock` of every leaf of ``tree``, in ``tree_leaves`` order."""
    layouts = tm.layouts_of(tree, opts.reshape, opts.max_dim)
    return [TNTBlock(lo, opts.damping_mode) for lo in layouts]


class ScaleByTNTState(NamedTuple):
    """State of :func:`scale_by_tnt`.

    Attributes:
      count: number of steps taken (int32); a skipped step (see ``on_nonfinite``) does not
        count.
      nonfinite_count: number of steps skipped because of non-finite values (int32).
      stats_count: number of statistics updates folded into the factors (int32), warm-start
        batches included.
      factors: the tree of the parameters with, at each leaf, the tuple of per-mode statistics
        ``S_i`` (``d_i × d_i``, or the diagonal ``(d_i,)`` above ``max_dim``).
      inverses: the same tree of ``P_i = (U_i + ε_i I)^{-1}`` from the last refresh.
      momentum: the tree of momentum buffers ``m`` (float32, or float64 with float64
        parameters), or ``()`` when ``momentum == 0``.
    """

    count: jax.Array
    nonfinite_count: jax.Array
    stats_count: jax.Array
    factors: Any
    inverses: Any
    momentum: Any


def _sampled_fix_line() -> str:
    return (
        "Compute it from labels sampled from the model in the same forward pass, e.g.\n"
        "    loss, grads, sampled = kfqn_jax.value_and_sampled_grad(apply_fn, params, x,\n"
        "        targets=y, loss='softmax_cross_entropy', rng=rng)\n"
        "    updates, opt_state = tx.update(grads, opt_state, params, sampled_grads=sampled)\n"
        "(Flax: kfqn_jax.flax.value_grads_and_stats(..., sampled='grads').sampled_grads), or "
        "use fisher='empirical'."
    )


def check_options(opts: TNTOptions, on_nonfinite: str) -> None:
    """The construction-time checks of :func:`scale_by_tnt`."""
    base.check_choice("tnt", "fisher", opts.fisher, ("true", "empirical"))
    base.check_choice("tnt", "damping_mode", opts.damping_mode, DAMPING_MODES)
    base.check_positive_int("tnt", "stats_every", opts.stats_every)
    base.check_positive_int("tnt", "inverse_every", opts.inverse_every)
    tm.check_common("tnt", opts.ema_decay, opts.momentum, opts.max_dim, opts.reshape)
    base.check_damping("tnt", opts.damping)
    safety.check_on_nonfinite("tnt", on_nonfinite)


def requirements(fisher: str) -> extra_args.Requirements:
    """What :func:`scale_by_tnt` reads: ``sampled_grads`` for the true Fisher, else nothing
    (the empirical Fisher's statistics come from the gradient itself)."""
    if fisher == "true":
        return extra_args.Requirements(extra_args=(extra_args.SAMPLED_GRADS,), sampled="grads")
    return extra_args.Requirements()


def init_state(params: Any, opts: TNTOptions) -> ScaleByTNTState:
    """The state before any step: zero statistics, identity inverses, zero momentum."""
    leaves, treedef = jax.tree.flatten(params)
    dtypes = tm.leaf_dtypes(leaves)
    inits = [blk.init(dt) for blk, dt in zip(tnt_blocks(params, opts), dtypes, strict=True)]
    return ScaleByTNTState(
        count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        stats_count=jnp.zeros([], jnp.int32),
        factors=treedef.unflatten([b.factors for b in inits]),
        inverses=treedef.unflatten([b.roots for b in inits]),
        momentum=tm.init_momentum(leaves, treedef, dtypes, opts.momentum),
    )


def statistics_source(
    fisher: str, leaves: list, sampled_grads: Any, updates: Any
) -> Sequence[jax.Array]:
    """The leaves of ``Ḡ``: the gradient (``"empirical"``) or ``sampled_grads`` (called if it
    is a function: only on statistics steps), checked against the gradients' structure."""
    if fisher == "empirical":
        return leaves
    tree = sampled_grads() if callable(sampled_grads) else sampled_grads
    return base.check_tree_like("tnt", extra_args.SAMPLED_GRADS, tree, updates, "gradients")


def fold_statistics(
    blocks: Sequence[TNTBlock],
    batch: Sequence[jax.Array],
    factors: Sequence[tuple],
    n: jax.Array,
    ok: jax.Array,
    ema_decay: Any,
    warm_start: bool,
    fused: bool,
) -> tuple[list[tuple], jax.Array, jax.Array]:
    """Folds one batch into every leaf's statistics: ``(factors, stats_count, ok)``.

    With ``fused`` the fold happens only if ``ok`` (the gradients' finiteness) and every new
    moving average are finite; the flag is returned for the rest of the step.
    """
    folds = []
    for blk, g, fac in zip(blocks, batch, factors, strict=True):
        w = tm.ema_weight(ema_decay, n, fac[0].dtype, warm_start)
        moments = blk.statistics(g, fac[0].dtype)
        folds.append((w, moments))
        if fused:
            ok &= blk.fold_ok(fac, moments, w)
    out = [
        blk.accumulate(fac, moments, w, ok)
        for blk, fac, (w, moments) in zip(blocks, factors, folds, strict=True)
    ]
    return out, jnp.where(ok, n + 1, n), ok


def warm_start_step(updates, state, treedef, factors, n_stats, ok):
    """A warm-start batch: zero updates; the statistics, their count and, if the batch was not
    finite, ``nonfinite_count`` advance; ``count`` does not."""
    zeros = jax.tree.map(jnp.zeros_like, updates)
    return zeros, state._replace(
        factors=treedef.unflatten([tuple(f) for f in factors]),
        stats_count=n_stats,
        nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
    )


def tnt_step(
    opts: TNTOptions, updates: Any, state: ScaleByTNTState, sampled_grads: Any, warm_start: bool
) -> tuple[Any, ScaleByTNTState]:
    """One ``update`` of :func:`scale_by_tnt`: statistics every ``T_1`` steps, inverses on
    their schedule, momentum and the mode products, the fused skip."""
    if opts.fisher == "true" and sampled_grads is None:
        raise base.missing_extra_arg("tnt", extra_args.SAMPLED_GRADS, _sampled_fix_line())
    leaves, treedef = jax.tree.flatten(updates)
    blocks = tnt_blocks(updates, opts)
    factors = tm.flatten_like(treedef, state.factors, "state.factors", "tnt")
    inverses = tm.flatten_like(treedef, state.inverses, "state.inverses", "tnt")
    count = state.count
    grads_ok = linalg.is_finite(leaves) if opts.fused else jnp.asarray(True)

    def fold(operand):
        batch = statistics_source(opts.fisher, leaves, sampled_grads, updates)
        fac, n = operand
        args = (opts.ema_decay, warm_start, opts.fused)
        return fold_statistics(blocks, batch, fac, n, grads_ok, *args)

    operand = (factors, state.stats_count)
    if warm_start:
        return warm_start_step(updates, state, treedef, *fold(operand))
    do_stats = (count % opts.stats_every) == 0
    skip = lambda op: (*op, grads_ok)  # noqa: E731
    factors, n_stats, ok = tm.every(opts.stats_every, do_stats, fold, skip, operand)
    damp = opts.damping(count) if callable(opts.damping) else opts.damping
    do_inv = tm.refresh_due(count, opts.inverse_every, do_stats) & ok
    always = opts.inverse_every == 1 and not opts.fused
    new_inv = tm.refresh_leaves(blocks, factors, inverses, do_inv, damp, always)
    dirs, new_mom = tm.precondition_leaves(
        blocks, leaves, new_inv, state.momentum, opts.momentum, ok
    )
    out = [d.astype(g.dtype) for d, g in zip(dirs, leaves, strict=True)]
    nonfinite = state.nonfinite_count
    new_count = optax.safe_increment(count)
    if opts.fused:
        out, new_count, nonfinite = safety.finish_skip(ok, out, count, nonfinite)
    new_state = ScaleByTNTState(
        count=new_count,
        nonfinite_count=nonfinite,
        stats_count=n_stats,
        factors=treedef.unflatten([tuple(f) for f in factors]),
        inverses=treedef.unflatten(new_inv),
        momentum=treedef.unflatten(new_mom) if opts.momentum > 0 else (),
    )
    return treedef.unflatten(out), new_state


# ------------------------------------------------------------------------------------------------
# The transforms.
# ------------------------------------------------------------------------------------------------


def scale_by_tnt(
    damping: optax.ScalarOrSchedule = 0.1,
    *,
    ema_decay: jax.typing.ArrayLike = 0.9,
    fisher: str = "true",
    stats_every: int = 1,
    inverse_every: int = 20,
    damping_mode: str = "constant",
    momentum: float = 0.9,
    reshape: str | Callable[[tuple[Any, ...], tuple[int, ...]], Sequence[int]] = (
        "filter_flattening"
    ),
    max_dim: int | None = 4096,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions every parameter with TNT; no learning rate (see :func:`tnt`).

    With ``Ḡ`` the sampled-label gradient of the batch-mean loss (``fisher="true"``) or the
    gradient itself (``"empirical"``), per leaf and mode ``i`` (see the module docstring):

    .. math::

        S_i \leftarrow (1 - w) S_i + w\, Ḡ_{(i)} Ḡ_{(i)}^\top \ \text{every } T_1 \text{ steps},
        \qquad P_i = (U_i + ε_i I)^{-1}\ \text{every } T_2 \text{ steps},\\
        m \leftarrow μ m + g, \qquad Δ = m \times_1 P_1 \times_2 \dots \times_k P_k,

    where ``T_1`` = ``stats_every``, ``T_2`` = ``inverse_every``, ``μ`` = ``momentum``,
    ``w = max(1 − β, 1/(n+1))`` with ``β`` = ``ema_decay``, ``U_i`` is the same-trace
    normalisation of ``S_i`` and ``ε_i`` comes from ``damping`` by ``damping_mode``. While the
    step count is below ``T_2`` the inverses are refreshed at every statistics update (the
    authors' faster early schedule); at step 0 always.

    Args:
      damping: ``ε`` (scalar or schedule of the step count). Scale: ``Ḡ`` is the gradient of
        the batch *mean*, so ``U`` estimates ``F / batch`` and ``ε`` is relative to that.
      ema_decay: ``β``; early updates are exact running means (no bias towards zero).
      fisher: ``"true"`` (default): statistics from the ``sampled_grads`` extra argument;
        ``"empirical"``: from the incoming gradient (the authors' ``EF`` ablation).
      stats_every: ``T_1`` (static int).
      inverse_every: ``T_2`` (static int).
      damping_mode: ``ε_i`` per mode. ``"constant"`` (default, the authors' code): ``ε`` on
        every mode, equal to π-adjusted damping of the whole Kronecker product with total
        ``ε^k``. ``"root"`` (the authors' ``noPerDimDamping``): ``ε^{1/k}``, π-adjusted with
        total ``ε``. ``"max_eigenvalue"``: ``ε λ_max(U_i)``. ``"mean_eigenvalue"``:
        ``ε tr(U_i) / d_i`` (``= ε c``, the same for every mode). ``"trace"``: ``ε tr(U_i)``.
        The paper's own wording could not be checked; the default follows the code.
      momentum: ``μ`` of the heavy-ball momentum ``m ← μ m + g`` on the training gradient
        (static; 0 disables it and its buffer).
      reshape: how leaves become modes: ``"filter_flattening"`` (default), ``"none"`` or a
        callable; see :func:`mode_sizes`. Size-1 axes are dropped.
      max_dim: modes larger than this keep only a diagonal ``S_i`` (``U_i`` and ``P_i``
        diagonal too; the normalisation uses the same traces). ``None``: no cap. Static.
      on_nonfinite: what a step does when the gradients, the statistics it is given, or
        the updates and state it produces hold a NaN or an infinity: ``"skip"``
        (default) returns zero updates and the previous state with ``nonfinite_count``
        incremented (so ``count`` does not advance either); ``"raise"`` raises a
        ``FloatingPointError`` from the device (under ``jit``, surfaced by JAX as a
        ``jax.errors.JaxRuntimeError`` carrying that message); ``"ignore"`` does not
        check.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update`` needs ``sampled_grads`` (a
      pytree like the gradients, or a zero-argument function returning one, called only on
      statistics steps: see ``value_and_sampled_grad(..., lazy=True)``) unless
      ``fisher="empirical"``. With ``warm_start=True`` it folds the batch into the statistics
      as an arithmetic mean, returns zero updates and leaves ``count`` unchanged (the authors'
      warm start: one pass over the training set at the initial parameters).
    """
    opts = TNTOptions(
        damping=damping,
        ema_decay=ema_decay,
        fisher=fisher,
        stats_every=stats_every,
        inverse_every=inverse_every,
        damping_mode=damping_mode,
        momentum=momentum,
        reshape=reshape,
        max_dim=max_dim,
        fused=on_nonfinite == "skip",
    )
    check_options(opts, on_nonfinite)

    def init_fn(params):
        return init_state(params, opts)

    def update_fn(updates, state, params=None, *, sampled_grads=None, warm_start=False, **extra):
        del params, extra
        return tnt_step(opts, updates, state, sampled_grads, warm_start)

    guarded = safety.guard_nonfinite(
        update_fn, on_nonfinite, "tnt", (extra_args.SAMPLED_GRADS,), init_fn=init_fn, fused=True
    )
    return optax.GradientTransformationExtraArgs(
        init_fn, extra_args.announce(guarded, requirements(fisher))
    )


def tnt(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 0.1,
    *,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: jax.typing.ArrayLike = 0.0,
    ema_decay: jax.typing.ArrayLike = 0.9,
    fisher: str = "true",
    stats_every: int = 1,
    inverse_every: int = 20,
    damping_mode: str = "constant",
    momentum: float = 0.9,
    reshape: str | Callable[[tuple[Any, ...], tuple[int, ...]], Sequence[int]] = (
        "filter_flattening"
    ),
    max_dim: int | None = 4096,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Tensor Normal Training with a learning rate, decoupled weight decay and coupled L2.

    ``chain([add_decayed_weights(l2_reg)], scale_by_tnt, [add_decayed_weights(weight_decay,
    weight_decay_mask)], scale_by_learning_rate)``:

    .. math::

        θ \leftarrow θ - α\,\bigl(Δ(g + λ_2 θ) + τ θ\bigr),

    with ``α`` = ``learning_rate``, ``τ`` = ``weight_decay`` (decoupled: not preconditioned,
    as in the authors' code), ``λ₂`` = ``l2_reg`` (coupled: added to the gradient ``g`` before
    it is preconditioned; default 0) and ``Δ(·)`` the TNT direction of :func:`scale_by_tnt`
    (its statistics come from ``sampled_grads`` as given), whose keyword arguments are
    accepted here. ``stats_every``, ``inverse_every``, ``momentum``,
    ``max_dim``, ``reshape``, ``fisher`` and ``damping_mode`` fix the state's structure or the
    Python control flow: list the numeric ones in ``static_args`` of
    ``optax.inject_hyperparams``. The authors' settings: autoencoders ``lr 1e-4, ε 0.1,
    T₁ 1, T₂ 20``; CNNs ``lr 1e-4, ε 0.01, τ 10, T₁ 10, T₂ 100``. ``on_nonfinite``
    (``"skip"``, ``"raise"`` or ``"ignore"``) says what a step with NaN or infinite gradients,
    statistics or results does; by default it is skipped (zero direction; the decoupled weight
    decay still applies) and counted in ``nonfinite_count`` of the state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import kfqn_jax
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 1])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> apply_fn = lambda p, x: model.apply({"params": p}, x)
      >>> tx = kfqn_jax.tnt(learning_rate=1e-3, damping=0.1)
      >>> opt_state = tx.init(params)
      >>> loss, grads, sampled = kfqn_jax.value_and_sampled_grad(
      ...     apply_fn, params, x, targets=y, loss="softmax_cross_entropy",
      ...     rng=jax.random.key(1))
      >>> updates, opt_state = tx.update(grads, opt_state, params, sampled_grads=sampled)
      >>> params = optax.apply_updates(params, updates)

    References:
      Ren & Goldfarb, `Tensor Normal Training for Deep Learning Models
      <https://arxiv.org/abs/2106.02925>`_, NeurIPS 2021.
    """
    inner = scale_by_tnt(
        damping,
        ema_decay=ema_decay,
        fisher=fisher,
        stats_every=stats_every,
        inverse_every=inverse_every,
        damping_mode=damping_mode,
        momentum=momentum,
        reshape=reshape,
        max_dim=max_dim,
        on_nonfinite=on_nonfinite,
    )
    return alias.build(
        "tnt",
        inner,
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        l2_reg=l2_reg,
    )
