"""Smoke and unit tests of the benchmarks (data, models, runner, CLI).

Every experiment runs for a handful of steps on tiny data and tiny widths;
the whole module should take well under a minute on 2 CPU cores.
"""

import gzip
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import data
from benchmarks import diagnostics
from benchmarks import experiments
from benchmarks import loop
from benchmarks import main as main_lib
from benchmarks import methods as methods_lib
from benchmarks import models
from benchmarks import report as report_lib
from benchmarks import results as results_lib
from benchmarks import run as run_lib
from benchmarks import runner
from benchmarks import summary as summary_lib
from benchmarks import timing

# Tiny versions of every experiment (same code paths, small sizes).
TINY = {
    "curves-ae": dict(n_train=48, n_test=16, batch_size=16,
                      widths=(784, 12, 3, 12, 784)),
    "mnist-ae": dict(dataset="curves", n_train=48, n_test=16, batch_size=16,
                     widths=(784, 10, 4, 10, 784)),
    "digits-cnn": dict(n_train=64, batch_size=32, channels=(4,), hidden=8),
    "gcn": dict(num_nodes=60, num_classes=3, num_features=8, hidden=8),
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def test_curves_deterministic_prefix_and_range():
  a = data.make_curves(40, 8, seed=3)
  b = data.make_curves(40, 8, seed=3)
  c = data.make_curves(40, 8, seed=4)
  big = data.make_curves(60, 8, seed=3)
  assert a.x_train.shape == (40, 784) and a.x_test.shape == (8, 784)
  assert a.x_train.dtype == np.float32
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  assert not np.array_equal(a.x_train, c.x_train)
  assert not np.array_equal(a.x_train[:8], a.x_test)  # separate streams
  np.testing.assert_array_equal(big.x_train[:40], a.x_train)  # prefix
  for x in (a.x_train, a.x_test):
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Every image has a stroke, fully-on pixels and anti-aliased edges.
    assert np.all(x.max(axis=1) == 1.0)
    assert np.all(((x > 0) & (x < 1)).sum(axis=1) > 0)
    assert 0.01 < x.mean() < 0.3


def test_curves_disk_cache(tmp_path):
  a = data.make_curves(12, 4, seed=11, cache_dir=str(tmp_path))
  files = list(tmp_path.glob("curves-*.npz"))
  assert len(files) == 1
  # A different parameter gets a different cache file.
  data.make_curves(12, 5, seed=11, cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob("curves-*.npz"))) == 2
  data._curves_cached.cache_clear()  # force the disk path
  b = data.make_curves(12, 4, seed=11, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(a.x_train, b.x_train)


def test_render_curves_straight_line():
  # A horizontal line through pixel row 5, half-width 0.5: row 5 fully on,
  # rows 4 and 6 off (distance 1 >= w + 0.5).
  pts = np.array([[[2.0, 5.0], [20.0, 5.0]]])
  img = data.render_curves(pts, np.array([0.5]), image_size=28)
  img = img.reshape(28, 28)
  np.testing.assert_allclose(img[5, 2:21], 1.0)
  assert img[4].max() == 0.0 and img[6].max() == 0.0
  assert img[5, 0] == 0.0 and img[5, 25] == 0.0


@pytest.mark.parametrize("dtype,suffix", [(np.uint8, ".gz"), (np.int32, ""),
                                          (np.float32, ".gz"),
                                          (np.int16, "")])
def test_idx_round_trip(tmp_path, dtype, suffix):
  rng = np.random.default_rng(0)
  x = (rng.random((5, 3, 4)) * 100).astype(dtype)
  path = tmp_path / f"x-idx3-ubyte{suffix}"
  data.write_idx(path, x)
  y = data.read_idx(path)
  assert y.dtype == np.dtype(dtype) and y.shape == x.shape
  np.testing.assert_array_equal(x, y)


def test_idx_header_is_mnist_format(tmp_path):
  path = tmp_path / "t"
  data.write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
  raw = path.read_bytes()
  assert raw[:4] == bytes([0, 0, 0x08, 2])
  assert raw[4:12] == bytes([0, 0, 0, 2, 0, 0, 0, 3])
  assert raw[12:] == bytes(range(6))
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
  with pytest.raises(ValueError, match="magic"):
    data.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(raw[:-2])
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(tmp_path / "short")


def _write_fake_mnist(directory: pathlib.Path, n_train=20, n_test=8,
                      gz=True):
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  ext = ".gz" if gz else ""
  xs = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, (n,), dtype=np.uint8)
    data.write_idx(directory / f"{split}-images-idx3-ubyte{ext}", x)
    data.write_idx(directory / f"{split}-labels-idx1-ubyte{ext}", y)
    xs[split] = (x, y)
  return xs


