r"""Shampoo (Gupta, Koren & Singer, ICML 2018), as the TNT paper's baseline and with grafting.

Every parameter tensor is split into modes ``d_1 × … × d_k`` by the same rules as TNT
(:func:`kfqn_jax._src.tnt.mode_sizes`). Per mode the contraction of the gradient ``G`` over
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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kfqn_jax._src import base, linalg, safety
from kfqn_jax._src import tnt as tnt_lib


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
    layout: tnt_lib.ModeLayout,
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
      reshape: modes of each leaf, as for TNT (see :func:`kfqn_jax._src.tnt.mode_sizes`).
      max_dim: modes larger than this keep a diagonal statistic (static; ``None``: no cap).
      ON_NONFINITE

    Returns:
      An ``optax.GradientTransformationExtraArgs`` needing no extra argument.
    """
    base.check_choice("shampoo", "root_method", root_method, ("eigh", "newton"))
    if root_order is not None:
        base.check_positive_int("shampoo", "root_order", root_order, what=" or None (2k)")
    base.check_positive_int("shampoo", "stats_every", stats_every)
    base.check_positive_int("shampoo", "inverse_every", inverse_every)
    tnt_lib.check_common("shampoo", ema_decay, momentum, max_dim, reshape)
    base.check_damping("shampoo", damping)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        layouts = tnt_lib.layouts_of(params, reshape, max_dim)
        dtypes = [base.as_float(p.dtype) for p in leaves]
        pairs = list(zip(layouts, dtypes, strict=True))
        mom = ()
        if momentum > 0:
            mom = treedef.unflatten(
                [jnp.zeros(p.shape, dt) for p, dt in zip(leaves, dtypes, strict=True)]
            )
        graft_state = ()
        if graft is not None:
            graft_state = graft.init(
                treedef.unflatten([p.astype(dt) for p, dt in zip(leaves, dtypes, strict=True)])
            )
        return ScaleByShampooState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            stats_count=jnp.zeros([], jnp.int32),
            factors=treedef.unflatten([tnt_lib.init_factors(lo, dt, "zeros") for lo, dt in pairs]),
            preconditioners=treedef.unflatten(
                [tnt_lib.init_factors(lo, dt, "eye") for lo, dt in pairs]
            ),
            momentum=mom,
            graft_state=graft_state,
        )

    def update_fn(updates, state, params=None, **extra):
        del extra
        leaves, treedef = jax.tree.flatten(updates)
        layouts = tnt_lib.layouts_of(updates, reshape, max_dim)
        factors = tnt_lib.flatten_like(treedef, state.factors, "state.factors", "shampoo")
        precs = tnt_lib.flatten_like(
            treedef, state.preconditioners, "state.preconditioners", "shampoo"
        )
        count = state.count
        dtypes = [f[0].dtype for f in factors]

        def new_stats(operand):
            old, n = operand
            out = []
            for g, lo, fac, dt in zip(leaves, layouts, old, dtypes, strict=True):
                cs = tnt_lib.mode_contractions(g.astype(dt), lo)
                if ema_decay is None:
                    out.append(tuple(s + c for s, c in zip(fac, cs, strict=True)))
                else:
                    w = tnt_lib.ema_weight(ema_decay, n, dt, False)
                    out.append(tuple((1 - w) * s + w * c for s, c in zip(fac, cs, strict=True)))
            return out, n + 1

        operand = (factors, state.stats_count)
        do_stats = (count % stats_every) == 0
        if stats_every == 1:
            factors, n_stats = new_stats(operand)
        else:
            factors, n_stats = lax.cond(do_stats, new_stats, lambda op: op, operand)

        damp = damping(count) if callable(damping) else damping
        do_inv = (count % inverse_every == 0) | ((count < inverse_every) & do_stats)
        new_precs = []
        # One cond per leaf (see kfac.py on LAPACK calls in one big cond on CPU).
        for lo, fac, pre, dt in zip(layouts, factors, precs, dtypes, strict=True):
            p = root_order if root_order is not None else 2 * len(lo.modes)

            def refresh(ops, lo=lo, dt=dt, p=p):
                fac, pre = ops
                new = shampoo_roots(
                    fac, lo, jnp.asarray(damp, dt), p, root_method, newton_iters, newton_tol
                )
                return linalg.where_finite(new, pre)

            if inverse_every == 1:
                new_precs.append(refresh((fac, tuple(pre))))
            else:
                new_precs.append(lax.cond(do_inv, refresh, lambda ops: ops[1], (fac, tuple(pre))))

        mom_leaves = jax.tree.leaves(state.momentum) if momentum > 0 else None
        dirs, new_mom = [], []
        for i, (g, lo, pre, dt) in enumerate(zip(leaves, layouts, new_precs, dtypes, strict=True)):
            x = g.astype(dt)
            if momentum > 0:
                x = momentum * mom_leaves[i] + x
                new_mom.append(x)
            dirs.append(tnt_lib.precondition(x, pre, lo))

        graft_state = state.graft_state
        if graft is not None:
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
            dirs = scaled

        out = [d.astype(g.dtype) for d, g in zip(dirs, leaves, strict=True)]
        new_state = ScaleByShampooState(
            count=optax.safe_increment(count),
            nonfinite_count=state.nonfinite_count,
            stats_count=n_stats,
            factors=treedef.unflatten([tuple(f) for f in factors]),
            preconditioners=treedef.unflatten(new_precs),
            momentum=treedef.unflatten(new_mom) if momentum > 0 else (),
            graft_state=graft_state,
        )
        return treedef.unflatten(out), new_state

    guarded = safety.guard_nonfinite(update_fn, on_nonfinite, "shampoo", init_fn=init_fn)
    return optax.GradientTransformationExtraArgs(init_fn, guarded)


scale_by_shampoo.__doc__ = scale_by_shampoo.__doc__.replace("ON_NONFINITE", safety.ON_NONFINITE_DOC)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    damping: optax.ScalarOrSchedule = 1e-4,
    *,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any = None,
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
    r"""Shampoo with a learning rate and decoupled weight decay.

    ``chain(scale_by_shampoo, add_decayed_weights, scale_by_learning_rate)``:
    ``θ ← θ − α (Δ + τ θ)`` with ``α`` = ``learning_rate``, ``τ`` = ``weight_decay`` and
    ``Δ`` the direction of :func:`scale_by_shampoo`, whose keyword arguments are accepted here.
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
    parts = [
        scale_by_shampoo(
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
    ]
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
