"""The documentation site builds cleanly, covers the API, and its code runs.

* ``sphinx-build -W --keep-going`` of ``docs/`` succeeds (warnings are
  errors), and the API page renders an entry for every name in ``__all__``;
* every public name is listed on ``docs/api.md`` and has a docstring;
* the docstring examples (``>>>``) of every module run and print what they
  show (``doctest``), and the main public functions have one;
* the guides include every script of ``examples/`` (which
  ``tests/test_examples.py`` runs);
* the equations render with no network: MathJax is shipped with the build
  (``sphinx-mathjax-offline``), and no page loads a script or stylesheet
  from a remote URL;
* every ``*.md`` file named in a docstring, a comment or a page exists;
* the defaults tables of the method pages match the code's signatures.
"""

import ast
import doctest
import html
import importlib
import inspect
import json
import pathlib
import pkgutil
import re
import shutil
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
    "kbfgs_coverage",
    "dense", "tap_dense_layers", "group_layers", "batch_size_schedule",
    "small_loss_weights",
)


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
  """``sphinx-build -W --keep-going`` of docs/: (return code, log, html dir)."""
  tmp = tmp_path_factory.mktemp("docs")
  out = tmp / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
       "-d", str(tmp / "doctrees"), str(DOCS), str(out)],
      capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
  return proc.returncode, f"{proc.stdout}\n{proc.stderr}", out


def _built(built_docs) -> pathlib.Path:
  returncode, log, out = built_docs
  assert returncode == 0, f"sphinx-build failed ({returncode}):\n{log}"
  return out


def test_docs_build_with_warnings_as_errors(built_docs):
  out = _built(built_docs)
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
  _assert_math_renders_offline(out)
  # The guides show their scripts.
  for guide in (DOCS / "guides").glob("*.md"):
    if guide.stem != "index":
      html = (out / "guides" / f"{guide.stem}.html").read_text()
      assert '<span class="nf">main</span>' in html, (
          f"{guide.name} shows no complete script")


