"""Running a test's child Python process, once per test session.

Some checks need a JAX that starts afresh (a different device count, a fresh process to
restore a checkpoint into), so they run in a child interpreter. Its results are computed once
per session and shared: under pytest-xdist, every worker that runs one of the dependent tests
waits for the first worker's child instead of starting its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, each xdist worker computes its own results
    fcntl = None

ROOT = Path(__file__).resolve().parent.parent

# The children compile one step per method; a lower backend optimization level roughly
# halves XLA's compile time on the CPU and is the same for every run compared.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def child_env(xla_flags: str = "", **extra: str) -> dict[str, str]:
    """The environment of a child: this one's, on the CPU, with ``xla_flags`` added."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS, xla_flags) if f)
    env["XLA_FLAGS"] = flags
    env.update(extra)
    return env


def strict_warnings() -> None:
    """In a child, as in the test suite (pyproject.toml): every warning is an error, but
    Flax's deprecation warnings."""
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="flax")


def run_module(module: str, *args: str, env: dict[str, str], timeout: float = 900) -> None:
    """``python -m module *args`` from the repository root; raises with its output on error."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{module} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"
        )


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def once_per_session(tmp_path_factory, name: str, produce: Callable[[Path], None]) -> Path:
    """A folder filled by ``produce(folder)`` once per test session, shared by xdist workers.

    If ``produce`` raises, the folder is left unmarked and the next caller tries again.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's temporary folder, common to all workers
    out = root / name
    with _locked(root / f"{name}.lock"):
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            produce(out)
            (out / "done").touch()
    return out
