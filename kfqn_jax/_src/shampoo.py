r"""Shampoo (Gupta, Koren & Singer, ICML 2018), as the TNT paper's baseline and with grafting.

Every parameter tensor is split into modes ``d_1 × … × d_k`` by the same rules as TNT
(:func:`kfqn_jax._src.tensor_modes.mode_sizes`). Per mode the contraction of the gradient ``G`` over
the other axes is accumulated,

.. math::

    L_i \leftarrow (1 - w) L_i + w\, G_{(i)} G_{(i)}^\top, \qquad
    w = \max(1 - β, 1/(n + 1)),

(or ``L_i ← L_i + G_(i) G_(i)ᵀ``, Gupta et al.'s sum, with ``ema_decay=None``) and the
direction applied to the momentum ``m ← μ m + G`` is

.. math::

    Δ = m \times_1 (L_1 + εI)^{-1/(2k)} \times_2 \dots \times_k (L_k + εI)^{-1/(2k)} .

With grafting, each leaf's ``Δ`` is rescaled to the norm of another optimizer's step on the
same gradient, ``Δ ← Δ ‖D_graft‖ / ‖Δ‖`` (Agarwal et al. 2020).

Each leaf is one *mode block* (:class:`ShampooBlock`: init, statistics and their sum or moving
average, refresh of the inverse roots, preconditioning); the reshaping rules, the contractions,
the mode products and the loops over the leaves are shared with TNT in
:mod:`kfqn_jax._src.tensor_modes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfqn_jax._src import alias, base, extra_args, linalg, safety
from kfqn_jax._src import tensor_modes as tm


class ScaleByShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`.

    Attributes:
      count: number of steps taken (int32); a skipped step (see ``on_nonfinite``) does not
        count.
      nonfinite_count: number of steps skipped because of non-finite values (int32).
      stats_count: number of statistics updates (int32).
      factors: the tree of the parameters with, at each leaf, the tuple of per-mode statistics
        ``L_i`` (``d_i × d_i``, or the diagonal ``(d_i,)`` above ``max_dim``).
      preconditioners: the same tree of ``(L_i + ε I)^{-1/p}`` from the last refresh.
      momentum: the tree of momentum buffers, or ``()`` when ``momentum == 0``.
      graft_state: state of the grafting transform, or ``()``.
    """

    count: jax.Array
    nonfinite_count: jax.Array
    stats_count: jax.Array
    factors: Any
    preconditioners: Any
    momentum: Any
    graft_state: Any


def shampoo_roots(
    stats: Sequence[jax.Array],
    layout: tm.ModeLayout,
    damping: jax.Array,
    p: int,
    method: str,
    num_iters: int,
    tol: float,
) -> tuple[jax.Array, ...]:
    """``(L_i + ε I)^{-1/p}`` per mode of one leaf (elementwise for diagonal modes)."""
    out = []
    for s, f in zip(stats, layout.full, strict=True):
        if f:
            out.append(
                linalg.inverse_pth_root(s, p, damping, method=method, num_iters=num_iters, tol=tol)
            )
        else:
            out.append(jnp.power(s + damping, -1.0 / p))
    return tuple(out)


