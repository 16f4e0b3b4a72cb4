"""The documentation site builds cleanly, covers the API, and its code runs.

* ``sphinx-build -W --keep-going`` of ``docs/`` succeeds (warnings are
  errors), and the API page renders an entry for every name in ``__all__``;
* every public name is listed on ``docs/api.md`` and has a docstring;
* the docstring examples (``>>>``) of every module run and print what they
  show (``doctest``), and the main public functions have one;
* the guides include every script of ``examples/`` (which
  ``tests/test_examples.py`` runs).
"""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import optax_layerwise as olw

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Public functions whose docstrings must carry a runnable example.
NEEDS_EXAMPLE = (
    "layerwise_sgd", "layerwise_adamw", "scale_by_layerwise_step_size",
    "cblr", "mclr", "scale_by_curvature_lr", "kbfgs", "kbfgs_layer_names",
    "dense", "tap_dense_layers", "group_layers", "batch_size_schedule",
    "small_loss_weights",
)


def test_docs_build_with_warnings_as_errors(tmp_path):
  out = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
       "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
  assert proc.returncode == 0, (
      f"sphinx-build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  api = (out / "api.html").read_text()
  unrendered = [name for name in olw.__all__
                if f'id="optax_layerwise.{name}"' not in api]
  assert not unrendered, f"autodoc rendered no entry for {unrendered}"
  # The method pages render display equations, and no "$$" was left over
  # around inline math (a display block needs blank lines around it).
  for page in ("step_sizes", "curvature_lr", "kbfgs"):
    assert "math-wrapper" in (out / f"{page}.html").read_text(), page
  for page in out.rglob("*.html"):
    assert '$<span class="math' not in page.read_text(), page.name
  # The guides show their scripts.
  for guide in (DOCS / "guides").glob("*.md"):
    if guide.stem != "index":
      html = (out / "guides" / f"{guide.stem}.html").read_text()
      assert '<span class="nf">main</span>' in html, (
          f"{guide.name} shows no complete script")


def _api_page_names() -> set:
  text = (DOCS / "api.md").read_text()
  return set(re.findall(r"\.\. auto(?:function|class|data)::\s+"
                        r"optax_layerwise\.(\w+)", text))


def test_every_public_name_is_on_the_api_page_with_a_docstring():
  documented = _api_page_names()
  public = set(olw.__all__)
  assert public - documented == set(), "missing from docs/api.md"
  assert documented - public == set(), "docs/api.md documents non-public names"
  for name in olw.__all__:
    doc = inspect.getdoc(getattr(olw, name)) or ""
    # NamedTuple and dataclass defaults ("Name(field, ...)") do not count.
    assert doc.strip() and not doc.startswith(f"{name}("), (
        f"olw.{name} has no docstring of its own")


def _modules() -> list:
  return ["optax_layerwise"] + [
      f"optax_layerwise.{m.name}" for m in pkgutil.iter_modules(olw.__path__)]


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples_run(module_name):
  module = importlib.import_module(module_name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(
      optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  report = []
  for test in finder.find(module, module_name):
    runner.run(test, out=report.append)
  assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("name", NEEDS_EXAMPLE)
def test_main_functions_have_docstring_examples(name):
  tests = doctest.DocTestFinder().find(getattr(olw, name), name)
  assert sum(len(t.examples) for t in tests) > 0, f"olw.{name}: no example"


def test_guides_include_every_example_script():
  included = set()
  for guide in (DOCS / "guides").glob("*.md"):
    included |= set(re.findall(r"\.\./\.\./examples/(\w+\.py)",
                               guide.read_text()))
  scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
  assert scripts, "no examples/"
  assert scripts - included == set(), "example scripts no guide includes"
  assert included - scripts == set(), "guides include missing scripts"


def test_quick_start_page_swaps_construct():
  """The quick start page's "Swapping the method" lines build transforms."""
  text = (DOCS / "quickstart.md").read_text()
  swaps = text.split("## Swapping the method", 1)[1]
  block = re.search(r"```python\n(.*?)```", swaps, re.S).group(1)
  lines = [line for line in block.splitlines() if line.strip()]
  assert len(lines) >= 5
  for line in lines:
    namespace = {"olw": olw}
    exec(line, namespace)  # pylint: disable=exec-used
    assert callable(namespace["tx"].update), line


def test_readme_points_to_the_docs_and_how_to_build_them():
  readme = (ROOT / "README.md").read_text()
  assert "python -m sphinx -b html docs docs/_build/html" in readme
  assert "docs/index.md" in readme
