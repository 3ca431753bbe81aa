"""Per-optimizer glue for the benchmark runner.

A *builder* turns a :class:`~benchmarks.problems.Problem` and a dict of hyperparameters into a
:class:`Runner`: ``init(params) -> opt_state`` and a pure, jittable
``step(params, opt_state, batch, rng) -> (params, opt_state, loss)`` where ``batch = (x, y)``
and ``loss`` is the minibatch loss at the incoming ``params``. The runner jits ``step`` itself.

Adding a method is one short function::

    @register("tnt")
    def _tnt(problem, hp):
        tx = _call(_kfqn_factory("tnt"), hp)
        def step(params, opt_state, batch, rng):
            x, y = batch
            out = _capture(problem, params, x, y, rng, sampled="grads")
            updates, opt_state = tx.update(
                out.grads, opt_state, params, sampled_grads=out.sampled_grads
            )
            return optax.apply_updates(params, updates), opt_state, out.loss
        return Runner(tx.init, step, hp)  # hp: what was passed (``_call`` drops the rest)

A builder raises :class:`Unavailable` when the method cannot run here (not written yet, an
optional package missing); the runner reports that in its table instead of skipping silently.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "Runner",
    "Unavailable",
    "BUILDERS",
    "KFQN_METHODS",
    "KNOWN",
    "register",
    "build",
    "default_hparams",
]

# Public factory names of kfqn_jax that the benchmarks know about (see DESIGN.md).
KFQN_METHODS = (
    "kfac",
    "kbfgs",
    "kbfgs_l",
    "tnt",
    "shampoo",
    "smw_ng",
    "smw_gn",
    "hessian_free",
    "block_hessian_free",
)


@dataclasses.dataclass(frozen=True)
class Runner:
    """``init(params) -> opt_state``; ``step(params, opt_state, (x, y), rng)`` ->
    ``(params, opt_state, loss)``; ``hparams``: what was actually passed to the factory;
    ``ignored``: requested hyperparameters the factory does not take (filled by :func:`build`).
    """

    init: Callable[[Any], Any]
    step: Callable[[Any, Any, Any, Any], tuple[Any, Any, Any]]
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignored: dict[str, Any] = dataclasses.field(default_factory=dict)
    jit: bool = True  # False: ``step`` stages itself (kfac-jax) and must not be jitted again


class Unavailable(Exception):
    """The optimizer cannot run in this environment. ``status`` goes into the results."""

    def __init__(self, status: str, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


BUILDERS: dict[str, Callable[[Any, dict], Runner]] = {}


def register(name: str):
    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def default_hparams(problem, name: str) -> dict[str, Any]:
    """The problem's paper settings for ``name`` (without the ``source`` note)."""
    hp = dict(problem.paper_settings.get(name, {}))
    hp.pop("source", None)
    return hp


def build(name: str, problem, overrides: dict[str, Any] | None = None) -> Runner:
    """Builds the runner for ``name``; raises :class:`Unavailable` with a status string."""
    if name not in BUILDERS:
        if name in KFQN_METHODS:
            _kfqn_factory(name)  # raises "not implemented" if the factory is missing
            raise Unavailable(
                "not implemented",
                f"kfqn_jax.{name} exists but benchmarks/optimizers.py has no builder for it yet",
            )
        raise Unavailable("unknown", f"no optimizer called {name!r}; known: {sorted(KNOWN)}")
    hp = default_hparams(problem, name)
    hp.update(overrides or {})
    requested = dict(hp)
    runner = BUILDERS[name](problem, hp)
    ignored = {k: v for k, v in requested.items() if k not in runner.hparams}
    return dataclasses.replace(runner, ignored=ignored)


# ----------------------------------------------------------------------------------------------
# Helpers shared by builders.


def _apply(problem, params, x):
    return problem.model.apply({"params": params}, x)


def _loss_fn(problem):
    def loss_fn(params, x, y):
        return problem.loss(_apply(problem, params, x), problem.targets_of(x, y))

    return loss_fn


def _call(factory: Callable, hp: dict[str, Any]):
    """Calls ``factory`` with the hyperparameters it accepts; returns the transformation.

    Keys the factory does not take are dropped from ``hp`` (in place) so that the results
    record exactly what was used.
    """
    params = inspect.signature(factory).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in list(hp):
        if not takes_kwargs and key not in params:
            hp.pop(key)
    return factory(**hp)


def _kfqn_factory(name: str):
    try:
        import kfqn_jax
    except ImportError as e:
        raise Unavailable("not implemented", f"import kfqn_jax failed: {e}") from e
    if not hasattr(kfqn_jax, name):
        raise Unavailable("not implemented", f"kfqn_jax.{name} does not exist yet")
    return getattr(kfqn_jax, name)