class ShampooBlock(NamedTuple):
    """One parameter leaf's Shampoo curvature block (static).

    Attributes:
      layout: the leaf's :class:`~kfqn_jax._src.tensor_modes.ModeLayout`.
      ema_decay: ``β`` of the statistics' moving average, or ``None`` (their sum).
      root_order: ``p`` of the inverse roots.
      root_method: ``"eigh"`` or ``"newton"``.
      newton_iters: maximum Newton iterations.
      newton_tol: Newton stopping tolerance.
    """

    layout: tm.ModeLayout
    ema_decay: Any
    root_order: int
    root_method: str
    newton_iters: int
    newton_tol: float

    def init(self, dtype: Any) -> tm.BlockInit:
        """Zero statistics ``L_i``, identity roots (diagonals above ``max_dim``)."""
        return tm.zero_stats_identity_roots(self.layout, dtype)

    def statistics(self, g: jax.Array, dtype: Any) -> tuple[jax.Array, ...]:
        """The contractions ``G_(i) G_(i)ᵀ`` of one gradient."""
        return tuple(tm.mode_contractions(g.astype(dtype), self.layout))

    def accumulate(
        self, factors: tuple, stats: tuple, n: jax.Array, warm_start: bool = False
    ) -> tuple:
        """``L_i ← L_i + C_i`` (``ema_decay=None``) or ``(1 - w) L_i + w C_i`` after ``n``
        earlier updates (``w = 1/(n+1)`` for a warm-start batch)."""
        if self.ema_decay is None:
            return tuple(s + c for s, c in zip(factors, stats, strict=True))
        w = tm.ema_weight(self.ema_decay, n, factors[0].dtype, warm_start)
        return tuple((1 - w) * s + w * c for s, c in zip(factors, stats, strict=True))

    def refresh(self, factors: tuple, damping: Any) -> tuple[jax.Array, ...]:
        """``(L_i + ε I)^{-1/p}`` from the statistics."""
        damping = jnp.asarray(damping, factors[0].dtype)
        return shampoo_roots(
            factors,
            self.layout,
            damping,
            self.root_order,
            self.root_method,
            self.newton_iters,
            self.newton_tol,
        )

    def precondition(self, roots: tuple, x: jax.Array) -> jax.Array:
        """``x ×_1 R_1 ×_2 … ×_k R_k``."""
        return tm.precondition(x, roots, self.layout)


class ShampooOptions(NamedTuple):
    """The static settings of one :func:`scale_by_shampoo` (see its arguments)."""

    damping: Any
    ema_decay: Any
    stats_every: int
    inverse_every: int
    root_method: str
    root_order: int | None
    newton_iters: int
    newton_tol: float
    momentum: float
    graft: Any
    reshape: Any
    max_dim: int | None


def shampoo_blocks(tree: Any, opts: ShampooOptions) -> list[ShampooBlock]:
    """The :class:`ShampooBlock` of every leaf of ``tree``; ``p = 2k`` unless ``root_order``."""
    out = []
    for lo in tm.layouts_of(tree, opts.reshape, opts.max_dim):
        p = opts.root_order if opts.root_order is not None else 2 * len(lo.modes)
        args = (opts.root_method, opts.newton_iters, opts.newton_tol)
        out.append(ShampooBlock(lo, opts.ema_decay, p, *args))
    return out


def check_options(opts: ShampooOptions) -> None:
    """The construction-time checks of :func:`scale_by_shampoo` (``on_nonfinite``: by the
    guard)."""
    base.check_choice("shampoo", "root_method", opts.root_method, ("eigh", "newton"))
    if opts.root_order is not None:
        base.check_positive_int("shampoo", "root_order", opts.root_order, what=" or None (2k)")
    base.check_positive_int("shampoo", "stats_every", opts.stats_every)
    base.check_positive_int("shampoo", "inverse_every", opts.inverse_every)
    tm.check_common("shampoo", opts.ema_decay, opts.momentum, opts.max_dim, opts.reshape)
    base.check_damping("shampoo", opts.damping)


def init_state(params: Any, opts: ShampooOptions) -> ScaleByShampooState:
    """The state before any step: zero statistics, identity roots, zero momentum, the graft's
    state (on the parameters in the statistics' dtypes)."""
    leaves, treedef = jax.tree.flatten(params)
    dtypes = tm.leaf_dtypes(leaves)
    inits = [blk.init(dt) for blk, dt in zip(shampoo_blocks(params, opts), dtypes, strict=True)]
    graft_state = ()
    if opts.graft is not None:
        graft_state = opts.graft.init(
            treedef.unflatten([p.astype(dt) for p, dt in zip(leaves, dtypes, strict=True)])
        )
    return ScaleByShampooState(
        count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        stats_count=jnp.zeros([], jnp.int32),
        factors=treedef.unflatten([b.factors for b in inits]),
        preconditioners=treedef.unflatten([b.roots for b in inits]),
        momentum=tm.init_momentum(leaves, treedef, dtypes, opts.momentum),
        graft_state=graft_state,
    )


