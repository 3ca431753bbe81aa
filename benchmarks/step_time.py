"""Per-step time of optimizers as a ratio to optax.adam, measured in one process.

Unlike ``benchmarks.run`` (which trains one optimizer after the other and records curves), this
script measures steady-state step time only, and *interleaves* the optimizers: it runs a block
of steps of each in turn, for several rounds, so that slow drifts in machine load affect all of
them alike. Each optimizer is first compiled (compile time reported separately) and warmed up
past its early phase (for KFAC, the first ``inverse_every`` steps refresh the inverses at every
statistics update), so the medians are steady-state medians, amortised refreshes included.

    python -m benchmarks.step_time --problem mnist_ae \
        --optimizers "adam,kfac,kfac[stats_every=10]" --rounds 8 --block 20

Variants take hyperparameter overrides in brackets. The batch is fixed (one minibatch of the
problem's batch size, reused), so data loading is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _parse_spec(spec: str) -> tuple[str, str, dict]:
    m = re.fullmatch(r"([a-z_]+)(?:\[(.*)\])?", spec.strip())
    if not m:
        raise SystemExit(f"bad optimizer spec {spec!r}")
    name, body = m.group(1), m.group(2)
    hp = {}
    if body:
        for item in body.split(";") if ";" in body else body.split(","):
            k, v = item.split("=")
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
            hp[k.strip()] = v
    return spec.strip(), name, hp


def _split_specs(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default="mnist_ae")
    ap.add_argument("--optimizers", default="adam,kfac")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=20, help="steps per optimizer per round")
    ap.add_argument("--warmup", type=int, default=45, help="steps before timing")
    ap.add_argument("--quick", action="store_true", help="embedded data (no download)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import optimizers as opt_lib
    from benchmarks import problems as prob_lib

    problem = prob_lib.make_problem(args.problem, quick=args.quick)
    batch = args.batch_size or problem.batch_size
    x = jax.device_put(problem.x_train[:batch])
    y_all = problem.y_train[:batch] if problem.y_train is not None else None
    y = None if y_all is None else jax.device_put(y_all)  # runners build targets themselves
    params0 = jax.device_put(problem.init_params(jax.random.key(0)))
    specs = [_parse_spec(s) for s in _split_specs(args.optimizers)]
    if specs[0][1] != "adam":
        specs.insert(0, ("adam", "adam", {}))

    runs = {}
    for label, name, hp in specs:
        runner = opt_lib.build(name, problem, hp)
        # Donate params and state, as a training loop would (no per-step copy of the state).
        step = jax.jit(runner.step, donate_argnums=(0, 1))
        params = jax.tree.map(jnp.copy, params0)
        # Fresh buffers for every leaf: donation rejects leaves that share one buffer.
        state = jax.tree.map(jnp.copy, jax.device_put(runner.init(params)))
        t0 = time.perf_counter()
        if runner.jit:
            compiled = step.lower(params, state, (x, y), jax.random.key(0)).compile()
        else:  # a self-staging step (kfac-jax): the first call compiles
            compiled = runner.step
            params, state, loss = compiled(params, state, (x, y), jax.random.key(0))
            jax.block_until_ready(params)
        compile_s = time.perf_counter() - t0
        for i in range(args.warmup):
            params, state, loss = compiled(params, state, (x, y), jax.random.key(i))
        jax.block_until_ready(params)
        state_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))
        runs[label] = dict(
            fn=compiled,
            params=params,
            state=state,
            compile_s=compile_s,
            times=[],
            state_bytes=state_bytes,
            hp=runner.hparams,
        )
        print(f"compiled {label}: {compile_s:.2f} s", flush=True)

    k = 0
    for r in range(args.rounds):
        for run in runs.values():
            params, state = run["params"], run["state"]
            for _ in range(args.block):
                t = time.perf_counter()
                params, state, loss = run["fn"](params, state, (x, y), jax.random.key(k))
                jax.block_until_ready((params, state))
                run["times"].append(time.perf_counter() - t)
                k += 1
            run["params"], run["state"] = params, state
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    param_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(params0))
    ref = np.median(runs[specs[0][0]]["times"])
    rows = []
    print(
        f"\n{problem.name}, batch {batch}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{os.cpu_count()} cpus; {args.rounds} rounds x {args.block} steps, interleaved"
    )
    print(
        f"{'optimizer':<40} {'median ms':>10} {'mean ms':>9} {'ratio':>6} {'compile s':>9} "
        f"{'state MB':>9} {'state/params':>12}"
    )
    for label, run in runs.items():
        t = np.asarray(run["times"])
        row = dict(
            optimizer=label,
            median_ms=1e3 * float(np.median(t)),
            mean_ms=1e3 * float(np.mean(t)),
            ratio_to_adam=float(np.median(t) / ref),
            mean_ratio_to_adam=float(np.mean(t) / np.mean(runs[specs[0][0]]["times"])),
            compile_s=run["compile_s"],
            state_bytes=int(run["state_bytes"]),
            state_over_params=run["state_bytes"] / param_bytes,
        )
        rows.append(row)
        print(
            f"{label:<40} {row['median_ms']:>10.2f} {row['mean_ms']:>9.2f} "
            f"{row['ratio_to_adam']:>6.2f} {row['compile_s']:>9.2f} "
            f"{row['state_bytes'] / 2**20:>9.2f} {row['state_over_params']:>12.2f}"
        )
    if args.json:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            commit = None
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    problem=problem.name,
                    batch=batch,
                    rows=rows,
                    commit=commit,
                    jax=jax.__version__,
                    device=jax.devices()[0].device_kind,
                    machine=platform.machine(),
                    cpus=os.cpu_count(),
                    argv=sys.argv[1:],
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
