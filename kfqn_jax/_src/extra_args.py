"""The extra-args protocol: every name a kfqn_jax transform reads in ``update``, and how a
transform says what it needs.

Every method is an ``optax.GradientTransformationExtraArgs``. What a method needs besides the
gradient reaches ``update`` as keyword-only extra arguments with the names below, so that
``optax.chain`` passes them through untouched (none collides with optax's own ``value``,
``grad`` and ``value_fn``):

* ``layer_stats``: a ``dict[str, LayerStats]`` from :func:`kfqn_jax.flax.value_grads_and_stats`
  (or the NNX variant), at the current parameters.
* ``stats_fn``: a function ``params -> dict[str, LayerStats]`` on the same minibatch (K-BFGS's
  pass at the trial point).
* ``sampled_grads``: the gradient of the loss on labels sampled from the model (TNT).
* ``loss_fn``: a function ``params -> scalar loss`` on the current minibatch (Levenberg-Marquardt
  damping, line searches).
* ``model_fn`` / ``output_loss``: the model's outputs as a function of the parameters, and the
  :class:`kfqn_jax.losses.Loss` on them (Gauss-Newton products of Hessian-free).
* ``sq_grads``: optional per-example squared gradients (Hessian-free's diagonal preconditioner).
* ``model_outputs`` / ``probe_stats_fn``: the model's outputs on the batch, and a function that
  captures statistics for given output cotangents on the curvature batch (SMW-GN).

Declared requirements
---------------------
Each ``scale_by_*`` transform declares a :class:`Requirements` (which extra arguments it reads
and which capture options they need). The declaration travels in the same channel as the
statistics: called with the extra argument ``kfqn_requirements=[]`` a kfqn transform appends
its requirements to that list and returns its inputs unchanged. Every wrapper that forwards
extra arguments (``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
``flax.nnx.Optimizer``) therefore forwards the question too, and :func:`requirements` reads
the answer for any composition without evaluating anything (one abstract trace).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax

LAYER_STATS = "layer_stats"
STATS_FN = "stats_fn"
SAMPLED_GRADS = "sampled_grads"
LOSS_FN = "loss_fn"
MODEL_FN = "model_fn"
OUTPUT_LOSS = "output_loss"
SQ_GRADS = "sq_grads"
MODEL_OUTPUTS = "model_outputs"
PROBE_STATS_FN = "probe_stats_fn"

#: Every extra argument a kfqn_jax transform reads, in the order the train steps build them.
ALL = (
    LAYER_STATS,
    STATS_FN,
    SAMPLED_GRADS,
    LOSS_FN,
    MODEL_FN,
    OUTPUT_LOSS,
    SQ_GRADS,
    MODEL_OUTPUTS,
    PROBE_STATS_FN,
)

#: The extra argument that asks a transform for its :class:`Requirements`.
REQUIREMENTS_PROBE = "kfqn_requirements"

SAMPLED = (None, "cotangents", "grads", "both")


def _merge_sampled(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b
    if b is None:
        return a
    return "both"


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a transform needs in ``update`` besides the gradient, and how to capture it.

    Attributes:
      extra_args: names of the extra arguments ``update`` reads (from :data:`ALL`).
      sampled: the capture's ``sampled`` option the statistics need: ``None``,
        ``"cotangents"`` (sampled-label cotangents in ``layer_stats``, the true Fisher),
        ``"grads"`` (``sampled_grads``) or ``"both"``.
      with_outputs: ``layer_stats`` must record layer outputs ``h`` (K-BFGS).
      exact_fisher: ``layer_stats`` must carry the loss-Hessian root columns ``g_exact``.
      optional: extra arguments ``update`` uses when given but does not need.
    """

    extra_args: tuple[str, ...] = ()
    sampled: str | None = None
    with_outputs: bool = False
    exact_fisher: bool = False
    optional: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [n for n in self.extra_args + self.optional if n not in ALL]
        if unknown:
            raise ValueError(f"Requirements: unknown extra args {unknown}; choose from {ALL}.")
        if self.sampled not in SAMPLED:
            raise ValueError(f"Requirements: sampled must be one of {SAMPLED}, got {self.sampled!r}.")

    def merge(self, other: Requirements) -> Requirements:
        """The requirements of a composition that contains both transforms."""
        names = tuple(n for n in ALL if n in self.extra_args or n in other.extra_args)
        optional = tuple(
            n for n in ALL if (n in self.optional or n in other.optional) and n not in names
        )
        return Requirements(
            extra_args=names,
            sampled=_merge_sampled(self.sampled, other.sampled),
            with_outputs=self.with_outputs or other.with_outputs,
            exact_fisher=self.exact_fisher or other.exact_fisher,
            optional=optional,
        )


def merge_all(reqs: Iterable[Requirements]) -> Requirements:
    out = Requirements()
    for r in reqs:
        out = out.merge(r)
    return out


def announce(update_fn: Callable[..., Any], reqs: Requirements) -> Callable[..., Any]:
    """Wraps a transform's ``update`` so that it answers :data:`REQUIREMENTS_PROBE`.

    A call with ``kfqn_requirements=some_list`` appends ``reqs`` to the list and returns the
    updates and the state unchanged; every other call goes to ``update_fn``.
    """

    def update(updates, state, params=None, **extra):
        probe = extra.get(REQUIREMENTS_PROBE)
        if probe is not None:
            probe.append(reqs)
            return updates, state
        return update_fn(updates, state, params, **extra)

    return update


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), x.dtype), tree)


def requirements(tx: Any, params: Any) -> Requirements:
    """The :class:`Requirements` of ``tx`` (any composition of transforms) for ``params``.

    Runs ``tx.init`` and ``tx.update`` abstractly (``jax.eval_shape``, no computation), asking
    every kfqn_jax transform inside ``tx`` for its requirements through the extra argument
    :data:`REQUIREMENTS_PROBE`. A transform that forwards no extra arguments hides the
    transforms inside it; transforms of other libraries need nothing.

    Example:
      >>> import optax, jax.numpy as jnp, kfqn_jax
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), kfqn_jax.kfac(0.1))
      >>> kfqn_jax.requirements(tx, {"w": jnp.ones((3, 2))}).extra_args
      ('layer_stats',)

    Args:
      tx: an ``optax.GradientTransformation``.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``), as given to ``tx.init``.

    Returns:
      The merged requirements (empty for a transform with none).
    """
    found: list[Requirements] = []

    def probe(p):
        state = tx.init(p)
        tx.update(p, state, p, **{REQUIREMENTS_PROBE: found})
        return ()

    try:
        jax.eval_shape(probe, _abstract(params))
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(
            "kfqn_jax.requirements: could not ask the transform for its extra arguments "
            f"({type(e).__name__}: {e}). Pass them explicitly instead, e.g. "
            "make_train_step(model, loss, needs=('layer_stats',), sampled='cotangents')."
        ) from e
    return merge_all(found)
