"""Tables from results: the console table and the Markdown (and doc images)
of ``results.json`` files.

    python -m benchmarks.report results/main/results.json
    python -m benchmarks.report results/main/results.json \\
        --images docs/images --prefix main

prints the table used in ``docs/benchmarks.md`` and, with ``--images``,
copies the run's PNG plots there as ``<prefix>_<plot>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.methods import METHODS
from benchmarks.results import BenchmarkResult
from benchmarks.summary import summarise


def format_number(x, digits=4, missing="-") -> str:
  """A short number for tables: ``missing`` for None, ``inf`` for non-finite."""
  if x is None:
    return missing
  if isinstance(x, float) and not math.isfinite(x):
    return "inf"
  return f"{x:.{digits}g}"


def aligned(rows: List[List[Any]], right=lambda j, n: False) -> List[str]:
  """Text table lines: cells padded to their column's width (right-aligned
  where ``right(column, num_columns)``), a rule under the first row."""
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
  lines = []
  for i, r in enumerate(rows):
    lines.append("  " + "  ".join(
        str(c).rjust(w) if right(j, len(r)) else str(c).ljust(w)
        for j, (c, w) in enumerate(zip(r, widths))))
    if i == 0:
      lines.append("  " + "  ".join("-" * w for w in widths))
  return lines


def _lr_cell(name: str, e: Dict[str, Any]) -> str:
  if e["lr"] is not None:
    return f"{e['lr']:g}" + ("*" if e["tuned"] else "")
  m = METHODS.get(name)
  return "auto" if m and m.default_lr is None else "-"


def _table_row(name: str, e: Dict[str, Any], target, has_acc) -> List[str]:
  s = e.get("summary") or {}
  loss = format_number(s.get("final_train_loss"))
  if s.get("final_train_loss_std") and s.get("num_ok", 0) > 1:
    loss += f"±{s['final_train_loss_std']:.2g}"
  status = e["status"]
  if status == "ok" and s.get("num_diverged"):
    status = f"diverged {s['num_diverged']}/{s['num_ok']}"
  if status == "ok" and s.get("reached_target") and target:
    status = f"ok, reached {s['reached_target']}"
  row = [name, _lr_cell(name, e), loss,
         format_number(s.get("final_test_loss"))]
  if has_acc:
    acc = s.get("final_test_accuracy")
    row.append("-" if acc is None else f"{100 * acc:.1f}%")
  return row + [
      format_number(s.get("epochs_to_target"), 3),
      format_number(s.get("time_to_target_s"), 3),
      format_number(s.get("step_time_ms"), 3),
      format_number(s.get("step_time_ratio_interleaved")
                    or s.get("step_time_ratio"), 3),
      format_number(s.get("train_time_s"), 3), status]


def _has_accuracy(results: Dict[str, Any]) -> bool:
  return any((e.get("summary") or {}).get("final_test_accuracy") is not None
             for e in results["methods"].values())


def _table_notes(results: Dict[str, Any]) -> List[str]:
  """Failures, the optimisers' counters and the learning-rate grids."""
  ms = results["methods"]
  lines = [f"  {n}: {e['reason']}" for n, e in ms.items()
           if e["status"] != "ok" or e.get("reason")]
  if lines:
    lines.insert(0, "  not run / failed:")
  counted = [(n, e["runs"][0]) for n, e in ms.items()
             if e["runs"] and e["runs"][0].get("counters")]
  if counted:
    lines.append("  optimiser-state counters at the end of the first run "
                 "(per layer where a list):")
  for n, r in counted:
    cells = [f"{k.split('.')[-1]}="
             + ("/".join(map(str, v)) if isinstance(v, list) else str(v))
             for k, v in r["counters"].items()]
    lines.append(f"    {n} ({r['num_steps']} steps): " + ", ".join(cells))
  grids = [(n, e) for n, e in ms.items() if e["grid"]]
  if grids:
    lines.append("  LR grids (final train loss, seed "
                 f"{results['config']['seeds'][0]}; * = chosen):")
  for n, e in grids:
    lines.append(f"    {n}: " + ", ".join(
        f"{g['lr']:g}: {format_number(g['final_train_loss'])}"
        + ("*" if g["lr"] == e["lr"] else "") for g in e["grid"]))
  return lines


def format_table(results: Dict[str, Any]) -> str:
  """The printed summary table of a ``results.json`` dict."""
  exp, target = results["experiment"], results.get("target")
  cfg = results["config"]
  lines = [
      f"\n{exp['name']}: {exp['description']}",
      f"  {exp.get('architecture', '')}  params={exp.get('num_params')}  "
      f"batch={exp['batch_size']}  steps/epoch={exp['steps_per_epoch']}  "
      f"epochs={cfg['epochs']}  seeds={cfg['seeds']}"]
  if target:
    lines.append(f"  target = {target['method']}'s final train loss "
                 f"{format_number(target['train_loss'])} (lr "
                 f"{format_number(target['lr'])})")
  has_acc = _has_accuracy(results)
  header = (["method", "lr", "train loss", "test loss"]
            + ["test acc"] * has_acc
            + ["ep->target", "s->target", "ms/step", "x ref", "train s",
               "status"])
  lines += aligned([header] + [_table_row(n, e, target, has_acc)
                               for n, e in results["methods"].items()])
  inter = any((e.get("summary") or {}).get("step_time_ratio_interleaved")
              for e in results["methods"].values())
  lines.append(
      "  ms/step: median step time during training (excl. compile/eval); "
      "x ref: step time / the reference's"
      + (", timed round-robin after training" if inter else "")
      + "; ep/s->target: first reach of the target (interpolated)")
  return "\n".join(lines + _table_notes(results))


def _num(x, digits=4) -> str:
  return format_number(x, digits, missing="–")


def markdown_table(results: Dict[str, Any]) -> str:
  """One row per method: LR, losses, epochs/seconds to the target, timing."""
  target = results.get("target") or {}
  has_acc = _has_accuracy(results)
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
  # Older files get the newer summary fields.
  results = summarise(BenchmarkResult.from_json(
      json.loads(path.read_text()))).to_json()
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