def test_fashion_mnist_from_idx_dir(tmp_path):
  raw = _write_fake_mnist(tmp_path / "fm")
  ds = data.load_fashion_mnist(str(tmp_path / "fm"), n_train=12)
  assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (8, 784)
  np.testing.assert_allclose(ds.x_train * 255.0,
                             raw["train"][0][:12].reshape(12, -1), atol=1e-3)
  np.testing.assert_array_equal(ds.y_test, raw["t10k"][1])
  assert ds.y_train.dtype == np.int32
  img = data.load_idx_dataset(tmp_path / "fm", flatten=False)
  assert img.x_train.shape == (20, 28, 28, 1)


def test_fashion_mnist_missing_is_clear(tmp_path):
  with pytest.raises(data.DataUnavailableError) as e:
    data.load_fashion_mnist(str(tmp_path / "nowhere"))
  msg = str(e.value)
  assert "--data-dir" in msg and "dataset-fashion-mnist" in msg
  # mnist-ae with dataset="auto" falls back to CURVES instead of failing.
  exp = experiments.build_experiment(
      "mnist-ae", dataset="auto", data_dir=str(tmp_path / "nowhere"),
      n_train=8, n_test=4, widths=(784, 4, 784))
  assert "CURVES" in exp.description


def test_digits_and_csbm():
  d = data.load_digits(n_train=100)
  assert d.x_train.shape == (100, 8, 8, 1) and d.x_test.shape[1:] == (8, 8, 1)
  assert d.x_train.max() <= 1.0 and set(np.unique(d.y_test)) <= set(range(10))
  g = data.make_csbm(120, 3, 6, average_degree=8, homophily=0.8, seed=2)
  g2 = data.make_csbm(120, 3, 6, average_degree=8, homophily=0.8, seed=2)
  np.testing.assert_array_equal(g.adjacency, g2.adjacency)
  np.testing.assert_allclose(g.adjacency, g.adjacency.T)
  assert np.all(g.train_mask + g.test_mask == 1.0)
  # Homophily: most edges join same-class nodes.
  a = (g.adjacency > 0) & ~np.eye(120, dtype=bool)
  same = g.labels[:, None] == g.labels[None, :]
  assert (a & same).sum() / a.sum() > 0.6
  # The spectrum of the normalised adjacency lies in [-1, 1].
  assert np.abs(np.linalg.eigvalsh(g.adjacency)).max() <= 1.0 + 1e-4


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def test_autoencoder_architectures():
  for widths in (models.CURVES_AE_WIDTHS, models.MNIST_AE_WIDTHS):
    m = models.Autoencoder(widths)
    params = jax.eval_shape(m.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 784)))["params"]
    names = sorted(params)
    assert len(names) == len(widths) - 1
    assert [params[n]["kernel"].shape for n in names] == list(
        zip(widths[:-1], widths[1:]))
  # The authors' (PyTorch) init: kernel and bias ~ U(+-1/sqrt(fan_in)).
  params = models.Autoencoder((784, 8, 2, 8, 784)).init(
      jax.random.PRNGKey(3), jnp.zeros((1, 784)))["params"]
  for name, fan_in in (("dense_01", 784), ("dense_02", 8), ("dense_04", 8)):
    for leaf in params[name].values():
      bound = float(jnp.abs(leaf).max()) * fan_in ** 0.5
      assert 0.5 < bound <= 1.0, (name, bound)  # uniform fills the range
  # Linear code layer: negative code values survive (no ReLU there); the
  # zero-bias Flax init makes their sign symmetric, so some are negative.
  m = models.Autoencoder((784, 8, 2, 8, 784), weight_init="lecun")
  params = m.init(jax.random.PRNGKey(1), jnp.zeros((1, 784)))["params"]
  x = jax.random.uniform(jax.random.PRNGKey(2), (64, 784))
  _, inter = m.apply({"params": params}, x, capture_intermediates=True)
  code = inter["intermediates"]["dense_02"]["__call__"][0]
  hidden = inter["intermediates"]["dense_01"]["__call__"][0]
  assert float(code.min()) < 0.0  # pre-activation of a linear layer
  out = m.apply({"params": params}, x)
  assert out.shape == (64, 784) and float(out.min()) < 0.0  # logits
  assert hidden.shape == (64, 8)


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------