def _capture(problem, params, x, y, rng, **kwargs):
    """Loss, grads and layer statistics through ``kfqn_jax.flax`` (one forward)."""
    from kfqn_jax import flax as kfx

    return kfx.value_grads_and_stats(
        problem.model,
        params,
        x,
        targets=problem.targets_of(x, y),
        loss=problem.loss,
        rng=rng,
        **kwargs,
    )


def _first_order(problem, tx) -> Runner:
    loss_fn = _loss_fn(problem)

    def step(params, opt_state, batch, rng):
        del rng
        x, y = batch
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return Runner(tx.init, step)


# ----------------------------------------------------------------------------------------------
# optax baselines.


@register("adam")
def _adam(problem, hp):
    tx = _call(optax.adam, hp)
    return dataclasses.replace(_first_order(problem, tx), hparams=hp)


@register("sgd")
def _sgd(problem, hp):
    tx = _call(optax.sgd, hp)
    return dataclasses.replace(_first_order(problem, tx), hparams=hp)


def _authors_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-4):
    """Adam as coded in the authors' public K-BFGS and TNT repositories, benchmarks only.

    ``m`` is an EMA of the gradient; the second moment is an EMA of the *bias-corrected
    momentum squared* (not of ``g**2``); ``p = -m_hat / (eps + sqrt(v_hat))``.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return (jnp.zeros([], jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        del params
        count, m, v = state
        count = optax.safe_increment(count)
        t = count.astype(jnp.float32)
        m = jax.tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        m_hat = jax.tree.map(lambda m_: m_ / (1 - b1**t), m)
        v = jax.tree.map(lambda v_, mh: b2 * v_ + (1 - b2) * mh * mh, v, m_hat)
        upd = jax.tree.map(
            lambda mh, v_: -learning_rate * mh / (eps + jnp.sqrt(v_ / (1 - b2**t))), m_hat, v
        )
        return upd, (count, m, v)

    return optax.GradientTransformation(init, update)


@register("adam_authors")
def _adam_authors(problem, hp):
    hp = {"learning_rate": 1e-4, "b2": 0.999, "eps": 1e-4, **hp}
    tx = _call(_authors_adam, hp)
    return dataclasses.replace(_first_order(problem, tx), hparams=hp)


# ----------------------------------------------------------------------------------------------
# kfqn_jax methods.


@register("kfac")
def _kfac(problem, hp):
    tx = _call(_kfqn_factory("kfac"), hp)

    def step(params, opt_state, batch, rng):
        x, y = batch
        out = _capture(problem, params, x, y, rng, sampled="cotangents")
        # stats_fn: the sampled-label backward runs only on statistics steps.
        updates, opt_state = tx.update(out.grads, opt_state, params, layer_stats=out.stats_fn)
        return optax.apply_updates(params, updates), opt_state, out.loss

    return Runner(tx.init, step, hp)


def _kbfgs_builder(name):
    def builder(problem, hp):
        tx = _call(_kfqn_factory(name), hp)

        def step(params, opt_state, batch, rng):
            del rng
            from kfqn_jax import flax as kfx

            x, y = batch
            targets = problem.targets_of(x, y)
            out = _capture(problem, params, x, y, None, with_outputs=True)
            updates, opt_state = tx.update(
                out.grads,
                opt_state,
                params,
                layer_stats=out.stats,
                stats_fn=lambda p: kfx.layer_stats(
                    problem.model, p, x, targets=targets, loss=problem.loss
                ),
            )
            return optax.apply_updates(params, updates), opt_state, out.loss

        return Runner(tx.init, step, hp)

    return builder


register("kbfgs")(_kbfgs_builder("kbfgs"))
register("kbfgs_l")(_kbfgs_builder("kbfgs_l"))


@register("tnt")
def _tnt(problem, hp):
    import kfqn_jax

    tx = _call(_kfqn_factory("tnt"), hp)

    def step(params, opt_state, batch, rng):
        x, y = batch
        # One forward; the sampled-label backward runs lazily, only on statistics steps.
        loss, grads, sampled = kfqn_jax.value_and_sampled_grad(
            lambda p, x: _apply(problem, p, x),
            params,
            x,
            targets=problem.targets_of(x, y),
            loss=problem.loss,
            rng=rng,
            lazy=True,
        )
        updates, opt_state = tx.update(grads, opt_state, params, sampled_grads=sampled)
        return optax.apply_updates(params, updates), opt_state, loss

    return Runner(tx.init, step, hp)


@register("shampoo")
def _shampoo(problem, hp):
    # ``--hp shampoo.graft='"adam"'`` grafts onto optax.scale_by_adam's per-leaf step norm (the
    # results record the string; the factory gets the transform).
    grafts = {"adam": optax.scale_by_adam, "rss": optax.scale_by_rss, "sgd": optax.identity}
    factory = _kfqn_factory("shampoo")
    graft = hp.get("graft")
    tx = _call(lambda **kw: factory(**{**kw, "graft": grafts[graft]()} if graft else kw), hp)
    return dataclasses.replace(_first_order(problem, tx), hparams=hp)


# ----------------------------------------------------------------------------------------------
# DeepMind's kfac-jax, side by side (optional).


@register("kfac_jax")
def _kfac_jax(problem, hp):
    if importlib.util.find_spec("kfac_jax") is None:
        raise Unavailable("unavailable", "kfac_jax is not installed (pip install kfac-jax)")
    import kfac_jax

    if problem.loss.name != "sigmoid_cross_entropy":
        raise Unavailable(
            "not implemented",
            f"kfac_jax adapter maps only sigmoid cross-entropy so far, not {problem.loss.name}",
        )
    lr = float(hp.get("learning_rate", 0.1))
    momentum = float(hp.get("momentum", 0.9))
    damping = float(hp.get("damping", 3.0))

    def value(params, batch):
        x, y = batch
        logits = problem.model.apply({"params": params}, x)
        targets = problem.targets_of(x, y)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, targets)
        return problem.loss(logits, targets)

    # Same settings as our KFAC where kfac-jax has them: fixed lr, heavy-ball momentum and
    # damping (no adaptive quadratic model), one-sample Fisher, factor EMA, inverse period.
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(value),
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        use_adaptive_momentum=False,
        use_adaptive_damping=False,
        learning_rate_schedule=lambda _: lr,
        momentum_schedule=lambda _: momentum,
        damping_schedule=lambda _: damping,
        curvature_ema=float(hp.get("ema_decay", 0.9)),
        inverse_update_period=int(hp.get("inverse_every", 20)),
        estimation_mode="fisher_gradients",
        num_burnin_steps=0,
        multi_device=False,
    )
    counter = {"i": 0, "state": None}

    def init(params):
        # kfac-jax's init needs a batch; use a zero batch of the problem's shape.
        x = jnp.zeros((problem.batch_size,) + problem.x_train.shape[1:], jnp.float32)
        return opt.init(params, jax.random.key(0), (x, None))

    def step(params, opt_state, batch, rng):
        # kfac_jax.Optimizer.step stages (jits) itself and donates params and state.
        params, opt_state, stats = opt.step(
            params, opt_state, rng, batch=batch, global_step_int=counter["i"]
        )
        counter["i"] += 1
        return params, opt_state, stats["loss"]

    used = dict(learning_rate=lr, momentum=momentum, damping=damping)
    return Runner(init, step, used, jit=False)


KNOWN = tuple(sorted(set(BUILDERS) | set(KFQN_METHODS)))


# ----------------------------------------------------------------------------------------------
# Hessian-free and block-diagonal Hessian-free.


def _lstm_gate_blocks(path, shape):
    """BDHF blocks for ``flax.linen.LSTMCell`` layers: per gate, its input and hidden weights
    together (``ii`` + ``hi`` ...); every other module is its own block."""
    del shape
    if str(path[0]).startswith("LSTMCell") and len(path) >= 3:
        return (path[0], str(path[1])[1])
    return tuple(path[:-1])


def _top_module_blocks(path, shape):
    """BDHF blocks: one per top-level module (for ``char_lstm``: the embedding, each LSTM layer
    with all its gates, the output layer)."""
    del shape
    return path[0]


def _lstm_stack_blocks(path, shape):
    """BDHF blocks for ``char_lstm``: one per LSTM layer with all its gates, the embedding in
    the first layer's block (both feed the whole recurrence, so together they cost one block
    product through it instead of two), and the output layer."""
    del shape
    return "LSTMCell_0" if path[0] == "Embed_0" else path[0]


_NAMED_BLOCKS = {
    "lstm_gates": _lstm_gate_blocks,
    "lstm_layers": _top_module_blocks,
    "lstm_stack": _lstm_stack_blocks,
}


def _hessian_free_builder(name: str):
    def builder(problem, hp):
        # Curvature batch: the first ``curvature_fraction`` of the gradient batch (Martens
        # cycles one of several chunks; 1/4 here, our choice).
        frac = float(hp.pop("curvature_fraction", 0.25))
        call_hp = dict(hp)
        if isinstance(call_hp.get("blocks"), str) and call_hp["blocks"] in _NAMED_BLOCKS:
            call_hp["blocks"] = _NAMED_BLOCKS[call_hp["blocks"]]
        tx = _call(_kfqn_factory(name), call_hp)
        for key in list(hp):
            if key not in call_hp:
                hp.pop(key)
        hp["curvature_fraction"] = frac

        def step(params, opt_state, batch, rng):
            del rng
            x, y = batch
            targets = problem.targets_of(x, y)

            def loss_fn(p):
                return problem.loss(_apply(problem, p, x), targets)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            n_curv = max(1, int(round(x.shape[0] * frac)))
            x_curv = x[:n_curv]
            updates, opt_state = tx.update(
                grads,
                opt_state,
                params,
                model_fn=lambda p: _apply(problem, p, x_curv),
                output_loss=problem.loss,
                loss_fn=loss_fn,
            )
            return optax.apply_updates(params, updates), opt_state, loss

        return Runner(tx.init, step, hp)

    return builder


register("hessian_free")(_hessian_free_builder("hessian_free"))
register("block_hessian_free")(_hessian_free_builder("block_hessian_free"))


# ----------------------------------------------------------------------------------------------
# SMW-NG and SMW-GN (Ren & Goldfarb 2019, arXiv 1906.02353). Neither the paper nor the authors'
# code gives defaults; our choice: lr 1
# (the Levenberg-Marquardt step), initial lambda 1, curvature batch = the first 128 examples
# of the gradient batch (N2 = 128), and for SMW-GN on autoencoders 16 random output directions
# per step (the full 784 outputs would make a 100k x 100k system).


def _smw_common_hp(problem, hp):
    hp.setdefault("learning_rate", 1.0)
    hp.setdefault("damping", 1.0)
    hp.setdefault("curvature_batch", 128)


def _smw_m(hp, batch_size):
    return min(int(hp["curvature_batch"]), int(batch_size))


@register("smw_ng")
def _smw_ng(problem, hp):
    _smw_common_hp(problem, hp)
    factory = _kfqn_factory("smw_ng")
    cache: dict[int, Any] = {}

    def tx_for(batch_size):
        m = _smw_m(hp, batch_size)
        if m not in cache:
            cache[m] = _call(factory, {**hp, "curvature_batch": m})
        return cache[m]

    tx0 = _call(factory, hp)

    def step(params, opt_state, batch, rng):
        x, y = batch
        tx = tx_for(x.shape[0])
        targets = problem.targets_of(x, y)
        sampled = "cotangents" if hp.get("fisher", "true") == "true" else None
        out = _capture(problem, params, x, y, rng, sampled=sampled)
        updates, opt_state = tx.update(
            out.grads,
            opt_state,
            params,
            layer_stats=out.stats,
            value=out.loss,
            loss_fn=lambda p: problem.loss(_apply(problem, p, x), targets),
        )
        return optax.apply_updates(params, updates), opt_state, out.loss

    return Runner(tx0.init, step, hp)


@register("smw_gn")
def _smw_gn(problem, hp):
    _smw_common_hp(problem, hp)
    if problem.task == "autoencoder":
        hp.setdefault("output_samples", 16)
    factory = _kfqn_factory("smw_gn")
    hp.setdefault("loss", problem.loss)
    cache: dict[int, Any] = {}

    def tx_for(batch_size):
        m = _smw_m(hp, batch_size)
        if m not in cache:
            cache[m] = _call(factory, {**hp, "curvature_batch": m})
        return cache[m], m

    tx0 = _call(factory, hp)

    def step(params, opt_state, batch, rng):
        del rng
        from kfqn_jax import OutputProbe
        from kfqn_jax import flax as kfx

        x, y = batch
        tx, m = tx_for(x.shape[0])
        targets = problem.targets_of(x, y)

        def loss_fn(p):
            return problem.loss(_apply(problem, p, x), targets)

        outputs, vjp = jax.vjp(lambda p: _apply(problem, p, x), params)
        loss, cot = jax.value_and_grad(lambda z: problem.loss(z, targets))(outputs)
        (grads,) = vjp(cot)
        updates, opt_state = tx.update(
            grads,
            opt_state,
            params,
            value=loss,
            loss_fn=loss_fn,
            model_outputs=outputs,
            probe_stats_fn=lambda v: kfx.layer_stats(
                problem.model, params, x[:m], targets=v, loss=OutputProbe(), with_outputs=False
            ),
        )
        return optax.apply_updates(params, updates), opt_state, loss

    hp_record = {k: v for k, v in hp.items() if k != "loss"}
    return Runner(tx0.init, step, hp_record)
