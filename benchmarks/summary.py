"""Summaries of a :class:`~benchmarks.results.BenchmarkResult`.

The target is the reference method's mean final train loss; every method's
summary gives its mean final losses, the epochs and seconds to first reach
the target (interpolated), and its step time and ratio to the reference's
(from training, and from the interleaved timing when there is one).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks.results import BenchmarkResult, MethodResult, Run
from benchmarks.timing import time_to_target

__all__ = ["step_ms", "summarise"]


def _mean_std(xs) -> Tuple[Optional[float], Optional[float]]:
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  if not xs:
    return None, None
  return float(np.mean(xs)), float(np.std(xs))


def step_ms(entry: MethodResult, stat: str = "median") -> Optional[float]:
  """Median over a method's runs, grid runs included, of each run's median
  (or other ``stat``) step time: every learning rate costs the same per
  step, so the grid runs make the estimate robust to load spikes on a
  shared machine."""
  times = [r.step_time_ms[stat] for r in entry.runs
           if r.status == "ok" and r.step_time_ms]
  first_seed = entry.runs[0].seed if entry.runs else None
  seen = {r.lr for r in entry.runs if r.seed == first_seed}
  key = "step_time_ms" if stat == "median" else f"step_time_{stat}_ms"
  times += [getattr(g, key) for g in entry.grid
            if getattr(g, key) and g.lr not in seen]
  return float(np.median(times)) if times else None


def _reach(ok: List[Run], target: Optional[float]) -> Dict[str, Any]:
  s = {"epochs_to_target": None, "time_to_target_s": None,
       "reached_target": None}
  if target is None or not ok:
    return s
  hits = [time_to_target(r.history.epoch, r.history.time_s,
                         r.history.train_loss, target) for r in ok]
  reached = [h for h in hits if h[0] is not None]
  s["reached_target"] = f"{len(reached)}/{len(ok)}"
  if reached:
    s["epochs_to_target"] = float(np.mean([h[0] for h in reached]))
    s["time_to_target_s"] = float(np.mean([h[1] for h in reached]))
  return s


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return a / b if a and b else None


def _summarise(entry: MethodResult, target: Optional[float],
               ref: Dict[str, Optional[float]]) -> Dict[str, Any]:
  ok = [r for r in entry.runs if r.status == "ok"]
  mean, std = _mean_std([r.final_loss for r in ok])
  ms, p10 = step_ms(entry), step_ms(entry, "p10")
  inter = entry.interleaved_step_time_ms
  return {
      "num_runs": len(entry.runs), "num_ok": len(ok),
      "num_diverged": sum(bool(r.diverged) for r in ok),
      "final_train_loss": mean, "final_train_loss_std": std,
      "final_test_loss": _mean_std(
          [r.history.test_loss[-1] for r in ok if r.history.test_loss])[0],
      "final_test_accuracy": _mean_std(
          [r.history.test_accuracy[-1] for r in ok
           if r.history.test_accuracy])[0],
      "step_time_ms": ms, "step_time_ratio": _ratio(ms, ref["median"]),
      "train_time_s": _mean_std([r.train_time_s for r in ok])[0],
      "compile_time_s": _mean_std([r.compile_time_s for r in ok])[0],
      **_reach(ok, target),
      "step_time_p10_ms": p10, "step_time_ratio_p10": _ratio(p10, ref["p10"]),
      "interleaved_step_time_ms": inter,
      "step_time_ratio_interleaved": _ratio(inter, ref["interleaved"]),
  }


def summarise(result: BenchmarkResult) -> BenchmarkResult:
  """(Re)computes ``result.target`` and every method's summary in place.

  Step-time ratios divide by the reference's step time (median and 10th
  percentile, the latter less sensitive to other processes on a shared
  machine, and the interleaved one).
  """
  reference = result.config["reference"]
  ref = result.methods.get(reference)
  ref_ok = [r for r in ref.runs if r.status == "ok"] if ref else []
  target = None
  result.target = None
  ref_times = {"median": None, "p10": None, "interleaved": None}
  if ref_ok:
    target = _mean_std([r.final_loss for r in ref_ok])[0]
    ref_times = {"median": step_ms(ref), "p10": step_ms(ref, "p10"),
                 "interleaved": ref.interleaved_step_time_ms}
    result.target = {"method": reference, "train_loss": target, "lr": ref.lr,
                     "step_time_ms": ref_times["median"],
                     "step_time_p10_ms": ref_times["p10"]}
  for entry in result.methods.values():
    if entry.runs:
      entry.summary = _summarise(entry, target, ref_times)
  return result
