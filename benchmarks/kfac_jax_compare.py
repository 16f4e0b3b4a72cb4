"""kfac-jax's K-FAC on the Fashion-MNIST autoencoder of
:mod:`benchmarks.fashion_mnist` (same data, model, init, batch, data order).

kfac-jax is NOT a dependency of this project and is never imported by it:
this script runs in a separate virtual environment outside the repository::

    python3 -m venv /work/kfac-venv
    /work/kfac-venv/bin/pip install kfac-jax==0.0.8 flax tqdm
    /work/kfac-venv/bin/pip install jax==0.7.2 jaxlib==0.7.2 flax==0.11.2
    #   (kfac-jax 0.0.8 alone resolves to jax 0.10.2, on which its layer
    #    tagging fails: "too many values to unpack" in get_bind_params; the
    #    second line pins the versions it ran with here, optax 0.2.8)
    cd /path/to/repo        # so that `benchmarks` (data + model) imports
    /work/kfac-venv/bin/python -m benchmarks.kfac_jax_compare [--quick]

Only :mod:`benchmarks.data`, :mod:`benchmarks.models` and
:mod:`benchmarks.timing` are used from the repository (they need jax, flax,
numpy; not ``optax_layerwise``).

What runs: ``kfac_jax.Optimizer`` with adaptive learning rate, momentum and
damping (``use_adaptive_learning_rate=True, use_adaptive_momentum=True,
use_adaptive_damping=True``, ``initial_damping=1.0``, ``l2_reg=0``, the
other options at kfac-jax's defaults, layers found by its automatic
registration), the loss registered with
``kfac_jax.register_sigmoid_cross_entropy_loss`` (sum over pixels, mean over
the batch: the form it assumes). The model is the K-BFGS paper's MNIST
autoencoder with Flax's default (LeCun-normal) init, seed 0 (the same initial
parameters as ``benchmarks.fashion_mnist``), trained on all 60,000 images at
batch 1000 for 10 epochs in the runner's data order (the same permutations; kfac-jax's 10 burn-in batches, curvature only,
come from a separate shuffle), with the full-training-set loss after every epoch. Wall time is the training
steps only (timed to completion, the burn-in included; every step variant
kfac-jax compiles, and Adam's step, are compiled first on throwaway copies, so
compilation and the evaluations are excluded, as in the runner).

Its step time is compared with ``optax.adam`` (the tuned learning rate read
from ``results/fashion_mnist/results.json`` when present, else 1e-3) timed
side by side in interleaved rounds in the same process
(:func:`benchmarks.timing.time_side_by_side`). ``--train-adam`` also trains
that Adam here (its curve and wall time in this process).

Writes ``results/fashion_mnist/kfac_jax.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import data as data_lib
from benchmarks import models
from benchmarks.timing import time_side_by_side, time_to_target

FULL = dict(n_train=60_000, n_test=10_000, epochs=10)
QUICK = dict(n_train=5000, n_test=1000, epochs=2)


def _import_kfac():
  try:
    import kfac_jax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(
        "error: kfac_jax is not installed in this Python. It is not a "
        "dependency of this project: create a separate venv (see this "
        "module's docstring: `python3 -m venv /work/kfac-venv && "
        "/work/kfac-venv/bin/pip install kfac-jax==0.0.8 flax tqdm`) and run "
        "`/work/kfac-venv/bin/python -m benchmarks.kfac_jax_compare` from "
        f"the repository root. ({e})") from e
  return kfac_jax


def _tuned_adam(results_json: pathlib.Path):
  """(lr, epochs_to_target, target loss) of tuned Adam in our results."""
  try:
    res = json.loads(results_json.read_text())
    adam = res["methods"]["adam"]
    return (adam["lr"], adam["summary"].get("epochs_to_target"),
            (res.get("target") or {}).get("train_loss"),
            res["experiment"]["num_train"])
  except (OSError, KeyError, ValueError, TypeError):
    return None, None, None, None


def _finite(x):
  x = float(x)
  return x if math.isfinite(x) else None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="5000 images, 1000 test images, 2 epochs")
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--n-train", type=int, default=None)
  p.add_argument("--n-test", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=1000)
  p.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",")],
                 default=list(models.MNIST_AE_WIDTHS))
  p.add_argument("--init", default="lecun")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--initial-damping", type=float, default=1.0)
  p.add_argument("--l2-reg", type=float, default=0.0)
  p.add_argument("--burnin", type=int, default=10,
                 help="kfac-jax's num_burnin_steps (its default 10): "
                 "curvature-only passes on extra batches before step 1")
  p.add_argument("--adam-lr", type=float, default=None,
                 help="Adam's LR for the side-by-side timing (default: "
                 "tuned Adam's from --results, else 1e-3)")
  p.add_argument("--train-adam", action="store_true",
                 help="also train that Adam here (curve and wall time)")
  p.add_argument("--timing-rounds", type=int, default=5)
  p.add_argument("--timing-calls", type=int, default=5,
                 help="steps per round (5: one inverse/damping update each)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--results", default="results/fashion_mnist/results.json",
                 help="benchmarks.fashion_mnist's JSON (tuned Adam's LR, "
                 "target loss and epochs to it)")
  p.add_argument("--out", default="results/fashion_mnist/kfac_jax.json")
  p.add_argument("--no-progress", action="store_true")
  return p


def _summary(results: Dict[str, Any], side: Dict[str, dict], args,
             our_target, our_adam_epochs, steps_per_epoch) -> Dict[str, Any]:
  """Against tuned Adam's final loss in our results (if the sizes match):
  epochs and seconds to it, adjusted by the side-by-side step times."""
  summary: Dict[str, Any] = {"target": our_target,
                             "target_source": args.results
                             if our_target is not None else None}
  h = results.get("history")
  if h and our_target is not None:
    ep, s = time_to_target(h["epoch"], h["time_s"], h["train_loss"],
                            our_target)
    summary.update(epochs_to_target=ep, time_to_target_s=s)
    if ep is not None and side:
      adj = ep * steps_per_epoch * side["kfac-jax"]["median_ms"] / 1e3
      summary["time_to_target_adj_s"] = adj
      if our_adam_epochs is not None:
        adam_adj = (our_adam_epochs * steps_per_epoch
                    * side["adam"]["median_ms"] / 1e3)
        summary["adam_time_to_target_adj_s"] = adam_adj
        summary["time_to_target_adj_ratio_adam"] = adj / adam_adj
    if "adam" in results:
      a = results["adam"]["history"]
      aep, ats = time_to_target(a["epoch"], a["time_s"], a["train_loss"],
                                 our_target)
      results["adam"].update(epochs_to_target=aep, time_to_target_s=ats)
      if s is not None and ats:
        summary["time_to_target_ratio_adam"] = s / ats
  return summary


def _print_table(results: Dict[str, Any], side: Dict[str, dict], args,
                 epochs: int, adam_lr: float, our_target, n_train: int,
                 batch_size: int) -> None:
  """The table (same columns as benchmarks.fashion_mnist's)."""
  summary = results["summary"]
  cols = [c for c in (1, 2, 3, 5, 10) if c <= epochs] + (
      [epochs] if epochs not in (1, 2, 3, 5, 10) else [])

  def fmt(x, d=4):
    return "-" if x is None else f"{x:.{d}g}"

  print(f"\nkfac-jax vs optax.adam (lr {adam_lr:g}), {n_train} images, "
        f"batch {batch_size}; target = tuned Adam's final loss "
        f"{fmt(our_target, 5)} from {args.results if our_target else '-'}")
  print("  method    " + "".join(f"{'ep' + str(c):>9}" for c in cols)
        + f"{'ep->Adam':>10}{'s->Adam':>9}{'adj s':>9}{'x Adam adj':>11}"
        f"{'ms/step':>9}{'step x Adam':>12}")
  rows = [("kfac-jax", results.get("history"), summary)]
  if "adam" in results:
    rows.append(("adam", results["adam"]["history"], {
        "epochs_to_target": results["adam"].get("epochs_to_target"),
        "time_to_target_s": results["adam"].get("time_to_target_s")}))
  for name, hist, s in rows:
    if not hist:
      print(f"  {name:<10}{results.get('reason')}")
      continue
    by_epoch = dict(zip(hist["epoch"], hist["train_loss"]))
    t = side.get(name, {})
    print(f"  {name:<10}" + "".join(f"{fmt(by_epoch.get(float(c))):>9}"
                                    for c in cols)
          + f"{fmt(s.get('epochs_to_target'), 3):>10}"
          f"{fmt(s.get('time_to_target_s')):>9}"
          f"{fmt(s.get('time_to_target_adj_s')):>9}"
          f"{fmt(s.get('time_to_target_adj_ratio_adam'), 3):>11}"
          f"{fmt(t.get('median_ms')):>9}{fmt(t.get('ratio_median'), 3):>12}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = _parser().parse_args(argv)
  kfac_jax = _import_kfac()
  preset = QUICK if args.quick else FULL
  n_train = args.n_train or preset["n_train"]
  n_test = args.n_test or preset["n_test"]
  epochs = args.epochs or preset["epochs"]
  progress = not args.no_progress

  try:
    ds = data_lib.load_fashion_mnist(args.data_dir, n_train=n_train,
                                     n_test=n_test)
  except data_lib.DataUnavailableError as e:
    print(f"error: {e}\nOn Debian/Ubuntu: `apt-get install "
          "dataset-fashion-mnist`, or pass --data-dir DIR.", file=sys.stderr)
    raise SystemExit(2) from e
  x_train = jnp.asarray(ds.x_train.reshape(len(ds.x_train), -1))
  x_test = jnp.asarray(ds.x_test.reshape(len(ds.x_test), -1))
  widths = tuple(args.widths)
  model = models.Autoencoder(widths, weight_init=args.init)
  batch_size = min(args.batch_size, len(x_train))
  steps_per_epoch = max(1, len(x_train) // batch_size)

  adam_lr, our_adam_epochs, our_target, our_n = _tuned_adam(
      pathlib.Path(args.results))
  if our_n != len(x_train):  # a results file of another size: not ours
    adam_lr = our_adam_epochs = our_target = None
  if args.adam_lr is not None:
    adam_lr = args.adam_lr
  adam_lr = adam_lr or 1e-3

  def per_example(params, x):
    logits = model.apply({"params": params}, x)
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)

  def plain_loss(params, batch):
    return per_example(params, batch["x"]).mean()

  def kfac_loss(params, batch):
    x = batch["x"]
    logits = model.apply({"params": params}, x)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
    return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()

  @jax.jit
  def chunk_sum(params, x):
    return per_example(params, x).sum()

  def full_loss(params, x):
    total = sum(float(chunk_sum(params, x[i:i + 2000]))
                for i in range(0, len(x), 2000))
    return total / len(x)

  params0 = jax.jit(lambda k: model.init(
      k, jnp.zeros((1, widths[0]), jnp.float32))["params"])(
          jax.random.PRNGKey(args.seed))

  def make_kfac():
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(kfac_loss),
        l2_reg=args.l2_reg,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=args.initial_damping,
        num_burnin_steps=args.burnin,
        multi_device=False,
    )

  adam_tx = optax.adam(adam_lr)
  kfac_opt = make_kfac()  # one instance: its compiled step variants are reused

  def fresh():  # kfac-jax donates its inputs: never hand it params0 itself
    return jax.tree_util.tree_map(jnp.copy, params0)

  def kfac_feed(step, batch, extra_batches):
    """Step 0 runs kfac-jax's burn-in on ``extra_batches`` first."""
    if step == 0 and args.burnin > 0:
      return {"data_iterator": iter(list(extra_batches) + [batch])}
    return {"batch": batch}

  @jax.jit
  def adam_step(params, state, batch):
    loss, grads = jax.value_and_grad(plain_loss)(params, batch)
    updates, state = adam_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  take = jax.jit(lambda x, idx: x[idx])

  def train(kind: str) -> Dict[str, Any]:
    """Trains with the runner's data order; returns the history."""
    rng_np = np.random.default_rng(np.random.SeedSequence([args.seed, 1]))
    key = jax.random.PRNGKey(args.seed + 1000)
    perm = rng_np.permutation(len(x_train))
    first = {"x": take(x_train, jnp.asarray(perm[:batch_size]))}
    # Burn-in batches (kfac-jax) from their own shuffle: the training
    # batches stay those of the runner's order.
    extra = np.random.default_rng(args.seed + 77).permutation(len(x_train))
    burn = [{"x": take(x_train, jnp.asarray(np.resize(
        extra[(i * batch_size) % len(x_train):], batch_size)))}
            for i in range(args.burnin)]
    # Compile every step variant first on throwaway copies (kfac-jax
    # compiles separate functions for the burn-in, curvature/inverse/damping
    # update steps; 7 steps reach them all), so training time excludes
    # compilation as the runner's does.
    t0 = time.perf_counter()
    if kind == "kfac-jax":
      opt = kfac_opt
      wp = fresh()
      ws = opt.init(wp, jax.random.PRNGKey(99), first)
      for i in range(7):
        wp, ws, _ = opt.step(wp, ws, jax.random.PRNGKey(100 + i),
                             global_step_int=i, **kfac_feed(i, first, burn))
      jax.block_until_ready(wp)
      del wp, ws
    else:
      jax.block_until_ready(adam_step(fresh(), adam_tx.init(params0), first))
    compile_s = time.perf_counter() - t0
    params = fresh()
    t0 = time.perf_counter()
    if kind == "kfac-jax":
      key, sub = jax.random.split(key)
      state = opt.init(params, sub, first)
    else:
      state = adam_tx.init(params)
    init_s = time.perf_counter() - t0
    hist = {"epoch": [0.0], "step": [0], "time_s": [0.0],
            "train_loss": [_finite(full_loss(params, x_train))],
            "test_loss": [_finite(full_loss(params, x_test))]}
    step_times, stats_log = [], []
    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=epochs * steps_per_epoch, desc=kind, leave=False,
                 file=sys.stderr)
    elapsed = 0.0
    step = 0
    diverged = False
    for epoch in range(epochs):
      if epoch > 0:
        perm = rng_np.permutation(len(x_train))
      for k in range(steps_per_epoch):
        batch = {"x": take(x_train, jnp.asarray(
            perm[k * batch_size:(k + 1) * batch_size]))}
        jax.block_until_ready(batch)
        t = time.perf_counter()
        if kind == "kfac-jax":
          key, sub = jax.random.split(key)
          params, state, stats = opt.step(params, state, sub,
                                          global_step_int=step,
                                          **kfac_feed(step, batch, burn))
          loss = stats["loss"]
        else:
          params, state, loss = adam_step(params, state, batch)
        jax.block_until_ready(params)
        dt = time.perf_counter() - t
        elapsed += dt
        step_times.append(dt)
        step += 1
        loss = float(loss)
        if kind == "kfac-jax" and (step % 50 == 0 or step <= 3):
          stats_log.append({"step": step, **{
              k: _finite(v) for k, v in stats.items()
              if np.ndim(v) == 0 and k in ("loss", "learning_rate",
                                           "momentum", "damping", "rho",
                                           "quad_model_change")}})
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{loss:.4g}")
        if not math.isfinite(loss):
          diverged = True
          break
      tr = full_loss(params, x_train)
      hist["epoch"].append(step / steps_per_epoch)
      hist["step"].append(step)
      hist["time_s"].append(elapsed)
      hist["train_loss"].append(_finite(tr))
      hist["test_loss"].append(_finite(full_loss(params, x_test)))
      if kind == "kfac-jax":
        results.update(history=hist, status="running (partial)",
                       train_time_s=elapsed, num_steps=step)
        save()
      print(f"  {kind} epoch {epoch + 1}: full train loss {tr:.4f} "
            f"(training {elapsed:.1f} s)", file=sys.stderr, flush=True)
      if diverged or not math.isfinite(tr):
        diverged = True
        break
    if bar is not None:
      bar.close()
    ms = np.asarray(step_times) * 1e3
    return {"history": hist, "diverged": diverged, "num_steps": step,
            "train_time_s": elapsed, "compile_warmup_s": compile_s,
            "init_s": init_s,
            "step_time_ms": ({"median": float(np.median(ms)),
                              "p10": float(np.percentile(ms, 10))}
                             if len(ms) else None),
            "stats": stats_log}

  results: Dict[str, Any] = {
      "config": dict(n_train=int(len(x_train)), n_test=int(len(x_test)),
                     batch_size=batch_size, epochs=epochs,
                     steps_per_epoch=steps_per_epoch, widths=list(widths),
                     init=args.init, seed=args.seed,
                     optimizer=dict(
                         use_adaptive_learning_rate=True,
                         use_adaptive_momentum=True,
                         use_adaptive_damping=True,
                         initial_damping=args.initial_damping,
                         l2_reg=args.l2_reg, multi_device=False,
                         loss_registration="register_sigmoid_cross_entropy_"
                         "loss(logits, x), weight 1",
                         layer_registration="automatic",
                         num_burnin_steps=args.burnin,
                         burnin_note="burn-in batches from a separate "
                         "shuffle; the burn-in runs inside the first step "
                         "and counts in the wall time; compilation does not "
                         "(every step variant is compiled first on "
                         "throwaway copies)"),
                     adam_lr=adam_lr, data=ds.name),
      "environment": {
          "jax": jax.__version__,
          "kfac_jax": getattr(kfac_jax, "__version__", "?"),
          "optax": optax.__version__,
          "flax": __import__("flax").__version__,
          "python": platform.python_version(),
          "platform": platform.platform(), "cpu_count": os.cpu_count(),
          "load_average_at_start": list(os.getloadavg()),
          "date": datetime.datetime.now().isoformat(timespec="seconds")},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save():  # after the timing and after every epoch: partial runs count
    out.write_text(json.dumps(results, indent=1, default=float))

  results.update(status="running", reason=None, history=None)
  print(f"kfac-jax {results['environment']['kfac_jax']} (jax "
        f"{jax.__version__}) on {ds.name}, {len(x_train)} images, batch "
        f"{batch_size}, {epochs} epochs", flush=True)
  # Side by side: one kfac-jax step and one Adam step, interleaved.
  side = {}
  if args.timing_rounds > 0:
    x0 = {"x": x_train[:batch_size]}
    opt = kfac_opt
    key = jax.random.PRNGKey(7)
    p0 = fresh()
    kbox = [p0, opt.init(p0, key, x0), 0]
    abox = [fresh(), adam_tx.init(params0)]

    def kfac_call():
      k = jax.random.fold_in(key, kbox[2])
      p, s, _ = opt.step(kbox[0], kbox[1], k, global_step_int=kbox[2],
                         **kfac_feed(kbox[2], x0, [x0] * args.burnin))
      kbox[:] = [p, s, kbox[2] + 1]
      return p

    def adam_call():
      p, s, loss = adam_step(abox[0], abox[1], x0)
      abox[:] = [p, s]
      return loss

    for _ in range(7):  # compile every kfac-jax step variant (burn-in,
      jax.block_until_ready(kfac_call())  # curvature/inverse/damping updates)
      jax.block_until_ready(adam_call())
    side = time_side_by_side({"adam": adam_call, "kfac-jax": kfac_call},
                             baseline="adam", rounds=args.timing_rounds,
                             calls_per_round=args.timing_calls,
                             progress=progress)
  results["side_by_side"] = side
  save()
  try:
    run = train("kfac-jax")
    results.update(run, status="ok", reason=None)
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    results.update(status="failed", reason=f"{type(e).__name__}: {e}"[:2000],
                   history=None)
  if args.train_adam:
    results["adam"] = train("adam")


  results["summary"] = _summary(results, side, args, our_target,
                                our_adam_epochs, steps_per_epoch)

  save()

  _print_table(results, side, args, epochs, adam_lr, our_target,
               len(x_train), batch_size)
  print(f"\nWrote {out}")
  return results


if __name__ == "__main__":
  main()
