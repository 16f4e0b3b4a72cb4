"""Sphinx configuration: MyST Markdown pages, autodoc + napoleon API pages.

Build (warnings are errors in the test suite, ``tests/test_docs.py``)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if importlib.util.find_spec("optax_layerwise") is None:  # not installed
  sys.path.insert(0, str(ROOT))

import optax_layerwise  # noqa: E402  pylint: disable=g-import-not-at-top

project = "optax-layerwise"
author = "optax-layerwise developers"
copyright = "optax-layerwise developers"  # pylint: disable=redefined-builtin
release = optax_layerwise.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped with the build (copied to _static/mathjax/), so the
    # equations render from a local build with no network; the pip package
    # sphinx-mathjax-offline (docs and dev extras) sets mathjax_path.
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ / $$...$$ math, \begin{align} environments, ::: fences,
# header anchors for in-page links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc / napoleon: Google-style docstrings, signatures without the
# (long, repeated) type hints, attributes of NamedTuple states as fields
# (``:ivar:``) so they do not duplicate the generated field properties.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False
napoleon_attr_annotations = False

try:
  import furo  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  html_theme = "furo"
except ImportError:  # pragma: no cover - the docs extra installs furo
  html_theme = "alabaster"
html_title = f"optax-layerwise {release}"
