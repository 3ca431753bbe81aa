"""Side-by-side optimizer benchmark: ``python -m benchmarks.run --help``.

All optimizers run one after another in this one process, from the same initial parameters,
on the same minibatches in the same order (one permutation per epoch, seeded) and with the
same per-step random keys. For each optimizer it records the per-step minibatch loss and wall
time (``block_until_ready`` after every step), the time of the first call (compilation plus
one step, reported as ``compile_time_s`` and excluded from the medians), the median step
time and its ratio to ``adam`` from the same run, the optimizer state's bytes next to the
parameters' bytes, and the device's peak memory where ``memory_stats()`` reports it. Results
go to ``<out>/<problem>.json`` plus two PNG plots; a table is printed at the end.
"""

from __future__ import annotations

import os

# JAX's CPU LAPACK kernels (Cholesky, eigh, triangular solves) call into SciPy's OpenBLAS,
# whose worker threads compete with XLA's own thread pool: on a 2-core machine this made
# KFAC's inverse steps 30x slower and erratic (8 s instead of 0.27 s). One BLAS thread unless
# the user chose otherwise; must be set before numpy/scipy load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import datetime
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
QUICK_STEPS = 30
REFERENCE = "adam"


# ----------------------------------------------------------------------------------------------
# Arguments.


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks import optimizers as opt_lib
    from benchmarks import problems as prob_lib

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run optimizers side by side on one problem and record loss, time, memory.",
    )
    p.add_argument("--problem", default="mnist_ae", choices=sorted(prob_lib.PROBLEMS))
    p.add_argument(
        "--optimizers",
        default="adam,kfac",
        help=f"comma-separated names from: {', '.join(opt_lib.KNOWN)}",
    )
    p.add_argument("--epochs", type=float, default=10.0, help="epochs per optimizer")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides --epochs)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop each optimizer once its training steps (compilation and evaluation "
        "excluded) have taken this many seconds, even before --epochs/--steps",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the problem's")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small data (embedded MNIST, no download) and {QUICK_STEPS} steps: a smoke run",
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: JAX's")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        choices=("flax", "torch"),
        default="flax",
        help="parameter initialisation: Flax defaults, or PyTorch's layer defaults "
        "U(+-1/sqrt(fan_in)) as in the authors' code",
    )
    p.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="OPT.KEY=VALUE",
        help="override a hyperparameter, e.g. --hp kfac.learning_rate=0.1 (repeatable)",
    )
    p.add_argument("--eval-train", action="store_true", help="full train loss at epoch ends")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--data-dir", default=None, help="dataset cache (default $KFQN_DATA_DIR)")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in opt_lib.KNOWN]
    if not names or unknown:
        p.error(f"unknown optimizer(s) {unknown}; choose from {', '.join(opt_lib.KNOWN)}")
    if len(set(names)) != len(names):
        p.error("an optimizer is listed twice")
    args.optimizer_names = names

    overrides: dict[str, dict[str, Any]] = {}
    for item in args.hp:
        key, sep, value = item.partition("=")
        name, dot, hp_key = key.partition(".")
        if not sep or not dot or not hp_key:
            p.error(f"--hp expects OPT.KEY=VALUE, got {item!r}")
        overrides.setdefault(name, {})[hp_key] = _parse_value(value)
    args.overrides = overrides
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be >= 2 (the first call is compilation)")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    return args


# ----------------------------------------------------------------------------------------------
# Small utilities.


def _tree_bytes(tree) -> int:
    import jax

    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def _tree_size(tree) -> int:
    import jax

    return int(sum(getattr(x, "size", 0) for x in jax.tree.leaves(tree)))