def _with_fake_methods():
  """The registry plus methods that fail to build, build something else, or
  fail to run."""

  def broken_build(lr):
    raise TypeError("unexpected keyword argument 'foo'")

  def failing_tx(lr):
    def update(updates, state, params=None, **extra):
      raise RuntimeError("boom at trace time")
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  fakes = [methods_lib.Method("bad-build", "Bad", broken_build, 0.1),
           methods_lib.Method("not-a-tx", "Not a tx", lambda lr: "sgd"),
           methods_lib.Method("bad-run", "Bad run", failing_tx, 0.1)]
  return dict(methods_lib.registry(), **{m.name: m for m in fakes})


def test_resolve_method_and_unavailable():
  registry = _with_fake_methods()
  tx, why = methods_lib.resolve("no-such-method", methods=registry)
  assert tx is None and "unknown" in why
  tx, why = methods_lib.resolve("bad-build", methods=registry)
  assert tx is None and "unexpected keyword" in why
  tx, why = methods_lib.resolve("not-a-tx", methods=registry)
  assert tx is None and "not an optax" in why
  tx, why = methods_lib.resolve("adam", 1e-3)
  assert why is None and isinstance(tx, optax.GradientTransformationExtraArgs)
  # Every registered method builds at its default learning rate.
  for name in methods_lib.METHODS:
    tx, why = methods_lib.resolve(name)
    assert why is None and tx is not None, (name, why)
  assert methods_lib.registry(kbfgs_memory=7)["kbfgs-l"].make(0.1) is not None


def test_time_to_target_interpolates():
  hist = ([0.0, 1.0, 2.0], [0.0, 10.0, 20.0], [10.0, 6.0, 2.0])
  e, t = timing.time_to_target(*hist, 4.0)
  assert e == pytest.approx(1.5) and t == pytest.approx(15.0)
  assert timing.time_to_target(*hist, 1.0) == (None, None)
  assert timing.time_to_target(*hist, 20.0) == (0.0, 0.0)


def test_step_time_uses_grid_runs():
  run = lambda lr, seed, ms: results_lib.Run(
      "m", lr, seed, step_time_ms={"median": ms})
  point = lambda lr, ms: results_lib.GridPoint(lr, "ok", False, 1.0, ms, None)
  entry = results_lib.MethodResult(
      "M", runs=[run(0.1, 0, 10.0), run(0.1, 1, 12.0)],
      grid=[point(0.01, 30.0), point(0.1, 10.0),  # = runs[0]
            point(1.0, 11.0)])
  assert summary_lib.step_ms(entry) == pytest.approx(11.5)  # of 10,12,30,11
  assert summary_lib.step_ms(results_lib.MethodResult("M")) is None


def test_find_diagnostics_layerwise_sgd():
  import optax_layerwise as olw
  params = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(2)}}
  state = olw.layerwise_sgd().init(params)
  found = diagnostics.find_diagnostics(state)
  assert found["step_sizes"].shape == (2,)
  assert diagnostics.layer_labels(params, 2) == ["a", "b"]
  assert diagnostics.layer_labels(params, 3) == ["layer 0", "layer 1",
                                                 "layer 2"]


