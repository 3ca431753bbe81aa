"""The documentation: Sphinx builds it without a single warning, every public object has a
page, and every example runs, both those in the docstrings and those in the pages.

The examples are ``>>>`` blocks, run with :mod:`doctest` (the ``ELLIPSIS`` flag, as pytest's
``--doctest-modules``): the docstrings of every module of the package, found by
``doctest.DocTestFinder``, and the ``.rst`` pages under ``docs/``, one test per page.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kfqn_jax
from kfqn_jax import flax as kfx
from tests.method_cases import CASES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
FLAGS = doctest.ELLIPSIS
# Every method of the invariant matrix's registry must have its page.
METHODS = tuple(case.name for case in CASES)


def _module_names() -> list[str]:
    src = importlib.import_module("kfqn_jax._src")
    names = ["kfqn_jax", "kfqn_jax.flax"]
    names += [m.name for m in pkgutil.iter_modules(src.__path__, "kfqn_jax._src.")]
    return sorted(names)


def _docstring_tests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = []
    for name in _module_names():
        tests += [t for t in finder.find(importlib.import_module(name)) if t.examples]
    return sorted(tests, key=lambda t: t.name)


def _page_test(path: Path) -> doctest.DocTest:
    text = path.read_text(encoding="utf-8")
    name = str(path.relative_to(ROOT))
    return doctest.DocTestParser().get_doctest(text, {}, name, str(path), 0)


def _run(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


DOCSTRING_TESTS = _docstring_tests()


def test_docstring_examples_were_found():
    names = {t.name.rsplit(".", 1)[-1] for t in DOCSTRING_TESTS}
    # Every factory with a learning rate documents a runnable example.
    for method in ("kfac", "kbfgs", "kbfgs_l", "tnt", "shampoo", "smw_ng", "smw_gn"):
        assert method in names, method
    assert "hessian_free" in names and "value_and_sampled_grad" in names


@pytest.mark.parametrize("test", DOCSTRING_TESTS, ids=lambda t: t.name)
def test_docstring_example(test):
    _run(test)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples(path):
    test = _page_test(path)
    if not test.examples:
        pytest.skip("no examples on this page")
    _run(test)


def test_every_method_has_a_page_with_maths_an_example_and_references():
    for method in METHODS:
        page = DOCS / "methods" / f"{method}.rst"
        assert page.is_file(), page
        text = page.read_text(encoding="utf-8")
        assert f".. autofunction:: {method}\n" in text, method
        assert ".. math::" in text, method
        assert ">>> " in text, method
        assert "References\n----------" in text, method


def test_every_public_object_is_documented():
    documented = set()
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        documented |= set(re.findall(r"^\.\. auto(?:function|class):: (\w+)$", text, re.M))
    public = [n for n in kfqn_jax.__all__ if n != "losses"] + list(kfx.__all__)
    missing = sorted(set(public) - documented)
    assert not missing, f"no autodoc entry for {missing}"


def test_sphinx_build_has_no_warnings(tmp_path):
    pytest.importorskip("sphinx")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "-q",
        "-d",
        str(tmp_path / "doctrees"),
        str(DOCS),
        str(tmp_path / "html"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "WARNING" not in log, log
    for page in ("index", "choosing", "extra_args", "api", "methods/kbfgs"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
