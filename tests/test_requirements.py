"""Declared requirements: each transform says which extra args and capture options it needs,
and the declaration survives optax.chain, inject_hyperparams, MultiSteps and nnx.Optimizer."""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import kfqn_jax
from kfqn_jax._src import extra_args
from tests.method_cases import CASES

STATIC = {c.name: tuple(c.static_args) for c in CASES}

PARAMS = {"Dense_0": {"kernel": jnp.ones((4, 5)), "bias": jnp.zeros(5)}}

# What each method's update reads, from its documentation (independent of the declarations).
EXPECTED = {
    "kfac": (("layer_stats",), "cotangents", False),
    "kbfgs": (("layer_stats", "stats_fn"), None, True),
    "kbfgs_l": (("layer_stats", "stats_fn"), None, True),
    "tnt": (("sampled_grads",), "grads", False),
    "shampoo": ((), None, False),
    "smw_ng": (("layer_stats", "loss_fn"), "cotangents", False),
    "smw_gn": (("loss_fn", "model_outputs", "probe_stats_fn"), None, False),
    "hessian_free": (("loss_fn", "model_fn", "output_loss"), None, False),
    "block_hessian_free": (("loss_fn", "model_fn", "output_loss"), None, False),
}


def _make(name, **kw):
    lr = {"hessian_free": 1.0, "block_hessian_free": 1.0, "smw_ng": 1.0, "smw_gn": 1.0}
    return getattr(kfqn_jax, name)(lr.get(name, 0.1), **kw)


def _check(reqs, name):
    names, sampled, outputs = EXPECTED[name]
    assert sorted(reqs.extra_args) == sorted(names), (name, reqs)
    assert reqs.sampled == sampled, (name, reqs)
    assert reqs.with_outputs == outputs, (name, reqs)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_declared_requirements_alone_and_through_wrappers(name):
    tx = _make(name)
    _check(kfqn_jax.requirements(tx, PARAMS), name)
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx, optax.scale(1.0))
    _check(kfqn_jax.requirements(chained, PARAMS), name)
    _check(kfqn_jax.requirements(optax.MultiSteps(tx, every_k_schedule=2), PARAMS), name)
    # Arguments that shape the state or the control flow are static, as the methods document.
    injected = optax.inject_hyperparams(getattr(kfqn_jax, name), static_args=STATIC[name])(
        learning_rate=0.5
    )
    _check(kfqn_jax.requirements(injected, PARAMS), name)


def test_requirements_through_nnx_optimizer():
    model = nnx.Linear(4, 5, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, kfqn_jax.tnt(0.1), wrt=nnx.Param)
    reqs = kfqn_jax.requirements(optimizer.tx, nnx.state(model, nnx.Param))
    _check(reqs, "tnt")


def test_options_change_the_declaration():
    kfac_emp = kfqn_jax.requirements(_make("kfac", fisher="empirical"), PARAMS)
    assert kfac_emp.extra_args == ("layer_stats",) and kfac_emp.sampled is None
    exact = kfqn_jax.requirements(_make("kfac", fisher="exact"), PARAMS)
    assert exact.exact_fisher and exact.sampled is None
    tnt_emp = kfqn_jax.requirements(_make("tnt", fisher="empirical"), PARAMS)
    assert tnt_emp.extra_args == () and tnt_emp.sampled is None
    smw_fixed = kfqn_jax.requirements(_make("smw_ng", adapt_damping=False), PARAMS)
    assert "loss_fn" not in smw_fixed.extra_args


def test_merging_two_methods_and_plain_optax():
    both = optax.chain(_make("kfac"), _make("tnt"))
    reqs = kfqn_jax.requirements(both, PARAMS)
    assert sorted(reqs.extra_args) == ["layer_stats", "sampled_grads"]
    assert reqs.sampled == "both"
    assert kfqn_jax.requirements(optax.adam(1e-3), PARAMS) == kfqn_jax.Requirements()


def test_bad_declarations_and_unanswerable_transforms_raise():
    with pytest.raises(ValueError, match="unknown extra args"):
        extra_args.Requirements(extra_args=("grads",))
    with pytest.raises(ValueError, match="sampled"):
        extra_args.Requirements(sampled="labels")

    def update(updates, state, params=None, *, stats_fn=None, **extra):
        return stats_fn(params), state  # needs stats_fn unconditionally

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    with pytest.raises(ValueError, match="Pass them explicitly"):
        kfqn_jax.requirements(tx, PARAMS)
