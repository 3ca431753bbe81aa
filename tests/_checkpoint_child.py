"""Child processes of tests/test_checkpoint.py: save, restore and resume every method.

``python tests/_checkpoint_child.py save DIR`` runs every method for ``2 * K`` steps without
interruption, saving params and optimizer state with orbax-checkpoint after ``K`` steps
(``DIR/<method>/ckpt``) and the final params and state as ``DIR/<method>/uninterrupted.npz``.

``python tests/_checkpoint_child.py resume DIR``, in a fresh interpreter, restores each
checkpoint into the abstract state of a newly built optimizer, runs the remaining ``K``
steps and writes the final params and state as ``DIR/<method>/resumed.npz``.

Either mode writes ``DIR/<mode>.json``: per method, ``null`` or the traceback of its error.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests._child_process import strict_warnings
from tests.method_cases import CASES, Ctx, apply_step

K = 2


def make_step(case, ctx, tx):
    def step(params, state):
        return apply_step(case, ctx, tx, params, state)[:2]

    return step


def save_arrays(path, tree):
    """Every leaf of ``tree`` in an ``.npz`` file, named by its path in the tree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(x) for k, x in leaves})


def save(case, root):
    ctx = Ctx()
    tx = case.factory(**case.kwargs)
    step = jax.jit(make_step(case, ctx, tx))
    # Committed to the device, as restored arrays are.
    params, state = jax.device_put((ctx.params, tx.init(ctx.params)), jax.devices()[0])
    for _ in range(K):
        params, state = step(params, state)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / "ckpt", {"params": params, "opt_state": state})
    for _ in range(K):
        params, state = step(params, state)
    save_arrays(root / "uninterrupted.npz", {"params": params, "opt_state": state})


def resume(case, root):
    ctx = Ctx()
    tx = case.factory(**case.kwargs)
    abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, ctx.params)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(root / "ckpt", abstract)
    if jax.tree.structure(restored) != jax.tree.structure(abstract):
        raise AssertionError(
            f"restored tree {jax.tree.structure(restored)} != {jax.tree.structure(abstract)}"
        )
    step = jax.jit(make_step(case, ctx, tx))
    params, state = restored["params"], restored["opt_state"]
    for _ in range(K):
        params, state = step(params, state)
    save_arrays(root / "resumed.npz", {"params": params, "opt_state": state})


def main(mode, out_dir):
    strict_warnings()  # a deprecated orbax call, say, is an error
    run = {"save": save, "resume": resume}[mode]
    out_dir = Path(out_dir).absolute()
    errors = {}
    for case in CASES:
        root = out_dir / case.name
        root.mkdir(parents=True, exist_ok=True)
        try:
            run(case, root)
            errors[case.name] = None
        except Exception:  # one method's failure must not hide the others' results
            errors[case.name] = traceback.format_exc()
    (out_dir / f"{mode}.json").write_text(json.dumps(errors, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