def _peak_memory(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the API
        return None
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    return int(value) if value is not None else None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "optax", "flax", "numpy", "kfqn_jax", "kfac-jax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


class _Progress:
    """tqdm when installed and stderr is a terminal; otherwise a line every ~10% of steps."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.bar = None
        try:
            from tqdm import tqdm

            if sys.stderr.isatty():
                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
        self.every = max(1, total // 10)

    def update(self, loss: float):
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        elif self.n % self.every == 0 or self.n == self.total:
            print(f"  {self.desc}: step {self.n}/{self.total}  loss {loss:.5g}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# The run.


def _schedule(n_train: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """Minibatch indices for ``steps`` steps: a fresh seeded permutation each epoch, the last
    partial batch of an epoch dropped. Identical for every optimizer."""
    per_epoch = n_train // batch
    if per_epoch < 1:
        raise ValueError(f"batch size {batch} is larger than the training set ({n_train})")
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        perm = np.random.default_rng([seed, epoch]).permutation(n_train)
        for i in range(per_epoch):
            out.append(perm[i * batch : (i + 1) * batch])
            if len(out) == steps:
                break
        epoch += 1
    return out


def _make_eval(problem, dtype):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def batch_loss_sum(params, x, y):
        out = problem.model.apply({"params": params}, x)
        return problem.loss(out, problem.targets_of(x, y)).astype(jnp.float32) * x.shape[0]

    def evaluate(params, x_all, y_all, chunk=1000) -> float:
        total, n = 0.0, len(x_all)
        for i in range(0, n, chunk):
            x = jnp.asarray(x_all[i : i + chunk], dtype)
            y = None if y_all is None else jnp.asarray(y_all[i : i + chunk])
            total += float(batch_loss_sum(params, x, y))
        return total / n

    return evaluate


def _run_one(name, problem, params0, schedule, args, device, dtype, evaluate) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from benchmarks import optimizers as opt_lib

    record: dict[str, Any] = {"status": "ok"}
    settings = problem.paper_settings.get(name, {})
    record["hparams_source"] = settings.get("source")
    try:
        runner = opt_lib.build(name, problem, args.overrides.get(name))
    except opt_lib.Unavailable as e:
        return {**record, "status": e.status, "reason": e.reason}
    except Exception as e:  # noqa: BLE001 - a broken builder is reported, the run goes on
        traceback.print_exc()
        return {**record, "status": "error", "reason": f"build: {type(e).__name__}: {e}"}
    record["hparams"] = runner.hparams
    if runner.ignored:
        record["ignored_hparams"] = runner.ignored
        print(f"  {name}: factory does not take {sorted(runner.ignored)}; not passed", flush=True)

    n_train, batch = problem.n_train, len(schedule[0])
    steps_per_epoch = n_train // batch
    key = jax.random.key(args.seed)
    losses: list[float] = []
    times: list[float] = []
    epochs: list[dict[str, Any]] = []
    compile_time = None
    params = opt_state = None
    progress = _Progress(len(schedule), name)
    try:
        with jax.default_device(device):
            # Commit everything to the device up front: a jitted function sees uncommitted
            # inputs (made outside jit) and committed ones (its own outputs) as different
            # signatures, and would compile a second time on step 2.
            params = jax.device_put(jax.tree.map(jnp.copy, params0), device)
            # Fresh buffers for every leaf: donation rejects leaves that share one buffer.
            opt_state = jax.tree.map(jnp.copy, jax.device_put(runner.init(params), device))
            jax.block_until_ready(opt_state)
            record["opt_state_bytes"] = _tree_bytes(opt_state)
            # Donate params and state, as a training loop would: no copy of the state per step.
            step = jax.jit(runner.step, donate_argnums=(0, 1)) if runner.jit else runner.step
            epoch_start, trained = 0, 0.0
            for i, idx in enumerate(schedule):
                x = jax.device_put(jnp.asarray(problem.x_train[idx], dtype), device)
                y = (
                    None
                    if problem.y_train is None
                    else jax.device_put(problem.y_train[idx], device)
                )
                rng = jax.device_put(jax.random.fold_in(key, i), device)
                jax.block_until_ready((x, y))
                t0 = time.perf_counter()
                params, opt_state, loss = step(params, opt_state, (x, y), rng)
                jax.block_until_ready((params, opt_state, loss))
                dt = time.perf_counter() - t0
                if i == 0:
                    compile_time = dt
                else:
                    times.append(dt)
                loss = float(loss)
                losses.append(loss)
                progress.update(loss)
                if not math.isfinite(loss):
                    record["status"] = "diverged"
                    record["reason"] = f"non-finite loss at step {i}"
                    break
                end_of_epoch = (i + 1) % steps_per_epoch == 0
                trained += dt if i else 0.0
                out_of_time = args.time_budget is not None and trained >= args.time_budget
                if end_of_epoch or i + 1 == len(schedule) or out_of_time:
                    epochs.append(_epoch_record(i, steps_per_epoch, losses[epoch_start:], args))
                    epochs[-1]["test_loss"] = evaluate(params, problem.x_test, problem.y_test)
                    if args.eval_train and end_of_epoch:
                        epochs[-1]["train_loss"] = evaluate(
                            params, problem.x_train, problem.y_train
                        )
                    epoch_start = i + 1
                if out_of_time:
                    record["stopped_by_time_budget"] = True
                    break
    except Exception as e:  # noqa: BLE001 - report and continue with the next optimizer
        traceback.print_exc()
        record["status"] = "error"
        record["reason"] = f"step {len(losses)}: {type(e).__name__}: {e}"
    finally:
        progress.close()

    record.update(
        steps=len(losses),
        losses=losses,
        step_times_s=times,
        compile_time_s=compile_time,
        median_step_time_s=float(np.median(times)) if times else None,
        mean_step_time_s=float(np.mean(times)) if times else None,
        total_step_time_s=float(np.sum(times)) if times else None,
        epochs=epochs,
        epochs_completed=len(losses) / steps_per_epoch,
        final_loss=float(np.mean(losses[-10:])) if losses else None,
        final_test_loss=epochs[-1]["test_loss"] if epochs else None,
        peak_memory_bytes=_peak_memory(device),
    )
    del params, opt_state
    return record


def _epoch_record(i, steps_per_epoch, epoch_losses, args) -> dict[str, Any]:
    del args
    return {
        "epoch": (i + 1) / steps_per_epoch,
        "step": i + 1,
        "mean_minibatch_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
    }


def _time_axis(record) -> list[float]:
    """Seconds of training (compilation excluded) before each recorded loss.

    Loss ``i`` is computed at the parameters after ``i`` updates. The first call's time
    includes compilation, so update 0 is counted as one median step.
    """
    times, n = record["step_times_s"], record["steps"]
    if n == 0:
        return []
    med = record["median_step_time_s"] or 0.0
    axis = [0.0]
    elapsed = med
    for i in range(1, n):
        axis.append(elapsed)
        if i - 1 < len(times):
            elapsed += times[i - 1]
    return axis


def _plot(result, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problem = result["problem"]
    spe = result["data"]["steps_per_epoch"]
    paths = []
    for kind in ("epoch", "time"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rec in result["optimizers"].items():
            if not rec.get("losses"):
                continue
            losses = np.asarray(rec["losses"])
            if kind == "epoch":
                xs = np.arange(len(losses)) / spe
            else:
                xs = np.asarray(_time_axis(rec))
            (line,) = ax.plot(xs, losses, lw=1, alpha=0.8, label=f"{name} (minibatch)")
            test = [(e["epoch"], e["test_loss"]) for e in rec.get("epochs", [])]
            if kind == "epoch" and test:
                ex, ey = zip(*test, strict=True)
                ax.plot(ex, ey, "o--", color=line.get_color(), ms=4, label=f"{name} (test)")
        ax.set_xlabel("epoch" if kind == "epoch" else "seconds (compilation excluded)")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        # A diverged run must not squash the others: cap the axis at twice the largest
        # starting loss (the diverged part leaves the plot, its status is in the JSON).
        starts = [
            r["losses"][0]
            for r in result["optimizers"].values()
            if r.get("losses") and r["losses"][0] is not None and math.isfinite(r["losses"][0])
        ]
        if starts:
            ax.set_ylim(top=2.0 * max(starts))
        ax.set_title(f"{problem}: loss vs {'epoch' if kind == 'epoch' else 'wall time'}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        path = out_dir / f"{problem}_loss_vs_{'epoch' if kind == 'epoch' else 'seconds'}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def _finite(obj):
    """Replaces NaN/inf floats by None so the JSON is strict (RFC 8259) JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(result) -> str:
    """Plain-text summary table of a result dict."""
    ref = result["optimizers"].get(REFERENCE, {})
    ref_med = ref.get("median_step_time_s")
    header = (
        f"{'optimizer':<20} {'status':<16} {'median ms':>10} {'x adam':>7} {'compile s':>9} "
        f"{'final loss':>11} {'test loss':>10} {'state MB':>9} {'params MB':>9} {'peak MB':>8}"
    )
    lines = [header, "-" * len(header)]
    pmb = result["params_bytes"] / 2**20
    for name, rec in result["optimizers"].items():
        med = rec.get("median_step_time_s")
        ratio = med / ref_med if (med is not None and ref_med) else None
        state = rec.get("opt_state_bytes")
        peak = rec.get("peak_memory_bytes")
        lines.append(
            f"{name:<20} {rec['status']:<16} {_fmt(med and med * 1e3, '10.2f'):>10} "
            f"{_fmt(ratio, '7.2f'):>7} {_fmt(rec.get('compile_time_s'), '9.2f'):>9} "
            f"{_fmt(rec.get('final_loss'), '11.4f'):>11} "
            f"{_fmt(rec.get('final_test_loss'), '10.4f'):>10} "
            f"{_fmt(state and state / 2**20, '9.2f'):>9} {pmb:>9.2f} "
            f"{_fmt(peak and peak / 2**20, '8.1f'):>8}"
        )
    notes = [
        f"  {name}: {rec['reason']}"
        for name, rec in result["optimizers"].items()
        if rec["status"] != "ok" and rec.get("reason")
    ]
    if notes:
        lines += ["", "notes:", *notes]
    if ref_med is None:
        lines.append(f"(no '{REFERENCE}' timing in this run: ratios are not available)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the benchmark; returns 0, or 1 if an optimizer raised an error."""
    args = parse_args(argv)

    import jax
    import jax.numpy as jnp

    from benchmarks import problems as prob_lib

    if args.device is not None:
        try:
            device = jax.devices(args.device)[0]
        except RuntimeError as e:
            print(f"error: no {args.device} device available to JAX ({e})", file=sys.stderr)
            return 2
    else:
        device = jax.devices()[0]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

    t_setup = time.perf_counter()
    problem = prob_lib.make_problem(args.problem, quick=args.quick, data_dir=args.data_dir)
    problem = dataclasses.replace(problem, init=args.init)
    batch = args.batch_size or problem.batch_size
    steps_per_epoch = problem.n_train // batch
    if args.steps is not None:
        steps = args.steps
    elif args.quick:
        steps = QUICK_STEPS
    else:
        steps = max(2, int(round(args.epochs * steps_per_epoch)))
    schedule = _schedule(problem.n_train, batch, steps, args.seed)

    with jax.default_device(device):
        params0 = problem.init_params(jax.random.key(args.seed))
        params0 = jax.tree.map(lambda p: jnp.asarray(p, dtype), params0)
    evaluate = _make_eval(problem, dtype)
    setup_s = time.perf_counter() - t_setup

    print(
        f"{problem.name}: {problem.n_train} train / {len(problem.x_test)} test "
        f"({problem.data_source}); "
        f"batch {batch}, {steps} steps ({steps / steps_per_epoch:.2f} epochs); "
        f"{_tree_size(params0):,} params; device {device.device_kind} ({device.platform}); "
        f"{args.dtype}",
        flush=True,
    )

    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "problem": problem.name,
        "config": {
            "optimizers": args.optimizer_names,
            "quick": args.quick,
            "init": args.init,
            "epochs": steps / steps_per_epoch,
            "steps": steps,
            "time_budget_s": args.time_budget,
            "batch_size": batch,
            "seed": args.seed,
            "dtype": args.dtype,
            "overrides": args.overrides,
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "env": {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device),
            "device_kind": device.device_kind,
            "platform": device.platform,
            "cpu_count": os.cpu_count(),
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "git_commit": _git_commit(),
            "versions": _versions(),
        },
        "data": {
            "source": problem.data_source,
            "n_train": problem.n_train,
            "n_test": len(problem.x_test),
            "steps_per_epoch": steps_per_epoch,
            "setup_s": setup_s,
        },
        "notes": problem.notes,
        "params_bytes": _tree_bytes(params0),
        "param_count": _tree_size(params0),
        "optimizers": {},
    }

    for name in args.optimizer_names:
        print(f"== {name}", flush=True)
        rec = _run_one(name, problem, params0, schedule, args, device, dtype, evaluate)
        rec["params_bytes"] = result["params_bytes"]
        result["optimizers"][name] = rec
        if rec["status"] in ("ok", "diverged"):
            print(
                f"  {name}: compile {rec['compile_time_s']:.2f} s, median step "
                f"{_fmt(rec['median_step_time_s'] and rec['median_step_time_s'] * 1e3, '.2f')} "
                f"ms, final loss {_fmt(rec['final_loss'], '.4f')}",
                flush=True,
            )
        else:
            print(f"  {name}: {rec['status']} ({rec.get('reason', '')})", flush=True)

    ref = result["optimizers"].get(REFERENCE, {}).get("median_step_time_s")
    for rec in result["optimizers"].values():
        med = rec.get("median_step_time_s")
        rec["step_time_ratio_to_adam"] = med / ref if (med is not None and ref) else None

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        result["plots"] = _plot(result, out_dir)
    json_path = out_dir / f"{problem.name}.json"
    with open(json_path, "w") as f:
        json.dump(_finite(result), f, indent=1, allow_nan=False)

    print()
    print(format_table(result))
    print(
        f"\nwrote {json_path}" + (f" and {len(result['plots'])} plots" if "plots" in result else "")
    )
    return 1 if any(r["status"] == "error" for r in result["optimizers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
