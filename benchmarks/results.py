"""Typed benchmark results and their one JSON schema.

:class:`BenchmarkResult` (an experiment's run of several methods) holds one
:class:`MethodResult` per method, which holds its learning-rate grid
(:class:`GridPoint`) and one :class:`Run` per seed; a run's evaluations are
its :class:`History`. ``to_json`` gives the ``results.json`` dict (non-finite
numbers as ``null``), ``from_json`` reads it back after :func:`validate`, the
one check of the schema.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["SCHEMA_VERSION", "History", "Run", "GridPoint", "MethodResult",
           "BenchmarkResult", "validate", "json_safe", "write_json",
           "environment", "finite"]

SCHEMA_VERSION = 1
STATUSES = ("ok", "unavailable", "failed")


def finite(x) -> Optional[float]:
  """``float(x)``, or ``None`` if it is not finite."""
  x = float(x)
  return x if math.isfinite(x) else None


def json_safe(x):
  """Non-finite floats -> None, tuples -> lists, NumPy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return finite(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def write_json(path, obj) -> None:
  """Writes ``obj`` (made JSON-safe) to ``path``."""
  with open(path, "w") as f:
    json.dump(json_safe(obj), f, indent=1, allow_nan=False)


class _Record:
  """``to_json`` / ``from_json`` of a flat dataclass; fields in ``_OPTIONAL``
  are left out of the JSON while ``None``."""
  _OPTIONAL = ()

  def to_json(self) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if v is None and f.name in self._OPTIONAL:
        continue
      out[f.name] = v.to_json() if isinstance(v, _Record) else v
    return json_safe(out)

  @classmethod
  def from_json(cls, d: Dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class History(_Record):
  """The full-split evaluations of a run, one entry per evaluation."""
  epoch: List[float] = dataclasses.field(default_factory=list)
  step: List[int] = dataclasses.field(default_factory=list)
  time_s: List[float] = dataclasses.field(default_factory=list)
  train_loss: List[Optional[float]] = dataclasses.field(default_factory=list)
  test_loss: List[Optional[float]] = dataclasses.field(default_factory=list)
  test_accuracy: List[Optional[float]] = dataclasses.field(
      default_factory=list)

  def append(self, epoch, step, time_s, train_loss, test_loss=None,
             test_accuracy=None) -> None:
    self.epoch.append(float(epoch))
    self.step.append(int(step))
    self.time_s.append(float(time_s))
    for name, v in (("train_loss", train_loss), ("test_loss", test_loss),
                    ("test_accuracy", test_accuracy)):
      getattr(self, name).append(None if v is None else finite(v))


@dataclasses.dataclass
class Run(_Record):
  """One training run: a method at one learning rate and seed."""
  method: str
  lr: Optional[float]
  seed: int
  status: str = "ok"
  reason: Optional[str] = None
  diverged: bool = False
  epochs: int = 0
  num_steps: int = 0
  compile_time_s: Optional[float] = None
  train_time_s: float = 0.0
  step_time_ms: Optional[Dict[str, float]] = None
  history: History = dataclasses.field(default_factory=History)
  batch_loss: Dict[str, list] = dataclasses.field(
      default_factory=lambda: {"step": [], "loss": []})
  diagnostics: Dict[str, Dict[str, list]] = dataclasses.field(
      default_factory=dict)
  counters: Dict[str, Any] = dataclasses.field(default_factory=dict)
  traceback: Optional[str] = None
  load_average_at_end: Optional[List[float]] = None
  _OPTIONAL = ("traceback", "load_average_at_end")

  @classmethod
  def from_json(cls, d):
    return dataclasses.replace(super().from_json(d),
                               history=History.from_json(d["history"]))

  @property
  def final_loss(self) -> float:
    """The last full train loss (``inf`` if failed, diverged or none)."""
    if self.status != "ok" or self.diverged:
      return math.inf
    losses = [l for l in self.history.train_loss if l is not None]
    return losses[-1] if losses else math.inf

  def set_step_times(self, seconds: List[float]) -> None:
    """``num_steps``, ``train_time_s`` and ``step_time_ms`` from the steps'
    wall times."""
    self.num_steps = len(seconds)
    self.train_time_s = float(sum(seconds))
    if seconds:
      ms = np.asarray(seconds) * 1e3
      self.step_time_ms = {"median": float(np.median(ms)),
                           "mean": float(ms.mean()),
                           "p10": float(np.percentile(ms, 10)),
                           "p90": float(np.percentile(ms, 90))}


@dataclasses.dataclass
class GridPoint(_Record):
  """One learning rate of a tuned method's grid (its first seed's run)."""
  lr: float
  status: str
  diverged: bool
  final_train_loss: Optional[float]
  step_time_ms: Optional[float]
  step_time_p10_ms: Optional[float]

  @classmethod
  def of(cls, run: Run) -> "GridPoint":
    t = run.step_time_ms or {}
    return cls(lr=run.lr, status=run.status, diverged=run.diverged,
               final_train_loss=finite(run.final_loss),
               step_time_ms=t.get("median"), step_time_p10_ms=t.get("p10"))


@dataclasses.dataclass
class MethodResult(_Record):
  """A method's runs (one per seed) at its chosen learning rate."""
  label: str
  status: str = "ok"
  reason: Optional[str] = None
  lr: Optional[float] = None
  tuned: bool = False
  grid: List[GridPoint] = dataclasses.field(default_factory=list)
  runs: List[Run] = dataclasses.field(default_factory=list)
  summary: Dict[str, Any] = dataclasses.field(default_factory=dict)
  interleaved_step_time_ms: Optional[float] = None
  cached_from: Optional[Dict[str, Any]] = None
  _OPTIONAL = ("interleaved_step_time_ms", "cached_from")

  def to_json(self):
    return dict(super().to_json(), grid=[g.to_json() for g in self.grid],
                runs=[r.to_json() for r in self.runs])

  @classmethod
  def from_json(cls, d):
    return dataclasses.replace(
        super().from_json(d), grid=[GridPoint.from_json(g) for g in d["grid"]],
        runs=[Run.from_json(r) for r in d["runs"]])


@dataclasses.dataclass
class BenchmarkResult(_Record):
  """An experiment's results: every method, the target, the environment.

  ``extra`` holds a script's own top-level sections (written as such).
  """
  experiment: Dict[str, Any]
  config: Dict[str, Any]
  environment: Dict[str, Any]
  target: Optional[Dict[str, Any]] = None
  methods: Dict[str, MethodResult] = dataclasses.field(default_factory=dict)
  plots: Dict[str, str] = dataclasses.field(default_factory=dict)
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> Dict[str, Any]:
    return json_safe(dict(
        schema_version=SCHEMA_VERSION, experiment=self.experiment,
        config=self.config, environment=self.environment, target=self.target,
        methods={n: m.to_json() for n, m in self.methods.items()},
        plots=self.plots, **self.extra))

  @classmethod
  def from_json(cls, d):
    validate(d)
    known = {"schema_version", "experiment", "config", "environment",
             "target", "methods", "plots"}
    return cls(experiment=d["experiment"], config=d["config"],
               environment=d["environment"], target=d["target"],
               methods={n: MethodResult.from_json(m)
                        for n, m in d["methods"].items()},
               plots=d["plots"],
               extra={k: v for k, v in d.items() if k not in known})

  def write(self, path) -> None:
    write_json(path, self.to_json())


# --------------------------------------------------------------------------
# The schema check
# --------------------------------------------------------------------------

_TOP_KEYS = {"schema_version", "experiment", "config", "environment",
             "target", "methods", "plots"}
_EXPERIMENT_KEYS = {"name", "description", "num_train", "batch_size",
                    "steps_per_epoch", "num_params"}
_CONFIG_KEYS = {"methods", "seeds", "epochs", "tune", "reference"}
_METHOD_KEYS = {"label", "status", "reason", "lr", "tuned", "grid", "runs",
                "summary"}
_RUN_KEYS = {f.name for f in dataclasses.fields(Run)} - set(Run._OPTIONAL)
_HISTORY_KEYS = {f.name for f in dataclasses.fields(History)}
_SUMMARY_KEYS = {"num_runs", "num_ok", "num_diverged", "final_train_loss",
                 "final_train_loss_std", "final_test_loss",
                 "final_test_accuracy", "step_time_ms", "step_time_ratio",
                 "train_time_s", "compile_time_s", "epochs_to_target",
                 "time_to_target_s", "reached_target"}


def _need(d: Dict[str, Any], keys, where: str) -> None:
  missing = set(keys) - set(d)
  if missing:
    raise ValueError(f"{where}: missing keys {sorted(missing)}")


def _validate_run(r: Dict[str, Any], where: str) -> None:
  _need(r, _RUN_KEYS, where)
  _need(r["history"], _HISTORY_KEYS, f"{where}.history")
  n = len(r["history"]["step"])
  for k in _HISTORY_KEYS:
    if len(r["history"][k]) != n:
      raise ValueError(f"{where}.history.{k}: length "
                       f"{len(r['history'][k])} != {n}")
  if r["status"] == "ok" and n < 2:
    raise ValueError(f"{where}: fewer than 2 evaluations")
  for field, d in r["diagnostics"].items():
    _need(d, {"labels", "step", "values"}, f"{where}.diagnostics.{field}")
    if any(len(v) != len(d["labels"]) for v in d["values"]):
      raise ValueError(f"{where}.diagnostics.{field}: a row's length differs "
                       "from the labels'")


def validate(results: Dict[str, Any]) -> None:
  """Raises ``ValueError`` if ``results`` (a ``results.json`` dict) does not
  follow the schema."""
  _need(results, _TOP_KEYS, "results")
  if results["schema_version"] != SCHEMA_VERSION:
    raise ValueError(f"schema_version {results['schema_version']}")
  _need(results["experiment"], _EXPERIMENT_KEYS, "experiment")
  _need(results["config"], _CONFIG_KEYS, "config")
  for name, e in results["methods"].items():
    where = f"methods.{name}"
    _need(e, _METHOD_KEYS, where)
    if e["status"] not in STATUSES:
      raise ValueError(f"{where}.status = {e['status']!r}")
    if e["status"] != "ok" and not e["reason"]:
      raise ValueError(f"{where}: status {e['status']} without reason")
    if e["runs"]:
      _need(e["summary"], _SUMMARY_KEYS, f"{where}.summary")
    for i, r in enumerate(e["runs"]):
      _validate_run(r, f"{where}.runs[{i}]")


# --------------------------------------------------------------------------
# Where the numbers were measured
# --------------------------------------------------------------------------


def _git() -> Dict[str, Any]:
  root = pathlib.Path(__file__).resolve().parent.parent
  git = {}
  try:
    git["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
        text=True, timeout=5, check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "optax_layerwise"], cwd=root,
        capture_output=True, text=True, timeout=5, check=True).stdout
    git["library_modified"] = bool(dirty.strip())
  except Exception:  # pylint: disable=broad-except
    pass
  return git


def _cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (Linux; ``platform``'s
  guess elsewhere, often only the architecture)."""
  # pylint: disable-next=import-outside-toplevel
  from optax_layerwise import _hardware
  return (_hardware.cpu_model(_hardware.read_cpuinfo())
          or platform.processor() or platform.machine())


def environment() -> Dict[str, Any]:
  """Versions, git commit, machine and load: the ``environment`` section."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import optax_layerwise as olw  # pylint: disable=import-outside-toplevel
  try:
    load = os.getloadavg()
  except OSError:  # pragma: no cover
    load = None
  return {
      "git": _git(),
      "jax": jax.__version__, "optax": optax.__version__,
      "flax": flax.__version__,
      "optax_layerwise": getattr(olw, "__version__", "?"),
      "python": platform.python_version(), "platform": platform.platform(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "cpu": _cpu_model(),
      # pylint: disable-next=protected-access
      "native_bfloat16": olw._hardware.native_bfloat16(
          jax.default_backend()),
      "cpu_count": os.cpu_count(), "load_average_at_start": load,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
  }