def test_validate_rejects_broken_results():
  run = results_lib.Run("adam", 1e-3, 0)
  run.history.append(0, 0, 0.0, 2.0)
  run.history.append(1, 4, 1.0, float("nan"))
  entry = results_lib.MethodResult("Adam", runs=[run])
  result = results_lib.BenchmarkResult(
      experiment=dict(name="e", description="d", num_train=1, batch_size=1,
                      steps_per_epoch=4, num_params=3),
      config=dict(methods=["adam"], seeds=[0], epochs=1, tune=[],
                  reference="adam"), environment={},
      methods={"adam": entry})
  summary_lib.summarise(result)
  good = result.to_json()
  assert good["methods"]["adam"]["runs"][0]["history"]["train_loss"] == [
      2.0, None]  # non-finite -> null
  json.dumps(good, allow_nan=False)
  results_lib.validate(good)
  back = results_lib.BenchmarkResult.from_json(good)
  assert back.to_json() == good
  assert back.methods["adam"].runs[0].history.step == [0, 4]
  for path, value in ((("methods", "adam", "runs", 0, "history", "step"),
                       [0]),
                      (("methods", "adam", "status"), "weird"),
                      (("methods", "adam", "runs", 0, "history"), {}),
                      (("schema_version",), 99)):
    bad = json.loads(json.dumps(good))
    d = bad
    for k in path[:-1]:
      d = d[k]
    d[path[-1]] = value
    with pytest.raises(ValueError):
      results_lib.validate(bad)


def test_loop_stops_on_divergence_and_scans():
  loss_fn = lambda p, b: jnp.sum((p * b) ** 2)
  step = loop.make_step(loss_fn, optax.sgd(0.1))
  batches = loop.shuffled_batches(jnp.arange(1.0, 9.0), 2,
                                  np.random.default_rng(0))
  evals = []
  params, _, log = loop.train(
      step, jnp.ones(()), optax.sgd(0.1).init(jnp.ones(())), batches, 8,
      eval_every=4, on_eval=lambda k, p, s, t: evals.append(k))
  assert evals == [4, 8] and len(log.losses) == len(log.seconds) == 8
  assert not log.diverged and np.isfinite(float(params))
  # A large step diverges: the loop stops at the first non-finite loss.
  step = loop.make_step(loss_fn, optax.sgd(1e3))
  _, _, log = loop.train(step, jnp.ones(()), optax.sgd(1e3).init(
      jnp.ones(())), iter(lambda: jnp.ones(()), None), 50)
  assert log.diverged and len(log.seconds) < 50
  assert not np.isfinite(log.losses[-1])
  # A scanned step: one call, several steps, the same trajectory.
  scan = loop.make_step(loss_fn, optax.sgd(0.1), scan=True)
  xs = jnp.arange(1.0, 5.0)
  p1, _, losses = scan(jnp.ones(()), optax.sgd(0.1).init(jnp.ones(())), xs)
  p2, s2 = jnp.ones(()), optax.sgd(0.1).init(jnp.ones(()))
  plain = loop.make_step(loss_fn, optax.sgd(0.1))
  for x in xs:
    p2, s2, _ = plain(p2, s2, x)
  assert losses.shape == (4,) and float(p1) == pytest.approx(float(p2))


def _check_outputs(out: pathlib.Path, name: str, plots=("loss_vs_epoch",
                                                        "loss_vs_time")):
  on_disk = json.loads((out / "results.json").read_text())
  results_lib.validate(on_disk)
  assert results_lib.BenchmarkResult.from_json(on_disk).to_json() == on_disk
  assert on_disk["experiment"]["name"] == name
  for kind in plots:
    p = pathlib.Path(on_disk["plots"][kind])
    assert p.exists() and p.stat().st_size > 1000, kind
  return on_disk


