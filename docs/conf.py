"""Sphinx configuration of the kfqn_jax documentation.

Build with ``sphinx-build docs docs/_build`` from the repository root (the test suite builds it
with ``-W`` so that any warning fails).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import kfqn_jax  # noqa: E402

project = "kfqn_jax"
author = "kfqn_jax developers"
copyright = "kfqn_jax developers"
release = kfqn_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Google-style docstrings ("Args:", "Returns:", "Example:", "References:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# Keep optax's alias readable instead of expanding it into its union.
autodoc_type_aliases = {"optax.ScalarOrSchedule": "optax.ScalarOrSchedule"}
autodoc_default_options = {"show-inheritance": False}

exclude_patterns = ["_build"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
html_title = f"kfqn_jax {release}"
