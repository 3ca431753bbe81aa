"""Child process of tests/test_sharding.py: every method on 8 simulated CPU devices.

The device count of the CPU backend is fixed when JAX starts, so the test runs this script
in a fresh interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. For every
method it runs a few training steps twice, on one device and with the batch sharded across a
mesh of the 8 devices, and writes the comparison as JSON to the path given as argument.

Usage: ``python -m tests._sharding_child OUT.json [METHOD ...]`` from the repository root.
"""

from __future__ import annotations

import copy
import json
import sys
import traceback

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tests._child_process import strict_warnings
from tests.method_cases import CASES, Ctx, apply_step

DEVICES = 8
STEPS = 3
BATCH = 32
# Methods also run with their factor state split across the devices (see check_factor_sharded).
FACTOR_SHARDED = ("kfac", "shampoo")


def make_step(case, ctx, tx):
    """The jittable ``step(params, state, x, y) -> (params, state)`` of a method's case.

    The batch enters as arguments (so that it can be sharded); the case's extra args are
    built from a copy of the problem whose inputs and targets are the traced batch.
    """

    def step(params, state, x, y):
        batch_ctx = copy.copy(ctx)
        batch_ctx.x, batch_ctx.y = x, y
        return apply_step(case, batch_ctx, tx, params, state)[:2]

    return step


def rel_err(a, b):
    """Largest per-leaf relative error ``|a - b| / |b|`` over the floating leaves."""
    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if not np.issubdtype(u.dtype, np.floating) or u.size == 0:
            continue
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        worst = max(worst, float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-30)))
    return worst


def run(step, params, state, x, y):
    for _ in range(STEPS):
        params, state = step(params, state, x, y)
    return params, state


def changed_shardings(before, after):
    """Paths of the leaves whose sharding differs between two trees of arrays."""
    out = []
    flat_before = jax.tree_util.tree_leaves_with_path(before)
    flat_after = jax.tree.leaves(after)
    for (path, u), v in zip(flat_before, flat_after, strict=True):
        if u.sharding != v.sharding:
            out.append(f"{jax.tree_util.keystr(path)}: {u.sharding} -> {v.sharding}")
    return out


def check_case(case, mesh):
    ctx = Ctx(batch=BATCH)
    tx = case.factory(**case.kwargs)
    step = make_step(case, ctx, tx)
    replicated = NamedSharding(mesh, P())
    by_batch = NamedSharding(mesh, P("data"))

    # One device: every array on the default device.
    one = jax.devices()[0]
    params1, state1 = run(
        jax.jit(step),
        *jax.device_put((ctx.params, tx.init(ctx.params), ctx.x, ctx.y), one),
    )

    # Data parallel: the batch split along "data", params and optimizer state replicated. The
    # step is jitted without out_shardings, so the shardings that come out are the compiler's
    # choice: they must be the ones that went in.
    params = jax.device_put(ctx.params, replicated)
    state = jax.jit(tx.init, out_shardings=replicated)(params)
    x, y = jax.device_put((ctx.x, ctx.y), by_batch)
    sharded_step = jax.jit(step)
    changed = []
    params_replicated = True
    for _ in range(STEPS):
        new_params, new_state = sharded_step(params, state, x, y)
        changed += changed_shardings(state, new_state)
        params_replicated &= all(p.sharding == replicated for p in jax.tree.leaves(new_params))
        params, state = new_params, new_state
    result = {
        "params_rel_err": rel_err(params, params1),
        "state_rel_err": rel_err(state, state1),
        "changed_shardings": changed,
        "params_replicated": params_replicated,
    }

    if case.name in FACTOR_SHARDED:
        result.update(check_factor_sharded(mesh, step, tx, ctx, params1))
    return result


def check_factor_sharded(mesh, step, tx, ctx, params1):
    """Factor state split along "data": every state leaf of rank >= 2 whose leading
    dimension divides by the device count; the other leaves and the params replicated.

    The step is jitted with out_shardings equal to the input shardings (without them the
    compiler is free to give, e.g., a momentum leaf the sharding of the factor it came from).
    """
    replicated = NamedSharding(mesh, P())

    def factor_sharding(leaf):
        if leaf.ndim >= 2 and leaf.shape[0] % DEVICES == 0:
            return NamedSharding(mesh, P("data"))
        return replicated

    state = tx.init(ctx.params)
    state_shardings = jax.tree.map(factor_sharding, state)
    params = jax.device_put(ctx.params, replicated)
    state = jax.device_put(state, state_shardings)
    x, y = jax.device_put((ctx.x, ctx.y), NamedSharding(mesh, P("data")))
    params_shardings = jax.tree.map(lambda _: replicated, params)
    sharded_step = jax.jit(step, out_shardings=(params_shardings, state_shardings))
    params, state = run(sharded_step, params, state, x, y)
    return {
        "factor_leaves_sharded": sum(s.spec == P("data") for s in jax.tree.leaves(state_shardings)),
        "factor_sharded_params_rel_err": rel_err(params, params1),
    }


def main(out_path, *names):
    strict_warnings()
    devices = jax.devices()
    if len(devices) != DEVICES:
        raise RuntimeError(f"expected {DEVICES} devices, found {len(devices)}")
    mesh = Mesh(np.array(devices), ("data",))
    results = {}
    for case in CASES:
        if names and case.name not in names:
            continue
        try:
            results[case.name] = check_case(case, mesh)
        except Exception:  # one method's failure must not hide the others' results
            results[case.name] = {"error": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