@pytest.mark.parametrize("name", sorted(TINY))
def test_smoke_every_experiment(name, tmp_path):
  exp = experiments.build_experiment(name, **TINY[name])
  out = tmp_path / name
  runner.run_benchmark(exp, ["adam", "layerwise-sgd"], epochs=2, max_steps=3,
                       out_dir=str(out), progress=False, verbose=False)
  res = _check_outputs(out, name, ("loss_vs_epoch", "loss_vs_time",
                                   "step_sizes"))
  ms = res["methods"]
  for m in ("adam", "layerwise-sgd"):
    run = ms[m]["runs"][0]
    assert ms[m]["status"] == "ok", ms[m]["reason"]
    assert run["num_steps"] == min(3, 2 * exp.steps_per_epoch)
    assert run["step_time_ms"]["median"] > 0
    assert run["history"]["step"][-1] == run["num_steps"]
  assert all(math.isfinite(x) for x in
             ms["adam"]["runs"][0]["history"]["train_loss"])
  # Same seed => same initial params and train loss for every method.
  starts = [ms[m]["runs"][0]["history"]["train_loss"][0]
            for m in ("adam", "layerwise-sgd")]
  assert starts[0] == pytest.approx(starts[1], rel=1e-5)
  diag = ms["layerwise-sgd"]["runs"][0]["diagnostics"]["step_sizes"]
  n_layers = len(jax.tree_util.tree_leaves(
      exp.init_fn(jax.random.PRNGKey(0)))) // 2
  assert len(diag["labels"]) == n_layers and len(diag["values"]) >= 2
  assert ms["adam"]["summary"]["step_time_ratio"] == pytest.approx(1.0)
  # Round-robin timing after training: reference ratio exactly 1.
  assert ms["adam"]["summary"]["step_time_ratio_interleaved"] == 1.0
  assert ms["layerwise-sgd"]["summary"]["interleaved_step_time_ms"] > 0


def test_tuning_seeds_and_unavailable_methods(tmp_path):
  registry = _with_fake_methods()
  exp = experiments.build_experiment("curves-ae", **TINY["curves-ae"])
  out = tmp_path / "tune"
  runner.run_benchmark(
      exp, ["adam", "sgd", "bad-build", "not-a-tx", "bad-run", "nope"],
      registry=registry, seeds=[0, 1], epochs=2,
      tune=["adam"], lr_grids={"adam": [1e-3, 3e-2]}, max_steps=4,
      timing_rounds=0, out_dir=str(out), progress=False, verbose=False)
  res = _check_outputs(out, "curves-ae")
  ms = res["methods"]
  assert ms["nope"]["status"] == "unavailable"
  assert ms["not-a-tx"]["status"] == "unavailable"
  assert ms["bad-build"]["status"] == "unavailable"
  assert ms["bad-run"]["status"] == "failed"
  assert "boom" in ms["bad-run"]["reason"]
  adam = ms["adam"]
  assert adam["tuned"] and len(adam["grid"]) == 2
  assert len(adam["runs"]) == 2 and [r["seed"] for r in adam["runs"]] == [0, 1]
  chosen = min(adam["grid"], key=lambda g: g["final_train_loss"])
  assert chosen["lr"] == adam["lr"] == adam["runs"][1]["lr"]
  assert not ms["sgd"]["tuned"] and ms["sgd"]["lr"] == 1e-2
  assert res["target"]["train_loss"] == pytest.approx(
      adam["summary"]["final_train_loss"])
  assert adam["summary"]["reached_target"].endswith("/2")
  assert adam["summary"]["step_time_ratio_interleaved"] is None  # rounds=0
  table = report_lib.format_table(res)
  assert "not-a-tx" in table and "unavailable" in table and "LR grids" in table
  lines = table.splitlines()
  head = next(i for i, l in enumerate(lines) if l.split()[:2] == ["method",
                                                                  "lr"])
  rows = [l.split()[0] for l in lines[head + 2:head + 8]]
  assert rows == ["adam", "sgd", "bad-build", "not-a-tx", "bad-run", "nope"]


