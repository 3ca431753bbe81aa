"""The ordinary and the sampled-label gradient from one forward pass (plain JAX, no Flax).

The true Fisher of a model with predictive distribution ``p(y | x, θ)`` is
``F = E_x E_{ŷ ~ p(y|x,θ)} [∇ℓ(ŷ) ∇ℓ(ŷ)ᵀ]``: its statistics come from gradients of the loss on
labels *sampled from the model*, not on the training labels (that would be the empirical
Fisher). Both gradients share the forward pass: with ``z = f(θ, x)`` and the VJP
``v ↦ (∂z/∂θ)ᵀ v`` of the model, the training gradient is the VJP of ``∂L(z, y)/∂z`` and the
sampled-label gradient the VJP of ``∂L(z, ŷ)/∂z``, ``ŷ ~ p(· | z)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from kfqn_jax._src import losses as losses_lib


def value_and_sampled_grad(
    apply_fn: Callable[..., Any],
    params: Any,
    *inputs: Any,
    targets: Any,
    loss: Any,
    rng: jax.Array,
    sampler: Callable[[jax.Array, Any], Any] | None = None,
    has_aux: bool = False,
    lazy: bool = False,
) -> tuple[Any, Any, Any]:
    r"""Loss, gradient and sampled-label gradient with one ``jax.vjp`` and two cotangents.

    .. math::

        z = f(θ, x), \qquad L = \ell(z, y), \qquad ŷ \sim p(\cdot \mid z), \\
        ∇_θ L = J^\top ∂_z \ell(z, y), \qquad ∇_θ \hat L = J^\top ∂_z \ell(z, ŷ),

    where :math:`f` = ``apply_fn``, :math:`θ` = ``params``, :math:`x` = ``inputs``, :math:`y` =
    ``targets``, :math:`\ell` = ``loss`` (the batch *mean*, as in :mod:`kfqn_jax.losses`),
    :math:`J = ∂z/∂θ` and :math:`ŷ` is drawn with ``rng`` by ``sampler`` (default
    ``loss.sample``). The model runs forward once; the two gradients are two pullbacks of the
    same ``jax.vjp`` (no second forward pass). The sampled targets carry no gradient.

    Args:
      apply_fn: ``apply_fn(params, *inputs) -> outputs`` (or ``(outputs, aux)`` with
        ``has_aux``), e.g. ``lambda p, x: model.apply({"params": p}, x)``.
      params: the parameters (any pytree).
      *inputs: positional inputs of ``apply_fn`` after ``params``.
      targets: the training targets, passed to the loss.
      loss: a :class:`kfqn_jax.losses.Loss`, one of the names ``"softmax_cross_entropy"``,
        ``"sigmoid_cross_entropy"``, ``"squared_error"``, or any callable
        ``loss(outputs, targets) -> scalar`` (then ``sampler`` is required).
      rng: a ``jax.random`` key for the sampled targets.
      sampler: ``sampler(rng, outputs) -> targets`` drawing from the model's predictive
        distribution, for losses other than the built-in ones (or subclass
        :class:`kfqn_jax.losses.Loss` and implement ``sample``).
      has_aux: ``apply_fn`` returns ``(outputs, aux)``; the loss is then returned as
        ``(loss, aux)``.
      lazy: return the sampled-label gradient as a zero-argument function instead of a pytree.
        Calling it runs only the second pullback, so an optimizer that needs it every ``T₁``
        steps (``kfqn_jax.tnt(stats_every=T₁)``) can call it inside its ``lax.cond`` and skip
        the backward pass on the other steps.

    Returns:
      ``(loss, grads, sampled_grads)``: the mean training loss (``(loss, aux)`` with
      ``has_aux``), its gradient and the sampled-label gradient (a function with ``lazy``), the
      last two with the structure of ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import kfqn_jax
      >>> def apply_fn(p, x):
      ...     return x @ p["w"]
      >>> params = {"w": jnp.ones((3, 4))}
      >>> x, y = jnp.ones((2, 3)), jnp.array([0, 3])
      >>> loss, grads, sampled = kfqn_jax.value_and_sampled_grad(
      ...     apply_fn, params, x, targets=y, loss="softmax_cross_entropy", rng=jax.random.key(0))
      >>> sampled["w"].shape
      (3, 4)

    References:
      Martens, `New insights and perspectives on the natural gradient method
      <https://arxiv.org/abs/1412.1193>`_, JMLR 2020 (true against empirical Fisher).
      Ren & Goldfarb, `Tensor normal training for deep learning models
      <https://arxiv.org/abs/2106.02925>`_, NeurIPS 2021.
    """
    if isinstance(loss, (losses_lib.Loss, str)):
        loss_obj = losses_lib.as_loss(loss)
        loss_fn = loss_obj
        if sampler is None:
            sampler = loss_obj.sample
    elif callable(loss):
        loss_fn = loss
        if sampler is None:
            raise ValueError(
                "value_and_sampled_grad: a plain loss callable needs sampler=(rng, outputs) -> "
                "targets drawn from the model's predictive distribution, or pass a "
                "kfqn_jax.losses.Loss (whose sample method is used)."
            )
    else:
        raise TypeError(
            f"value_and_sampled_grad: loss must be a Loss, a name or a callable, got {loss!r}."
        )
    if rng is None:
        raise ValueError("value_and_sampled_grad needs rng (a jax.random key) to sample targets.")

    fwd = lambda p: apply_fn(p, *inputs)  # noqa: E731
    if has_aux:
        outputs, vjp_fn, aux = jax.vjp(fwd, params, has_aux=True)
    else:
        outputs, vjp_fn = jax.vjp(fwd, params)
        aux = None
    value, cot = jax.value_and_grad(lambda o: loss_fn(o, targets))(outputs)
    sampled_targets = jax.lax.stop_gradient(sampler(rng, jax.lax.stop_gradient(outputs)))
    cot_s = jax.grad(lambda o: loss_fn(o, sampled_targets))(outputs)
    (grads,) = vjp_fn(cot)

    def sampled_grads():
        return vjp_fn(cot_s)[0]

    out_loss = (value, aux) if has_aux else value
    return out_loss, grads, (sampled_grads if lazy else sampled_grads())
