"""Markdown tables (and doc images) from ``results.json`` files.

    python -m benchmarks.report results/main/results.json
    python -m benchmarks.report results/main/results.json \\
        --images docs/images --prefix main

prints the table used in ``docs/benchmarks.md`` and, with ``--images``,
copies the run's PNG plots there as ``<prefix>_<plot>.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
from typing import Any, Dict, Optional, Sequence

from benchmarks.runner import (METHODS, format_number, summarise_results,
                               validate_results)


def _num(x, digits=4) -> str:
  return format_number(x, digits, missing="–")


def markdown_table(results: Dict[str, Any]) -> str:
  """One row per method: LR, losses, epochs/seconds to the target, timing."""
  target = results.get("target") or {}
  has_acc = any((e.get("summary") or {}).get("final_test_accuracy")
                is not None for e in results["methods"].values())
  ref = target.get("method", "ref")
  head = ["method", "LR", "final train loss", "test loss"]
  if has_acc:
    head.append("test acc")
  head += [f"epochs to {ref}'s final", f"seconds to {ref}'s final",
           "ms / step (training)", f"step time / {ref}'s"]
  rows = ["| " + " | ".join(head) + " |",
          "|" + "|".join("---" for _ in head) + "|"]
  for name, e in results["methods"].items():
    s = e.get("summary") or {}
    m = METHODS.get(name)
    label = e.get("label", name)
    if e["status"] != "ok":
      cells = [f"{label} (`{name}`)", "", f"**{e['status']}**: {e['reason']}"]
      cells += [""] * (len(head) - len(cells))
      rows.append("| " + " | ".join(cells) + " |")
      continue
    if e["lr"] is not None:
      lr = f"{e['lr']:g}" + (" (tuned)" if e["tuned"] else "")
    else:
      lr = "none (auto)" if m and m.default_lr is None else "–"
    loss = _num(s.get("final_train_loss"))
    if s.get("num_diverged"):
      loss = f"diverged ({s['num_diverged']}/{s['num_ok']})"
    if s.get("num_ok", 0) > 1 and s.get("final_train_loss_std") is not None:
      loss += f" ± {s['final_train_loss_std']:.2g}"
    cells = [f"{label} (`{name}`)", lr, loss, _num(s.get("final_test_loss"))]
    if has_acc:
      acc = s.get("final_test_accuracy")
      cells.append("–" if acc is None else f"{100 * acc:.1f}%")
    reached = s.get("epochs_to_target")
    cells += [
        _num(reached, 3) if reached is not None else "not reached",
        _num(s.get("time_to_target_s"), 3) if reached is not None else "–",
        _num(s.get("step_time_ms"), 3),
        (_num(s["step_time_ratio_interleaved"], 3) + " (interleaved)"
         if s.get("step_time_ratio_interleaved")
         else _num(s.get("step_time_ratio"), 3))]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def grid_lines(results: Dict[str, Any]) -> str:
  out = []
  for name, e in results["methods"].items():
    if e["grid"]:
      cells = ", ".join(
          f"{g['lr']:g} → {_num(g['final_train_loss'])}"
          + (" **(chosen)**" if g["lr"] == e["lr"] else "")
          for g in e["grid"])
      out.append(f"- `{name}`: {cells}")
  return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", help="a results.json")
  p.add_argument("--images", default=None, help="copy the PNGs here")
  p.add_argument("--prefix", default=None,
                 help="image name prefix (default: experiment name)")
  args = p.parse_args(argv)
  path = pathlib.Path(args.results)
  results = json.loads(path.read_text())
  validate_results(results)
  summarise_results(results)  # older files get the newer summary fields
  exp = results["experiment"]
  env = results["environment"]
  print(f"**{exp['name']}**: {exp['description']}; {exp.get('architecture')}, "
        f"{exp['num_params']} params, batch {exp['batch_size']}, "
        f"{results['config']['epochs']} epochs, seeds "
        f"{results['config']['seeds']}. Measured {env.get('date')} on "
        f"{env.get('cpu_count')} CPU cores (load average at start "
        f"{_num((env.get('load_average_at_start') or [None])[0], 2)}), "
        f"jax {env.get('jax')}, commit {env.get('git', {}).get('commit')}"
        f"{' + uncommitted library changes' if env.get('git', {}).get('library_modified') else ''}.\n")
  print(markdown_table(results))
  grids = grid_lines(results)
  if grids:
    print("\nLearning-rate grids (final train loss, first seed):\n")
    print(grids)
  if args.images:
    out = pathlib.Path(args.images)
    out.mkdir(parents=True, exist_ok=True)
    prefix = args.prefix or exp["name"]
    for kind in results.get("plots", {}):
      src = path.parent / f"{kind}.png"
      if src.exists():
        dst = out / f"{prefix}_{kind}.png"
        shutil.copyfile(src, dst)
        print(f"\n![{exp['name']} {kind}]({dst.as_posix()})")


if __name__ == "__main__":
  main()
