"""The README's quick start runs verbatim and prints a decreasing loss."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
  text = README.read_text()
  section = text.split("## Quick start", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_and_loss_decreases():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(_quick_start(), str(README), "exec"), {})
  losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out.getvalue())]
  assert len(losses) == 5, out.getvalue()
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.5 * losses[0], losses


def test_readme_set_up_commands_match_ci():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  test_command = re.search(r"\n    (python3 -m venv .*pytest.*)\n", text).group(1)
  # .ci/run runs exactly the README's test command (with the venv prepared).
  assert test_command.split("&& ")[-1] in ci