def test_cli_run_and_main(tmp_path, capsys):
  out = tmp_path / "gcn"
  run_lib.main(["--experiment", "gcn", "--num-nodes", "40", "--hidden", "4",
                "--methods", "adam,rmsprop,nope", "--tune", "none",
                "--lr", "adam=0.01", "--epochs", "3", "--out", str(out),
                "--no-progress"])
  res = json.loads((out / "results.json").read_text())
  results_lib.validate(res)
  assert res["methods"]["adam"]["lr"] == 0.01
  assert res["methods"]["nope"]["status"] == "unavailable"
  assert res["methods"]["adam"]["runs"][0]["num_steps"] == 3  # full batch
  # The markdown report of that file, with the plots copied for the docs.
  capsys.readouterr()
  report_lib.main([str(out / "results.json"), "--images",
                   str(tmp_path / "img"), "--prefix", "g"])
  md = capsys.readouterr().out
  assert "| Adam (`adam`) | 0.01 |" in md and "**unavailable**" in md
  assert (tmp_path / "img" / "g_loss_vs_epoch.png").exists()
  # The main job with tiny overrides; its defaults otherwise stand.
  out = tmp_path / "main"
  res = main_lib.main(["--n-train", "32", "--n-test", "8", "--batch-size",
                       "16", "--epochs", "1", "--widths", "784,6,784",
                       "--methods", "adam,sgd", "--lr-grid", "adam=1e-3",
                       "--lr-grid", "sgd=1e-3", "--out", str(out),
                       "--cache-dir", str(tmp_path / "cache"),
                       "--no-progress"])
  assert res.config["tune"] == ["adam", "adamw", "sgd"]
  assert res.config["lr_grids"] == {"adam": [1e-3], "sgd": [1e-3]}
  assert (out / "loss_vs_epoch.png").exists()
  printed = capsys.readouterr().out
  assert "ep->target" in printed and str(out / "loss_vs_epoch.png") in printed


def test_kbfgs_cost_script(tmp_path):
  """The K-BFGS overhead script runs at toy size and writes the JSON the docs
  quote (the pair='tangent' variant left out: one compilation less)."""
  from benchmarks import kbfgs_overhead
  out = tmp_path / "overhead.json"
  kbfgs_overhead.main(["--small", "--batch", "64", "--rounds", "2",
                       "--calls", "1", "--memory-size", "4", "--skip-tangent",
                       "--out", str(out)])
  res = json.loads(out.read_text())
  assert set(res["methods"]) == {"adam", "kbfgs", "kbfgs_l4"}
  assert res["methods"]["adam"]["time_ratio_vs_adam"] == 1.0
  for m in res["methods"].values():
    assert m["median_step_ms"] > 0 and np.isfinite(m["final_loss"])
    assert m["gflops_per_step"] > 0
  # K-BFGS keeps Kronecker factors: more state than Adam's two moments.
  assert res["methods"]["kbfgs"]["state_ratio_vs_adam"] > 1.0
  # Training went on through the timing: below the warm-up's last loss.
  assert res["methods"]["kbfgs"]["final_loss"] < 544.0


def test_kbfgs_init_script(tmp_path):
  """The K-BFGS initialisation script at toy size, two of its six
  configurations (one compilation each)."""
  from benchmarks import kbfgs_init
  out = tmp_path / "init.json"
  kbfgs_init.main(["--small", "--steps", "4", "--n-train", "200",
                   "--batch", "100", "--configs", "torch/0.1,lecun/None",
                   "--out", str(out)])
  runs = json.loads(out.read_text())["runs"]
  assert set(runs) == {"torch/0.1", "lecun/None"}
  for r in runs.values():
    assert len(r["losses"]) == 4 and np.all(np.isfinite(r["losses"]))
  assert runs["torch/0.1"]["losses"][-1] < runs["torch/0.1"]["losses"][0]


