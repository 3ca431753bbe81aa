"""The registry of methods for the invariant matrix (tests/test_common.py).

Every method of kfqn_jax adds one ``MethodCase`` here. A case says how to build the transform
(with a learning rate, so that it is a complete optimizer), which extra args it requires, and
how to produce them on the shared tiny problem (``Ctx``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import kfqn_jax
from kfqn_jax import flax as kfx


class TinyMLP(nn.Module):
    """6 -> 8 -> 3 MLP with a bias-free middle layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        x = nn.tanh(x)
        x = nn.Dense(5, use_bias=False)(x)
        x = nn.relu(x)
        return nn.Dense(3)(x)


@dataclasses.dataclass
class Ctx:
    """The tiny problem every method is run on: softmax cross-entropy on 3 classes."""

    dtype: Any = jnp.float32
    batch: int = 8

    def __post_init__(self):
        self.model = TinyMLP()
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        self.x = jax.random.normal(k1, (self.batch, 6), self.dtype)
        self.y = jax.random.randint(k2, (self.batch,), 0, 3)
        params = self.model.init(k3, jnp.zeros((1, 6), jnp.float32))["params"]
        self.params = jax.tree.map(lambda p: p.astype(self.dtype), params)
        self.loss = kfqn_jax.losses.softmax_cross_entropy()
        self.rng = jax.random.key(1)

    def loss_fn(self, params):
        return self.loss(self.model.apply({"params": params}, self.x), self.y)

    def capture(self, params, sampled="both", with_outputs=True):
        return kfx.value_grads_and_stats(
            self.model,
            params,
            self.x,
            targets=self.y,
            loss=self.loss,
            rng=self.rng,
            sampled=sampled,
            with_outputs=with_outputs,
        )


def apply_step(case: MethodCase, ctx: Ctx, tx: Any, params: Any, state: Any):
    """One training step of ``case`` on ``ctx``'s batch: ``(params, state, updates)``."""
    grads = jax.grad(ctx.loss_fn)(params)
    extra = case.extra_args(ctx, params)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, updates


@dataclasses.dataclass(frozen=True)
class MethodCase:
    """How to run one method in the invariant matrix.

    Attributes:
      name: public factory name.
      factory: the public factory (``kfqn_jax.kfac``), called as ``factory(**kwargs)``.
      kwargs: arguments giving a complete optimizer (learning rate included).
      required: names of the extra args ``update`` cannot do without.
      extra_args: ``(ctx, params) -> dict`` of the extra args for the current params.
      static_args: numeric arguments that fix the state's structure or Python control flow
        (periods, memory sizes, momentum on/off); ``inject_hyperparams`` must keep them static.
    """

    name: str
    factory: Callable[..., Any]
    kwargs: dict
    required: tuple[str, ...]
    extra_args: Callable[[Ctx, Any], dict]
    static_args: tuple[str, ...] = ()


def _kfac_args(ctx: Ctx, params: Any) -> dict:
    return {"layer_stats": ctx.capture(params, sampled="cotangents").stats}


CASES: list[MethodCase] = [
    MethodCase(
        name="kfac",
        factory=kfqn_jax.kfac,
        kwargs=dict(learning_rate=0.1, damping=0.1, inverse_every=2),
        required=("layer_stats",),
        extra_args=_kfac_args,
        static_args=(
            "stats_every",
            "inverse_every",
            "momentum",
            "ema_decay",
            "pi_damping",
            "weight_decay",
        ),
    ),
    # Other methods append their MethodCase below (one block per method).
    *(
        MethodCase(
            name=_name,
            factory=getattr(kfqn_jax, _name),
            kwargs=dict(learning_rate=0.1, damping=0.3, memory_size=4)
            if _name == "kbfgs_l"
            else dict(learning_rate=0.1, damping=0.3),
            required=("layer_stats", "stats_fn"),
            extra_args=lambda ctx, params: {
                "layer_stats": ctx.capture(params, sampled=None, with_outputs=True).stats,
                "stats_fn": lambda p: kfx.layer_stats(
                    ctx.model, p, ctx.x, targets=ctx.y, loss=ctx.loss
                ),
            },
            static_args=(("memory_size",) if _name == "kbfgs_l" else ())
            + (
                "inverse_every",
                "momentum",
                "ema_decay",
                "pair_decay",
                "powell_mu",
                "skip_eps",
                "weight_decay",
            ),
        )
        for _name in ("kbfgs", "kbfgs_l")
    ),
    *(
        MethodCase(
            name=_name,
            factory=getattr(kfqn_jax, _name),
            kwargs=dict(learning_rate=1.0, damping=0.1, max_cg_iters=10),
            required=("model_fn", "output_loss", "loss_fn"),
            extra_args=lambda ctx, params: {
                "model_fn": lambda p: ctx.model.apply({"params": p}, ctx.x),
                "output_loss": ctx.loss,
                "loss_fn": ctx.loss_fn,
            },
            static_args=("max_cg_iters",),
        )
        for _name in ("hessian_free", "block_hessian_free")
    ),
    MethodCase(
        name="tnt",
        factory=kfqn_jax.tnt,
        kwargs=dict(learning_rate=0.05, damping=0.1, stats_every=1, inverse_every=2),
        required=("sampled_grads",),
        extra_args=lambda ctx, params: {
            "sampled_grads": kfqn_jax.value_and_sampled_grad(
                lambda p, x: ctx.model.apply({"params": p}, x),
                params,
                ctx.x,
                targets=ctx.y,
                loss=ctx.loss,
                rng=ctx.rng,
            )[2]
        },
        static_args=("stats_every", "inverse_every", "momentum", "max_dim"),
    ),
    MethodCase(
        name="shampoo",
        factory=kfqn_jax.shampoo,
        kwargs=dict(learning_rate=0.05, damping=1e-3, inverse_every=2),
        required=(),
        extra_args=lambda ctx, params: {},
        static_args=(
            "stats_every",
            "inverse_every",
            "momentum",
            "max_dim",
            "root_order",
            "newton_iters",
        ),
    ),
    *(
        MethodCase(
            name=_name,
            factory=getattr(kfqn_jax, _name),
            kwargs=dict(learning_rate=1.0, damping=1.0, curvature_batch=4),
            required=("layer_stats", "loss_fn")
            if _name == "smw_ng"
            else ("probe_stats_fn", "model_outputs", "loss_fn"),
            extra_args=(
                lambda ctx, params: {
                    "layer_stats": ctx.capture(params, sampled="cotangents").stats,
                    "loss_fn": ctx.loss_fn,
                }
            )
            if _name == "smw_ng"
            else (
                lambda ctx, params: {
                    "model_outputs": ctx.model.apply({"params": params}, ctx.x),
                    "probe_stats_fn": lambda v: kfx.layer_stats(
                        ctx.model, params, ctx.x[:4], targets=v, loss=kfqn_jax.OutputProbe()
                    ),
                    "loss_fn": ctx.loss_fn,
                }
            ),
            static_args=("curvature_batch", "momentum", "weight_decay", "adapt_damping")
            + (() if _name == "smw_ng" else ("output_samples", "max_system_size", "seed")),
        )
        for _name in ("smw_ng", "smw_gn")
    ),
]
