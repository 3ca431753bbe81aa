"""Bad input raises at construction or trace time, with a message that says what is wrong and
how to fix it.

Construction-time cases build the public factories with one bad argument. Trace-time cases run
``update`` under ``jax.eval_shape``, so nothing is compiled or computed.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import kfqn_jax
from kfqn_jax import flax as kfx
from tests.method_cases import CASES, Ctx

METHODS = [c.name for c in CASES]
LR = {"learning_rate": 0.1}


def build(method, **kwargs):
    return getattr(kfqn_jax, method)(**LR, **kwargs)


# ------------------------------------------------------------------------------------------------
# Construction time.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_non_positive_damping(method, value):
    msg = rf"{method}: damping must be a positive number.*got {value!r}\..*pass e\.g\. damping="
    with pytest.raises(ValueError, match=msg):
        build(method, damping=value)


@pytest.mark.parametrize("method", METHODS)
def test_damping_of_wrong_type(method):
    with pytest.raises(TypeError, match=rf"{method}: damping must be a positive number"):
        build(method, damping="0.1")


@pytest.mark.parametrize("method", ["hessian_free", "block_hessian_free"])
def test_adaptive_damping_takes_no_schedule(method):
    with pytest.raises(TypeError, match=r"damping must be a positive number, got <function"):
        build(method, damping=optax.constant_schedule(1.0))


PERIODS = [
    ("kfac", "stats_every"),
    ("kfac", "inverse_every"),
    ("kbfgs", "inverse_every"),
    ("kbfgs_l", "inverse_every"),
    ("kbfgs_l", "memory_size"),
    ("tnt", "stats_every"),
    ("tnt", "inverse_every"),
    ("shampoo", "stats_every"),
    ("shampoo", "inverse_every"),
    ("shampoo", "root_order"),
    ("hessian_free", "max_cg_iters"),
    ("block_hessian_free", "max_cg_iters"),
    ("smw_ng", "curvature_batch"),
    ("smw_gn", "curvature_batch"),
    ("smw_gn", "output_samples"),
    ("smw_gn", "max_system_size"),
]


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
@pytest.mark.parametrize(("method", "arg"), PERIODS, ids=["-".join(p) for p in PERIODS])
def test_bad_period_or_size(method, arg, value):
    msg = rf"{method}: {arg} must be a positive int \(static\), got {value!r}\. Pass an int >= 1"
    with pytest.raises(ValueError, match=msg):
        build(method, **{arg: value})


FRACTIONS = [
    ("kfac", "ema_decay"),
    ("kfac", "momentum"),
    ("kbfgs", "ema_decay"),
    ("kbfgs", "pair_decay"),
    ("kbfgs", "momentum"),
    ("kbfgs_l", "momentum"),
    ("tnt", "ema_decay"),
    ("tnt", "momentum"),
    ("shampoo", "ema_decay"),
    ("shampoo", "momentum"),
    ("smw_ng", "momentum"),
    ("smw_gn", "momentum"),
]


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
@pytest.mark.parametrize(("method", "arg"), FRACTIONS, ids=["-".join(p) for p in FRACTIONS])
def test_decay_or_momentum_outside_unit_interval(method, arg, value):
    msg = rf"{method}: {arg} must be a .*number in \[0, 1\), got {value!r}\. Use 0 to switch"
    with pytest.raises(ValueError, match=msg):
        build(method, **{arg: value})


OPTIONS = [
    ("kfac", "fisher"),
    ("kfac", "inverse_schedule"),
    ("kbfgs", "extra_pass"),
    ("kbfgs", "double_damping"),
    ("kbfgs", "a_side"),
    ("kbfgs_l", "a_statistic"),
    ("tnt", "fisher"),
    ("tnt", "damping_mode"),
    ("shampoo", "root_method"),
    ("smw_ng", "fisher"),
    ("smw_ng", "lm_model"),
    ("smw_gn", "gram_mode"),
    ("smw_gn", "output_sampling"),
] + [(m, "on_nonfinite") for m in METHODS]


@pytest.mark.parametrize(("method", "arg"), OPTIONS, ids=["-".join(p) for p in OPTIONS])
def test_unknown_string_option(method, arg):
    with pytest.raises(ValueError, match=rf"{method}: {arg} must be one of '.*; got 'bogus'\."):
        build(method, **{arg: "bogus"})


@pytest.mark.parametrize("method", ["tnt", "shampoo"])
def test_unknown_reshape(method):
    msg = rf"{method}: reshape must be one of 'filter_flattening', 'none' or a callable"
    with pytest.raises(ValueError, match=msg):
        build(method, reshape="bogus")


def test_on_nonfinite_lists_the_choices():
    with pytest.raises(ValueError, match="'skip', 'raise', 'ignore'; got 'warn'"):
        kfqn_jax.scale_by_shampoo(on_nonfinite="warn")


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("kbfgs", dict(powell_mu=1.0), r"kbfgs: powell_mu must be a number in \(0, 1\)"),
        ("kbfgs", dict(max_growth=0.5), r"kbfgs: max_growth must be None or a number > 1"),
        ("smw_ng", dict(lm_factor=0.5), r"smw_ng: lm_factor must be >= 1, got 0.5"),
        ("smw_ng", dict(lm_thresholds=(0.8, 0.2)), r"smw_ng: lm_thresholds must be \(low, high\)"),
        ("smw_gn", dict(damping_bounds=(1.0, 0.1)), r"smw_gn: damping_bounds must be \(min, max\)"),
        ("hessian_free", dict(progress_tol=-1.0), r"hessian_free: progress_tol must be >= 0"),
        ("block_hessian_free", dict(blocks="bogus"), r"block_hessian_free: blocks must be 'all'"),
    ],
    ids=["powell_mu", "max_growth", "lm_factor", "lm_thresholds", "bounds", "tol", "blocks"],
)
def test_other_bad_numbers(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(method, **kwargs)


# ------------------------------------------------------------------------------------------------
# Trace time: extra args against the parameters.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx():
    return Ctx()


@pytest.fixture(scope="module")
def captured(ctx):
    """Statistics with every optional field (sampled cotangents and outputs)."""
    return ctx.capture(ctx.params, sampled="cotangents", with_outputs=True)


def case_of(name):
    return next(c for c in CASES if c.name == name)


def trace_update(ctx, tx, grads=None, params=None, **extra):
    """Traces one ``update`` without running it."""
    params = ctx.params if params is None else params
    grads = jax.grad(ctx.loss_fn)(ctx.params) if grads is None else grads
    state = tx.init(ctx.params)
    return jax.eval_shape(lambda: tx.update(grads, state, params, **extra))


@pytest.mark.parametrize(
    ("method", "name"),
    [(c.name, n) for c in CASES for n in c.required],
    ids=[f"{c.name}-{n}" for c in CASES for n in c.required],
)
def test_missing_extra_arg_says_what_to_pass(ctx, method, name):
    case = case_of(method)
    extra = case.extra_args(ctx, ctx.params)
    extra.pop(name)
    tx = case.factory(**case.kwargs)
    msg = rf"{method}\.update needs the keyword argument `{name}`\. \S.+See the full training"
    with pytest.raises(ValueError, match=re.compile(msg, re.S)):
        trace_update(ctx, tx, **extra)


STATS_METHODS = ["kfac", "kbfgs", "kbfgs_l", "smw_ng"]


def _with_stats(ctx, method, stats):
    case = case_of(method)
    extra = case.extra_args(ctx, ctx.params)
    extra["layer_stats"] = stats
    return case, extra


@pytest.mark.parametrize("method", STATS_METHODS)
def test_layer_stats_not_a_dict(ctx, captured, method):
    case, extra = _with_stats(ctx, method, list(captured.stats.values()))
    with pytest.raises(TypeError, match=rf"{method}: layer_stats must be the dict"):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


@pytest.mark.parametrize("method", STATS_METHODS)
def test_layer_stats_entry_not_layer_stats(ctx, captured, method):
    stats = dict(captured.stats)
    stats["Dense_1"] = (stats["Dense_1"].a, stats["Dense_1"].g)
    case, extra = _with_stats(ctx, method, stats)
    msg = (
        rf"{method}: layer_stats\['Dense_1'\] must be a kfqn_jax.LayerStats.*value_grads_and_stats"
    )
    with pytest.raises(TypeError, match=msg):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


@pytest.mark.parametrize("method", STATS_METHODS)
def test_layer_missing_from_stats(ctx, captured, method):
    stats = {k: v for k, v in captured.stats.items() if k != "Dense_1"}
    case, extra = _with_stats(ctx, method, stats)
    msg = rf"{method}: no statistics for layer 'Dense_1'.*layers=kfqn_jax\.flax\.layer_metas"
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


@pytest.mark.parametrize("method", STATS_METHODS)
def test_layer_names_do_not_match_params(ctx, captured, method):
    s = captured.stats["Dense_0"]
    meta = dataclasses.replace(s.meta, name="Encoder_0", kernel_path=("Encoder_0", "kernel"))
    stats = dict(captured.stats)
    stats["Dense_0"] = dataclasses.replace(s, meta=meta)
    case, extra = _with_stats(ctx, method, stats)
    with pytest.raises(ValueError, match=rf"{method}: no statistics for layer 'Dense_0'"):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


class _WideMLP(nn.Module):
    """``TinyMLP`` with 7 hidden units instead of 8: same layer names, other shapes."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(7)(x))
        x = nn.relu(nn.Dense(5, use_bias=False)(x))
        return nn.Dense(3)(x)