def fold_statistics(
    blocks: Sequence[ShampooBlock],
    leaves: Sequence[jax.Array],
    factors: list,
    n: jax.Array,
    warm_start: bool = False,
) -> tuple[list[tuple], jax.Array]:
    """Folds one gradient into every leaf's statistics: ``(factors, stats_count)``."""
    out = []
    for blk, g, fac in zip(blocks, leaves, factors, strict=True):
        out.append(blk.accumulate(fac, blk.statistics(g, fac[0].dtype), n, warm_start))
    return out, n + 1


def graft_directions(
    graft: optax.GradientTransformation,
    graft_state: Any,
    dirs: Sequence[jax.Array],
    leaves: Sequence[jax.Array],
    dtypes: Sequence[Any],
    treedef: Any,
    params: Any,
) -> tuple[list[jax.Array], Any]:
    """Each leaf's ``Δ`` rescaled to the norm of ``graft``'s step on the same gradient (in the
    statistics' dtypes): ``Δ ‖D_graft‖ / ‖Δ‖`` (``Δ`` itself where ``‖Δ‖ = 0``)."""
    g32 = treedef.unflatten([g.astype(dt) for g, dt in zip(leaves, dtypes, strict=True)])
    p32 = None
    if params is not None:
        p32 = jax.tree.map(lambda q, dt: q.astype(dt), params, treedef.unflatten(dtypes))
    g_steps, graft_state = graft.update(g32, graft_state, p32)
    scaled = []
    for d, s in zip(dirs, jax.tree.leaves(g_steps), strict=True):
        dn = optax.safe_norm(d, 0.0)
        ratio = optax.safe_norm(s, 0.0) / jnp.where(dn > 0, dn, jnp.ones((), dn.dtype))
        scaled.append(d * ratio)
    return scaled, graft_state


def shampoo_step(
    opts: ShampooOptions,
    updates: Any,
    state: ScaleByShampooState,
    params: Any,
    warm_start: bool = False,
) -> tuple[Any, ScaleByShampooState]:
    """One ``update`` of :func:`scale_by_shampoo`: statistics every ``T_1`` steps, roots on
    their schedule, momentum and the mode products, grafting (a warm-start batch: statistics
    only, zero updates)."""
    leaves, treedef = jax.tree.flatten(updates)
    blocks = shampoo_blocks(updates, opts)
    factors = tm.flatten_like(treedef, state.factors, "state.factors", "shampoo")
    precs = tm.flatten_like(treedef, state.preconditioners, "state.preconditioners", "shampoo")
    count = state.count
    dtypes = [f[0].dtype for f in factors]

    def fold(operand):
        return fold_statistics(blocks, leaves, *operand)

    operand = (factors, state.stats_count)
    if warm_start:
        factors, n_stats = fold_statistics(blocks, leaves, *operand, warm_start=True)
        zeros = jax.tree.map(jnp.zeros_like, updates)
        return zeros, state._replace(
            factors=treedef.unflatten([tuple(f) for f in factors]), stats_count=n_stats
        )
    do_stats = (count % opts.stats_every) == 0
    factors, n_stats = tm.every(opts.stats_every, do_stats, fold, lambda op: op, operand)
    damp = opts.damping(count) if callable(opts.damping) else opts.damping
    do_inv = tm.refresh_due(count, opts.inverse_every, do_stats)
    always = opts.inverse_every == 1
    new_precs = tm.refresh_leaves(blocks, factors, precs, do_inv, damp, always)
    dirs, new_mom = tm.precondition_leaves(blocks, leaves, new_precs, state.momentum, opts.momentum)
    graft_state = state.graft_state
    if opts.graft is not None:
        dirs, graft_state = graft_directions(
            opts.graft, graft_state, dirs, leaves, dtypes, treedef, params
        )
    out = [d.astype(g.dtype) for d, g in zip(dirs, leaves, strict=True)]
    new_state = ScaleByShampooState(
        count=optax.safe_increment(count),
        nonfinite_count=state.nonfinite_count,
        stats_count=n_stats,
        factors=treedef.unflatten([tuple(f) for f in factors]),
        preconditioners=treedef.unflatten(new_precs),
        momentum=treedef.unflatten(new_mom) if opts.momentum > 0 else (),
        graft_state=graft_state,
    )
    return treedef.unflatten(out), new_state


