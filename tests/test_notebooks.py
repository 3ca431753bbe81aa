"""The notebooks: each one executes headlessly at a reduced size, the committed copies carry the
outputs of a real run at the normal size, and the README links every one of them.

The reduced size is selected by ``KFQN_NOTEBOOK_SMOKE=1``, which every notebook reads in its
setup cell. The kernel is the ``python3`` kernel of this interpreter (ipykernel); it sees the
repository root on ``PYTHONPATH``, so the notebooks import this checkout of kfqn_jax and find
the MNIST subset in ``benchmarks/assets`` without any download. ``PIP_NO_INDEX=1`` makes sure
that the install cell (skipped whenever kfqn_jax is importable) could not reach a package
index either.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _read(path: Path):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(path, as_version=4)


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_four_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_autoencoder.ipynb",
        "03_cnn_nnx.ipynb",
        "04_curvature.ipynb",
    ], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_at_the_smoke_size(path, monkeypatch):
    pytest.importorskip("ipykernel")
    nbclient = pytest.importorskip("nbclient")
    nb = _read(path)
    pythonpath = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), pythonpath) if p))
    monkeypatch.setenv("KFQN_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("KFQN_NOTEBOOK_DATA", raising=False)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    # Raises CellExecutionError, with the cell and its traceback, if any cell raises.
    client.execute()
    outputs = [o for c in _code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "smoke run" in text, "the notebook did not pick up KFQN_NOTEBOOK_SMOKE"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_the_outputs_of_a_full_run(path):
    nb = _read(path)
    cells = _code_cells(nb)
    first = cells[0].source
    assert "%pip install" in first and "except ImportError" in first, (
        "the first code cell must install the package only when it is not importable"
    )
    assert cells[0].outputs == [], "the install cell ran pip"
    for i, cell in enumerate(cells[1:], start=1):
        assert cell.execution_count is not None, f"code cell {i} was not executed"
        assert not [o for o in cell.outputs if o.output_type == "error"], f"code cell {i}"
    outputs = [o for c in cells for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "smoke run" not in text, "the committed outputs come from a smoke run"
    counts = [c.execution_count for c in cells[1:]]
    assert counts == sorted(counts), "cells were not executed top to bottom in one run"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "no figure in the committed outputs"
    size = path.stat().st_size
    assert size < 1_000_000, f"{path.name} is {size} bytes; keep the committed outputs small"


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"notebooks/{path.name}" in readme, f"README does not link {path.name}"


def test_synthetic_data_fallback_of_the_notebooks(monkeypatch):
    """Outside a clone (e.g. on Colab) the notebooks generate their images: run that code."""
    nb = _read(NOTEBOOK_DIR / "02_autoencoder.ipynb")
    sources = [c.source for c in _code_cells(nb) if "def load_digits" in c.source]
    assert sources, "no load_digits cell"
    source = sources[0].split("\n\n\nx_train")[0]  # the function only, not its use
    monkeypatch.setenv("KFQN_NOTEBOOK_DATA", "synthetic")
    namespace = {"os": os, "np": np, "Path": Path}
    exec(compile(source, "load_digits", "exec"), namespace)
    x_train, y_train, x_test, y_test, source_name = namespace["load_digits"](64, 16)
    assert "synthetic" in source_name
    assert x_train.shape == (64, 28, 28) and x_test.shape == (16, 28, 28)
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert y_train.shape == (64,) and set(np.unique(y_train)) <= set(range(10))
    # Same function text in every notebook that loads digits.
    for path in NOTEBOOKS:
        for cell in _code_cells(_read(path)):
            if "def load_digits" in cell.source:
                assert cell.source.startswith(source), path.name