def test_rosenbrock_starts_script(tmp_path):
  """benchmarks.rosenbrock_starts at toy size: the usual start's first loss
  is Rosenbrock(-1.2, 1) = 24.2 (by hand), the counts agree with the
  minimum losses, and the PNG is written."""
  import optax_layerwise as olw
  from benchmarks import rosenbrock_starts
  results = rosenbrock_starts.main(["--starts", "3", "--steps", "400",
                                    "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "rosenbrock_starts.json").read_text())
  assert saved["starts"][0] == [-1.2000000476837158, 1.0]
  assert (tmp_path / "rosenbrock_starts.png").stat().st_size > 0
  losses = rosenbrock_starts.losses_from_starts(
      olw.kbfgs(), np.asarray(saved["starts"], np.float32), 2)
  np.testing.assert_allclose(losses[:, 0], [
      (1 - a) ** 2 + 100 * (b - a * a) ** 2 for a, b in saved["starts"]],
                             rtol=1e-6)
  for name, r in results.items():
    assert r["finite"], name
    mins = np.asarray(r["min_losses"])
    assert mins.max() < 24.2
    for target in rosenbrock_starts.TARGETS:
      assert r[f"{target:g}"]["reached"] == int(np.sum(mins < target))


def test_fashion_mnist_quick_smoke(tmp_path, capsys):
  """benchmarks.fashion_mnist --quick on a tiny IDX directory written here
  (no Debian package needed), tiny widths; then --reuse of a cached run, and
  the clear error when the data are absent."""
  from benchmarks import fashion_mnist
  _write_fake_mnist(tmp_path / "fm", n_train=40, n_test=8)
  out = tmp_path / "out"
  common = ["--quick", "--data-dir", str(tmp_path / "fm"), "--n-train", "40",
            "--n-test", "8", "--batch-size", "20", "--widths", "784,8,3,8,784",
            "--adam-grid", "1e-3,3e-3", "--timing-rounds", "1",
            "--timing-calls", "1", "--out", str(out), "--no-progress"]
  res = fashion_mnist.main(common + ["--methods", "adam,kbfgs"])
  saved = json.loads((out / "results.json").read_text())
  runner.validate_results(saved)
  assert saved["experiment"]["weight_init"] == "lecun"
  assert saved["config"]["epochs"] == 2  # --quick
  ms = saved["methods"]
  assert ms["adam"]["tuned"] and ms["adam"]["lr"] in (1e-3, 3e-3)
  assert [g["lr"] for g in ms["adam"]["grid"]] == [1e-3, 3e-3]
  assert ms["kbfgs"]["lr"] is None  # olw.kbfgs() at its defaults
  for name in ("adam", "kbfgs"):
    assert ms[name]["status"] == "ok", ms[name]["reason"]
    assert ms[name]["runs"][0]["num_steps"] == 4  # 2 epochs x 2 steps
  side = saved["fashion_mnist"]["side_by_side"]
  assert set(side) == {"adam", "kbfgs", "adamw"}  # AdamW: timed only
  assert side["adam"]["ratio_median"] == 1.0
  rows = {r["method"]: r for r in saved["fashion_mnist"]["table"]}
  assert rows["adamw"]["status"] == "timed only"
  assert rows["kbfgs"]["step_ratio_adamw"] > 0
  assert set(rows["kbfgs"]["loss_at_epoch"]) == {"1", "2"}
  for kind in ("loss_vs_epoch", "loss_vs_time"):
    assert (out / f"{kind}.png").exists()
  # Finished runs are cached; their per-epoch progress files are gone.
  assert len(list((out / "runs").glob("*.json"))) == 2
  assert not list((out / "runs").glob("*.partial.json"))
  printed = capsys.readouterr().out
  assert "ep1" in printed and "step x AdamW" in printed
  assert res.target["method"] == "adam"

  # Adam's run is cached and reused (not retrained) by a later process.
  res2 = fashion_mnist.main(common + ["--methods", "adam", "--reuse", "adam",
                                      "--timing-rounds", "0", "--no-plots"])
  assert res2.extra["fashion_mnist"]["reused"] == ["adam"]
  assert (res2.methods["adam"].runs[0].history.to_json()
          == ms["adam"]["runs"][0]["history"])
  assert "cached" in capsys.readouterr().out

  with pytest.raises(SystemExit) as e:
    fashion_mnist.main(["--quick", "--data-dir", str(tmp_path / "none"),
                        "--no-progress", "--out", str(out)])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err


def test_kfac_jax_compare_without_kfac_jax(capsys):
  """kfac-jax is not a dependency: without it the comparison script stops
  with instructions for its separate environment."""
  import importlib.util
  if importlib.util.find_spec("kfac_jax") is not None:
    pytest.skip("kfac_jax is installed here; the script would run")
  from benchmarks import kfac_jax_compare
  with pytest.raises(SystemExit) as e:
    kfac_jax_compare.main(["--quick"])
  assert "not a dependency" in str(e.value) and "venv" in str(e.value)


def test_kbfgs_seeds_summary_and_script(tmp_path):
  """The seeds benchmark's per-run summary against a hand computation (the
  target crossed between the evaluations at epochs 1 and 2: 1 + (230 -
  221.5) / (230 - 210); the early peak 150 / 100); a loss above the
  initial one or not finite counts as diverged; then the script end to end
  at toy size."""
  from benchmarks import kbfgs_seeds, results as results_lib
  run = results_lib.Run(method="kbfgs", lr=None, seed=3)
  for ep, loss in enumerate((500.0, 230.0, 210.0)):
    run.history.append(ep, 60 * ep, float(ep), loss)
  run.batch_loss = {"step": [0, 1, 2], "loss": [100.0, 150.0, 90.0]}
  row = kbfgs_seeds.run_summary(run, 221.5)
  assert row["epochs_to_target"] == pytest.approx(1 + 8.5 / 20)
  assert row["early_peak_ratio"] == pytest.approx(1.5)
  assert not row["diverged"] and row["seed"] == 3
  run.history.train_loss[-1] = 600.0  # finite, above the initial 500
  row = kbfgs_seeds.run_summary(run, 221.5)
  assert row["diverged"] and row["epochs_to_target"] is None
  run.history.train_loss[-1] = float("nan")
  assert kbfgs_seeds.run_summary(run, 221.5)["diverged"]
  assert kbfgs_seeds.parse_seeds("0-2,7") == [0, 1, 2, 7]

  _write_fake_mnist(tmp_path / "fm", n_train=40, n_test=8)
  out = tmp_path / "seeds"
  res = kbfgs_seeds.main([
      "--data-dir", str(tmp_path / "fm"), "--n-train", "40", "--n-test", "8",
      "--batch-size", "20", "--widths", "784,8,3,8,784", "--epochs", "1",
      "--seeds", "0", "--inits", "lecun", "--out", str(out),
      "--evals-per-epoch", "2", "--h-g-init", "identity", "--memory-size",
      "2", "--no-progress"])
  saved = json.loads((out / "results.json").read_text())
  assert [r["seed"] for r in saved["rows"]] == [0]
  assert saved["summary"]["runs"] == 1 == len(res["rows"])
  # 2 steps an epoch, evaluated after each: the table keeps the epoch ends.
  assert all(r["evaluated"]["epoch"] == [0.0, 0.5, 1.0]
             and len(r["train_loss"]) == 2 for r in saved["rows"])
  assert saved["config"]["h_g_init"] == "identity"
  assert saved["config"]["memory_size"] == 2
  assert (out / "loss_vs_step.png").exists()


def test_fashion_mnist_cache_key_follows_kbfgs_defaults(tmp_path,
                                                        monkeypatch):
  """A cached K-BFGS run is keyed by the library's defaults, module
  constants included (a changed automatic row stride must not reuse a run
  of the old one); Adam's key does not depend on them."""
  from benchmarks import fashion_mnist
  import optax_layerwise as olw
  cache = fashion_mnist._Cache(tmp_path, dict(seed=0), {"adam": (1e-3,)})
  before = {n: cache.path(n) for n in ("adam", "kbfgs", "kbfgs-l")}
  monkeypatch.setattr(olw._kbfgs, "AUTO_STEP_SIZE_ROW_STRIDE",
                      olw._kbfgs.AUTO_STEP_SIZE_ROW_STRIDE + 1)
  assert cache.path("adam") == before["adam"]
  for name in ("kbfgs", "kbfgs-l"):
    assert cache.path(name) != before[name]