def scale_by_shampoo(
    damping: optax.ScalarOrSchedule = 1e-4,
    *,
    ema_decay: float | None = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    root_method: str = "eigh",
    root_order: int | None = None,
    newton_iters: int = 100,
    newton_tol: float = 1e-6,
    momentum: float = 0.9,
    graft: optax.GradientTransformation | None = None,
    reshape: str | Callable[[tuple[Any, ...], tuple[int, ...]], Sequence[int]] = (
        "filter_flattening"
    ),
    max_dim: int | None = 4096,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions every parameter with Shampoo; no learning rate (see :func:`shampoo`).

    .. math::

        L_i \leftarrow (1 - w) L_i + w\, G_{(i)} G_{(i)}^\top \ \text{every } T_1 \text{ steps},
        \qquad R_i = (L_i + ε I)^{-1/p}\ \text{every } T_2 \text{ steps},\\
        m \leftarrow μ m + G, \qquad Δ = m \times_1 R_1 \times_2 \dots \times_k R_k
        \ \bigl(\times \lVert D_{\mathrm{graft}} \rVert / \lVert Δ \rVert\bigr),

    with ``ε`` = ``damping``, ``T_1`` = ``stats_every``, ``T_2`` = ``inverse_every``, ``μ`` =
    ``momentum``, ``p`` = ``root_order`` (default ``2k`` for a leaf of ``k`` modes),
    ``w = max(1 − β, 1/(n+1))`` with ``β`` = ``ema_decay`` and ``D_graft`` the step of
    ``graft`` on the same gradient, per leaf. While the step count is below ``T_2`` the roots
    are refreshed at every statistics update, as for TNT.

    Args:
      damping: ``ε`` added to every ``L_i`` (scalar or schedule).
      ema_decay: ``β`` of the statistics' moving average (the TNT authors' Shampoo: 0.9);
        ``None`` sums them (Gupta et al. 2018).
      stats_every: ``T_1`` (static int).
      inverse_every: ``T_2`` (static int).
      root_method: ``"eigh"`` (default; eigendecomposition) or ``"newton"`` (the coupled Newton
        iteration the TNT authors used; matmuls only).
      root_order: ``p``; ``None`` gives ``2k`` (Gupta et al.).
      newton_iters: maximum Newton iterations (the authors: 100).
      newton_tol: Newton stopping tolerance (the authors: 1e-6).
      momentum: ``μ`` of the heavy-ball momentum on the gradient before preconditioning, as
        in the TNT authors' code (static; 0 disables it).
      graft: an optax transform whose per-leaf step norm ``Δ`` takes (e.g.
        ``optax.scale_by_adam()``, ``optax.scale_by_rss()``), or ``None`` (the TNT authors'
        Shampoo has none). It sees the gradient in float32 (float64 with float64 parameters).
      reshape: modes of each leaf, as for TNT (see :func:`kfqn_jax._src.tensor_modes.mode_sizes`).
      max_dim: modes larger than this keep a diagonal statistic (static; ``None``: no cap).
      on_nonfinite: what a step does when the gradients, the statistics it is given, or
        the updates and state it produces hold a NaN or an infinity: ``"skip"``
        (default) returns zero updates and the previous state with ``nonfinite_count``
        incremented (so ``count`` does not advance either); ``"raise"`` raises a
        ``FloatingPointError`` from the device (under ``jit``, surfaced by JAX as a
        ``jax.errors.JaxRuntimeError`` carrying that message); ``"ignore"`` does not
        check.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` needing no extra argument. With
      ``warm_start=True`` it folds the gradient into the statistics (as an arithmetic mean
      with ``ema_decay``), returns zero updates and leaves ``count`` unchanged, as TNT does.
    """
    opts = ShampooOptions(
        damping=damping,
        ema_decay=ema_decay,
        stats_every=stats_every,
        inverse_every=inverse_every,
        root_method=root_method,
        root_order=root_order,
        newton_iters=newton_iters,
        newton_tol=newton_tol,
        momentum=momentum,
        graft=graft,
        reshape=reshape,
        max_dim=max_dim,
    )
    check_options(opts)

    def init_fn(params):
        return init_state(params, opts)

    def update_fn(updates, state, params=None, *, warm_start=False, **extra):
        del extra
        return shampoo_step(opts, updates, state, params, warm_start)

    guarded = safety.guard_nonfinite(update_fn, on_nonfinite, "shampoo", init_fn=init_fn)
    return optax.GradientTransformationExtraArgs(
        init_fn, extra_args.announce(guarded, extra_args.Requirements())
    )


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 1e-4,
    *,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: jax.typing.ArrayLike = 0.0,
    ema_decay: float | None = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    root_method: str = "eigh",
    root_order: int | None = None,
    newton_iters: int = 100,
    newton_tol: float = 1e-6,
    momentum: float = 0.9,
    graft: optax.GradientTransformation | None = None,
    reshape: str | Callable[[tuple[Any, ...], tuple[int, ...]], Sequence[int]] = (
        "filter_flattening"
    ),
    max_dim: int | None = 4096,
    on_nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Shampoo with a learning rate, decoupled weight decay and coupled L2.

    ``chain([add_decayed_weights(l2_reg)], scale_by_shampoo, [add_decayed_weights(weight_decay,
    weight_decay_mask)], scale_by_learning_rate)``: ``θ ← θ − α (Δ(g + λ₂ θ) + τ θ)`` with
    ``α`` = ``learning_rate``, ``τ`` = ``weight_decay`` (decoupled), ``λ₂`` = ``l2_reg``
    (coupled: added to the gradient ``g`` before the statistics and the preconditioning;
    default 0) and ``Δ(·)`` the direction of :func:`scale_by_shampoo`, whose keyword arguments
    are accepted here.
    The TNT authors' settings: MNIST autoencoder ``lr 3e-4, ε 3e-4, T₂ 20``; CIFAR-10
    ``lr 0.01, ε 0.01, τ 0.1``. ``stats_every``, ``inverse_every``, ``momentum``,
    ``root_order``, ``newton_iters`` and ``max_dim`` are static for
    ``optax.inject_hyperparams``. ``on_nonfinite`` (``"skip"``, ``"raise"`` or ``"ignore"``)
    says what a step with NaN or infinite gradients or results does; by default it is skipped
    (zero direction; the decoupled weight decay still applies) and counted in
    ``nonfinite_count`` of the state.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import kfqn_jax
      >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
      >>> tx = kfqn_jax.shampoo(learning_rate=1e-2, damping=1e-4,
      ...                       graft=optax.scale_by_rss())
      >>> opt_state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, opt_state = tx.update(grads, opt_state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Gupta, Koren & Singer, `Shampoo: Preconditioned Stochastic Tensor Optimization
      <https://arxiv.org/abs/1802.09568>`_, ICML 2018.
      Agarwal et al., `Disentangling Adaptive Gradient Methods from Learning Rates
      <https://arxiv.org/abs/2002.11803>`_, 2020 (grafting).
      Ren & Goldfarb, `Tensor Normal Training for Deep Learning Models
      <https://arxiv.org/abs/2106.02925>`_, NeurIPS 2021 (the baseline as coded there).
    """
    inner = scale_by_shampoo(
        damping,
        ema_decay=ema_decay,
        stats_every=stats_every,
        inverse_every=inverse_every,
        root_method=root_method,
        root_order=root_order,
        newton_iters=newton_iters,
        newton_tol=newton_tol,
        momentum=momentum,
        graft=graft,
        reshape=reshape,
        max_dim=max_dim,
        on_nonfinite=on_nonfinite,
    )
    return alias.build(
        "shampoo",
        inner,
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask,
        l2_reg=l2_reg,
    )