@pytest.mark.parametrize("method", STATS_METHODS)
def test_stats_of_another_model(ctx, method):
    model = _WideMLP()
    params = model.init(jax.random.key(0), ctx.x)["params"]
    other = kfx.value_grads_and_stats(
        model, params, ctx.x, targets=ctx.y, loss=ctx.loss, rng=ctx.rng, sampled="cotangents"
    )
    case, extra = _with_stats(ctx, method, other.stats)
    msg = rf"{method}: layer 'Dense_0': the optimizer state was built for a 6x8 kernel matrix"
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


@pytest.mark.parametrize("field", ["a", "g", "g_sampled", "h"])
@pytest.mark.parametrize("method", STATS_METHODS)
def test_stats_arrays_with_wrong_shapes(ctx, captured, method, field):
    s = captured.stats["Dense_0"]
    bad = getattr(s, field)[..., :-1]
    stats = dict(captured.stats)
    stats["Dense_0"] = dataclasses.replace(s, **{field: bad})
    case, extra = _with_stats(ctx, method, stats)
    name = {"a": "inputs `a`", "g": "output cotangents `g`"}.get(field, f"`{field}`")
    msg = (
        rf"{method}: layer 'Dense_0' \(kernel \(6, 8\) at \('Dense_0', 'kernel'\)\): "
        rf"{name} ha(ve|s) shape \(8, 1, {bad.shape[-1]}\), expected .*value_grads_and_stats"
    )
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


