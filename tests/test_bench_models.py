"""Fast checks of benchmarks.kbfgs_models (no training): the stdlib corpus,
and K-BFGS's state memory formula of docs/kbfgs.md ("State memory per kind")
against the bytes of ``tx.init`` on tiny versions of the benchmark's CNN and
transformer LM, for K-BFGS and K-BFGS(L)."""

import numpy as np
import pytest

from benchmarks import data
from benchmarks import experiments
from benchmarks import kbfgs_models as km


def test_stdlib_corpus_windows_and_split():
  c = data.load_stdlib_corpus(20_000, seq_len=16, held_out_fraction=0.2)
  assert c.num_bytes == 20_000 and c.files == tuple(sorted(c.files))
  assert c.x_train.shape[1] == 16 and c.x_train.dtype == np.int32
  np.testing.assert_array_equal(c.x_train[:, 1:], c.y_train[:, :-1])
  assert len(c.x_test) == (4000 // 17)  # the last 20 % held out
  assert 0 <= c.x_train.min() and c.x_train.max() < 256


@pytest.mark.parametrize("model", ["cnn", "lm"])
def test_state_memory_formula_matches_init(model):
  if model == "cnn":
    # The benchmark's CNN (models.CNN), on sklearn's digits: quick to load.
    exp = experiments.digits_cnn(n_train=32, batch_size=16, channels=(3, 5),
                                 hidden=7)
  else:
    exp = km.lm_experiment(max_bytes=4000, seq_len=8, batch_size=4, dim=8,
                           heads=2, num_blocks=1)
  report = km.memory_report(exp, km.registry(3), 0, 3)
  assert report["coverage_fraction"] > 0.5
  kinds = {d["kind"] for d in report["layers"]}
  assert kinds == ({"conv", "dense"} if model == "cnn" else {"dense"})
  for name in ("kbfgs", "kbfgs-l"):
    m = report["methods"][name]
    assert m["formula"]["bytes"] == m["state_bytes"], (name, m)


def test_settings_reject_an_unknown_method_and_accept_the_aliases():
  """A typo in ``--methods`` stops the run with the known names instead of
  training nothing for it; the layer-wise aliases are known."""
  parse = km.build_parser().parse_args
  with pytest.raises(SystemExit, match="unknown method.*layerwise-adam'"):
    km.settings(parse(["--methods", "adamw,layerwise-adam"]))
  s = km.settings(parse(["--methods", "adamw,layerwise-adamw-plain"]))
  assert s.methods == ["adamw", "layerwise-adamw-plain"]
  # Their curvature every 40 steps is inside each timing round.
  assert s.timing_calls == 40
  assert km.settings(parse(["--methods", "adamw,kbfgs"])).timing_calls == 3