# What a page may load from another host: nothing (scripts, stylesheets,
# fonts, images); links to papers and repositories are fine.
_REMOTE_LOAD = re.compile(
    r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//[^\"]*\"")
_MATHJAX_SCRIPT = re.compile(
    r'<script\b[^>]*\bsrc="((?:\.\./)*_static/mathjax/tex-chtml\.js)"')


def _assert_math_renders_offline(out: pathlib.Path) -> None:
  """Math is typeset by the MathJax copy in ``_static/``, not from a CDN."""
  mathjax = out / "_static" / "mathjax"
  assert (mathjax / "tex-chtml.js").is_file(), (
      "no local MathJax in the build: is sphinx-mathjax-offline installed "
      "(docs extra) and listed in docs/conf.py?")
  fonts = list((mathjax / "output" / "chtml" / "fonts" / "woff-v2").glob(
      "*.woff"))
  assert fonts, "the local MathJax has no CHTML fonts"
  pages_with_math = 0
  for page in out.rglob("*.html"):
    html = page.read_text()
    remote = _REMOTE_LOAD.findall(html)
    assert not remote, f"{page.relative_to(out)} loads {remote}"
    if 'class="math' not in html:
      continue
    pages_with_math += 1
    scripts = _MATHJAX_SCRIPT.findall(html)
    assert scripts, f"{page.relative_to(out)}: math but no local MathJax"
    assert (page.parent / scripts[0]).resolve() == (
        mathjax / "tex-chtml.js").resolve(), page.name
  assert pages_with_math >= 3


# Defaults tables whose simple rows ("`name` | literal") must match the
# signature of the page's main function (defaults change; the tables must
# follow).
_DEFAULTS_TABLES = {"curvature_lr.md": "cblr", "kbfgs.md": "kbfgs"}


@pytest.mark.parametrize("page", sorted(_DEFAULTS_TABLES))
def test_defaults_tables_match_the_signatures(page):
  params = inspect.signature(getattr(olw, _DEFAULTS_TABLES[page])).parameters
  text = (DOCS / page).read_text()
  table = text.split("## Defaults and when to change them", 1)[1]
  table = table.split("\n#", 1)[0]
  checked = []
  for names_cell, default_cell in re.findall(r"^\| (.*?) \| (.*?) \|", table,
                                             re.M):
    names = re.findall(r"`(\w+)`", names_cell)
    values = [v.strip() for v in default_cell.split(",")]
    if (not names or len(names) != len(values)
        or any(n not in params for n in names)):
      continue
    for name, value in zip(names, values):
      value = re.sub(r"\s+\(.*\)$", "", value).strip("` ")
      try:
        documented = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        continue  # prose, e.g. "sqrt(damping)"
      assert params[name].default == documented, (
          f"docs/{page}: `{name}` documented as {value}, the code's default "
          f"is {params[name].default!r}")
      checked.append(name)
  assert len(checked) >= 8, checked


# Typesets TeX with the MathJax copy of the build, in Node (no browser):
# reads a JSON list of [where, tex, display], prints the ones that do not
# render: a TeX error, an undefined macro (MathJax shows it in red), or a
# backslash left in text (a macro text mode does not know, e.g. "\_").
_TYPESET_JS = """
const [mathjax, input] = process.argv.slice(2);
const items = JSON.parse(require('fs').readFileSync(input, 'utf8'));
require(mathjax + '/node-main.js').init({loader: {load: ['input/tex']}})
  .then((MathJax) => {
    const bad = [];
    for (const [where, tex, display] of items) {
      const mml = MathJax.tex2mml(tex, {display});
      if (/<merror|mathcolor="red"|<mtext[^>]*>[^<]*\\\\/.test(mml)) {
        bad.push([where, tex, mml]);
      }
    }
    console.log(JSON.stringify({checked: items.length, bad}));
  })
  .catch((err) => { console.error(err); process.exit(1); });
"""
_MATH_ELEMENT = re.compile(
    r'<(div|span) class="math notranslate nohighlight"[^>]*>(.*?)</\1>', re.S)


def test_equations_typeset_with_the_shipped_mathjax(built_docs, tmp_path):
  """Every equation of the built pages renders with the local MathJax.

  Not a browser, but the same MathJax files the pages load, run by Node:
  what a reader's browser typesets from ``_static/mathjax`` offline.
  """
  node = shutil.which("node") or shutil.which("nodejs")
  if node is None:
    pytest.skip("Node.js is not installed")
  out = _built(built_docs)
  items = []
  for page in sorted(out.rglob("*.html")):
    for tag, body in _MATH_ELEMENT.findall(page.read_text()):
      tex = html.unescape(body).strip()
      for left, right in ((r"\[", r"\]"), (r"\(", r"\)")):
        if tex.startswith(left) and tex.endswith(right):
          tex = tex[len(left):-len(right)]
      items.append([page.relative_to(out).as_posix(), tex, tag == "div"])
  assert len(items) > 50, "the method pages have fewer equations than expected"
  (tmp_path / "math.json").write_text(json.dumps(items))
  (tmp_path / "typeset.js").write_text(_TYPESET_JS)
  proc = subprocess.run(
      [node, str(tmp_path / "typeset.js"), str(out / "_static" / "mathjax"),
       str(tmp_path / "math.json")],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["checked"] == len(items)
  assert not result["bad"], "equations MathJax cannot typeset:\n" + "\n".join(
      f"{where}: {tex!r}\n  -> {mml}" for where, tex, mml in result["bad"])


# Source and documentation files whose *.md references must resolve.
_CITING = ("optax_layerwise/**/*.py", "benchmarks/**/*.py", "examples/**/*.py",
           "tests/**/*.py", "docs/**/*.md", "README.md", "CHANGELOG.md")
_MD_NAME = re.compile(r"(?<![\w*/.-])((?:\.\.?/)*[\w][\w./-]*\.md)\b")


def test_every_cited_markdown_file_exists():
  missing = []
  for pattern in _CITING:
    for path in sorted(ROOT.glob(pattern)):
      rel = path.relative_to(ROOT).as_posix()
      if rel.startswith("docs/_build/"):
        continue
      for lineno, line in enumerate(path.read_text().splitlines(), 1):
        for name in _MD_NAME.findall(line):
          candidates = (ROOT / name, path.parent / name, DOCS / name)
          if not any(c.is_file() for c in candidates):
            missing.append(f"{rel}:{lineno}: {name}")
  assert not missing, "cited files that do not exist:\n" + "\n".join(missing)


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