def test_kfac_true_fisher_needs_sampled_cotangents(ctx):
    stats = ctx.capture(ctx.params, sampled=None).stats
    with pytest.raises(ValueError, match=r"kfac\(fisher='true'\).*sampled='cotangents'"):
        trace_update(ctx, kfqn_jax.kfac(0.1), layer_stats=stats)


def test_kbfgs_needs_preactivations(ctx):
    stats = ctx.capture(ctx.params, sampled=None, with_outputs=False).stats
    extra = case_of("kbfgs").extra_args(ctx, ctx.params)
    extra["layer_stats"] = stats
    with pytest.raises(ValueError, match=r"kbfgs: layer 'Dense_0' has no pre-activations.*with_"):
        trace_update(ctx, kfqn_jax.kbfgs(0.1), **extra)


def test_smw_ng_curvature_batch_above_batch(ctx, captured):
    tx = kfqn_jax.smw_ng(curvature_batch=100)
    msg = r"smw_ng: curvature_batch=100 exceeds the captured batch of 8"
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, tx, layer_stats=captured.stats, loss_fn=ctx.loss_fn)


def test_smw_gn_model_outputs_shape(ctx):
    case = case_of("smw_gn")
    extra = case.extra_args(ctx, ctx.params)
    extra["model_outputs"] = extra["model_outputs"][:, None, :]
    msg = r"smw_gn: model_outputs must have shape \(batch, outputs\), got \(8, 1, 3\)"
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


