"""Checkpointing params and optimizer state with orbax, resuming bit-for-bit.

The optimizer states are pytrees of arrays (NamedTuples, tuples, dicts) with
fixed shapes, so orbax saves them as they are. To restore, build the
*abstract* target from ``tx.init`` of any params of the right shapes
(``jax.eval_shape``, nothing is computed): orbax fills it with the saved
arrays, NamedTuple types included.

``main()`` trains K-BFGS and layer-wise AdamW for ``NUM_STEPS`` steps without
a break, then again for ``INTERRUPT_AT`` steps, saves a checkpoint, and
resumes it in a *new Python process* (``python checkpointing.py --resume
DIR``) that continues to ``NUM_STEPS``. The final params of both runs are
identical, bit for bit.

    python examples/checkpointing.py
"""

import argparse
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_layerwise as olw

NUM_STEPS = 12
INTERRUPT_AT = 5
OPTIMIZERS = {
    "kbfgs": lambda: olw.kbfgs(learning_rate=0.3),
    # Default Hutchinson estimator: its probes are seeded from the state's
    # step count, so the resumed run draws the same probes.
    "layerwise_adamw": lambda: olw.layerwise_adamw(),
}


def make_data(n=512, d_in=8, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d_in), np.float32)
  return jnp.asarray(x), jnp.asarray(np.sin(x.sum(axis=1, keepdims=True)))


def init_params(sizes=(8, 16, 1), seed=1):
  rng = np.random.default_rng(seed)
  return {
      f"dense_{i}": {
          "kernel": jnp.asarray(rng.standard_normal((d_in, d_out), np.float32)
                                / np.sqrt(d_in)),
          "bias": jnp.zeros(d_out),
      }
      for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]))
  }


def loss_fn(params, x, y):
  h = jnp.tanh(olw.dense(x, params["dense_0"]["kernel"],
                         params["dense_0"]["bias"]))
  out = olw.dense(h, params["dense_1"]["kernel"], params["dense_1"]["bias"])
  return jnp.mean((out - y) ** 2)


full_loss = jax.jit(loss_fn)


def make_step(tx):
  @jax.jit
  def step(params, opt_state, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    updates, opt_state = tx.update(
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, xb, yb))
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def train(step_fn, params, opt_state, start, stop, batch_size=128):
  """Steps ``start .. stop - 1``; the mini-batch is a function of the step."""
  x, y = make_data()
  num_batches = x.shape[0] // batch_size
  for i in range(start, stop):
    b = slice((i % num_batches) * batch_size, (i % num_batches + 1) * batch_size)
    params, opt_state, _ = step_fn(params, opt_state, x[b], y[b])
    print(f"  after step {i:3d}  loss {float(full_loss(params, x, y)):.4f}")
  return params, opt_state


def save(path, params, opt_state, step):
  """Writes ``{params, opt_state, step}`` to ``path`` (a new directory)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"params": params, "opt_state": opt_state,
                             "step": jnp.asarray(step, jnp.int32)})


def restore(path, tx, params_like):
  """Reads a checkpoint back into the structure ``tx.init`` makes."""
  abstract = jax.eval_shape(lambda p: {
      "params": p, "opt_state": tx.init(p),
      "step": jnp.asarray(0, jnp.int32)}, params_like)
  with ocp.StandardCheckpointer() as checkpointer:
    ckpt = checkpointer.restore(path, abstract)
  return ckpt["params"], ckpt["opt_state"], int(ckpt["step"])


def resume(ckpt_dir, name):
  """What a restarted job runs: fresh tx, fresh jit, restored state."""
  tx = OPTIMIZERS[name]()
  params, opt_state, step = restore(os.path.join(ckpt_dir, name), tx,
                                    init_params())
  print(f"{name}: resumed at step {step}")
  params, _ = train(make_step(tx), params, opt_state, step, NUM_STEPS)
  return params


def main(workdir=None):
  workdir = workdir or tempfile.mkdtemp(prefix="olw-ckpt-")
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  uninterrupted = {}
  for name, make_tx in OPTIMIZERS.items():
    tx = make_tx()
    step_fn = make_step(tx)
    print(f"{name}: {NUM_STEPS} steps without a break")
    uninterrupted[name], _ = train(step_fn, init_params(),
                                   tx.init(init_params()), 0, NUM_STEPS)
    print(f"{name}: {INTERRUPT_AT} steps, then a checkpoint")
    params, opt_state = train(step_fn, init_params(), tx.init(init_params()),
                              0, INTERRUPT_AT)
    save(os.path.join(ckpt_dir, name), params, opt_state, INTERRUPT_AT)

  # Resume in a new process, as a restarted job would.
  out = os.path.join(os.path.abspath(workdir), "resumed.npz")
  subprocess.run([sys.executable, os.path.abspath(__file__), "--resume",
                  ckpt_dir, "--out", out], check=True)
  resumed = np.load(out)
  identical, max_diff = {}, {}
  for name, params in uninterrupted.items():
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    pairs = [(np.asarray(leaf), resumed[f"{name}{jax.tree_util.keystr(path)}"])
             for path, leaf in leaves]
    identical[name] = all(np.array_equal(a, b) for a, b in pairs)
    max_diff[name] = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    print(f"{name}: resumed params identical to uninterrupted: "
          f"{identical[name]} (max |difference| {max_diff[name]:.1e})")
  return {"identical": identical, "max_diff": max_diff,
          "uninterrupted": uninterrupted, "resumed": dict(resumed)}


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--resume", metavar="CHECKPOINT_DIR")
  parser.add_argument("--out", help="with --resume: .npz of the final params")
  args = parser.parse_args()
  if args.resume is None:
    main()
  else:
    final = {}
    for opt_name in OPTIMIZERS:
      path_leaves, _ = jax.tree_util.tree_flatten_with_path(
          resume(args.resume, opt_name))
      for key_path, value in path_leaves:
        final[f"{opt_name}{jax.tree_util.keystr(key_path)}"] = np.asarray(value)
    np.savez(args.out, **final)