def test_smw_gn_curvature_batch_above_outputs(ctx):
    case = case_of("smw_gn")
    extra = case.extra_args(ctx, ctx.params)
    extra["model_outputs"] = extra["model_outputs"][:2]
    with pytest.raises(ValueError, match=r"curvature_batch=4 but model_outputs has only 2 rows"):
        trace_update(ctx, case.factory(**case.kwargs), **extra)


def _sampled(ctx):
    return case_of("tnt").extra_args(ctx, ctx.params)["sampled_grads"]


def test_tnt_sampled_grads_of_another_structure(ctx):
    sampled = dict(_sampled(ctx))
    del sampled["Dense_2"]
    msg = r"tnt: sampled_grads must have the tree structure of the gradients.*same parameter"
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, kfqn_jax.tnt(0.1), sampled_grads=sampled)


def test_tnt_sampled_grads_of_another_shape(ctx):
    sampled = jax.tree.map(lambda x: x, _sampled(ctx))
    sampled["Dense_1"]["kernel"] = sampled["Dense_1"]["kernel"][:, :4]
    msg = (
        r"tnt: sampled_grads at \('Dense_1', 'kernel'\) has shape \(8, 4\), but the gradients "
        r"there have shape \(8, 5\)"
    )
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, kfqn_jax.tnt(0.1), sampled_grads=sampled)


def test_hessian_free_sq_grads_of_another_shape(ctx):
    extra = case_of("hessian_free").extra_args(ctx, ctx.params)
    sq = jax.tree.map(jnp.ones_like, ctx.params)
    sq["Dense_0"]["bias"] = jnp.ones(3)
    tx = kfqn_jax.hessian_free(damping=1.0, max_cg_iters=3, precondition=True)
    msg = r"hessian_free: sq_grads at \('Dense_0', 'bias'\) has shape \(3,\), but the parameters"
    with pytest.raises(ValueError, match=msg):
        trace_update(ctx, tx, sq_grads=sq, **extra)


def test_hessian_free_model_fn_not_callable(ctx):
    extra = case_of("hessian_free").extra_args(ctx, ctx.params)
    extra["model_fn"] = ctx.x
    msg = r"hessian_free: the extra arg `model_fn` must be a function params -> outputs"
    with pytest.raises(TypeError, match=msg):
        trace_update(ctx, kfqn_jax.hessian_free(max_cg_iters=3), **extra)


# ------------------------------------------------------------------------------------------------
# Unsupported layers in the capture.
# ------------------------------------------------------------------------------------------------


class _GroupedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3,), feature_group_count=2)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _BatchedDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.DenseGeneral(3, axis=-1, batch_dims=(0,))(x)
        return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (_GroupedConv(), (2, 5, 4), r"Conv_0: grouped/depthwise convolutions.*kfqn_jax\.tnt"),
        (
            _BatchedDense(),
            (2, 2, 4),
            r"DenseGeneral_0: DenseGeneral with batch_dims.*kfqn_jax\.tnt",
        ),
    ],
    ids=["grouped_conv", "dense_general_batch_dims"],
)
def test_unsupported_layer_in_capture(model, shape, match):
    x = jnp.ones(shape)
    params = model.init(jax.random.key(0), x)["params"]
    loss = kfqn_jax.losses.squared_error()
    y = jnp.zeros(model.apply({"params": params}, x).shape)
    with pytest.raises(ValueError, match=match):
        kfx.value_grads_and_stats(model, params, x, targets=y, loss=loss)
