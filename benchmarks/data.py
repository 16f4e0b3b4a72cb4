"""Benchmark data, all generated or read locally: nothing is downloaded.

* :func:`make_curves`: a deterministic synthetic stand-in for the CURVES set
  of Hinton and Salakhutdinov (2006) used by the K-BFGS paper's CURVES
  autoencoder: 28 x 28 images of random smooth curves (clamped cubic
  B-splines through random control points) rendered with anti-aliasing,
  pixels in ``[0, 1]``. Vectorised NumPy; cached in memory and optionally on
  disk (``cache_dir``), keyed by every generation parameter.
* :func:`load_digits`: scikit-learn's bundled 8 x 8 digits (1797 images).
* :func:`load_fashion_mnist` / :func:`load_idx_dataset`: Fashion-MNIST from
  Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/*-idx*-ubyte.gz``) or any directory of
  MNIST-format IDX files; :func:`read_idx` / :func:`write_idx` are the IDX
  reader and writer.
* :func:`make_csbm`: a contextual stochastic block model graph with Gaussian
  node features, for the GCN benchmark.
* :func:`load_stdlib_corpus`: byte-level text of the Python standard
  library's own ``.py`` files (a character corpus every machine has), cut
  into windows for a language model.

Every loader returns plain NumPy arrays (float32 inputs, int32 labels).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import pathlib
import re
import struct
import sys
from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "DataUnavailableError",
    "Dataset",
    "Graph",
    "FASHION_MNIST_DIRS",
    "make_curves",
    "render_curves",
    "load_digits",
    "read_idx",
    "write_idx",
    "find_idx_files",
    "load_idx_dataset",
    "load_fashion_mnist",
    "make_csbm",
    "Corpus",
    "stdlib_source_files",
    "load_stdlib_corpus",
]

# Where Debian's `dataset-fashion-mnist` package installs the files.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


class DataUnavailableError(RuntimeError):
  """A data set that must be read from local files is not there."""


class Dataset(NamedTuple):
  """A supervised or unsupervised split pair.

  Attributes:
    x_train: inputs, float32, leading dimension = examples.
    y_train: int32 labels or ``None`` (autoencoders).
    x_test: test inputs.
    y_test: test labels or ``None``.
    name: a short description (for tables and JSON).
  """
  x_train: np.ndarray
  y_train: Optional[np.ndarray]
  x_test: np.ndarray
  y_test: Optional[np.ndarray]
  name: str


# --------------------------------------------------------------------------
# Synthetic CURVES
# --------------------------------------------------------------------------


def _clamped_bspline_basis(num_ctrl: int, num_samples: int,
                           degree: int = 3) -> np.ndarray:
  """Basis matrix ``(num_samples, num_ctrl)`` of a clamped uniform B-spline.

  Cox-de Boor recursion on the knot vector with ``degree + 1`` repeated end
  knots, so the curve starts at the first and ends at the last control point.
  """
  if num_ctrl <= degree:
    raise ValueError(f"need more than {degree} control points, got {num_ctrl}")
  inner = np.linspace(0.0, 1.0, num_ctrl - degree + 1)
  knots = np.concatenate([np.zeros(degree), inner, np.ones(degree)])
  t = np.linspace(0.0, 1.0, num_samples)
  # Degree 0: indicator of [k_i, k_{i+1}); the last sample goes in the last
  # non-empty span.
  basis = np.zeros((num_samples, len(knots) - 1))
  for i in range(len(knots) - 1):
    if knots[i] < knots[i + 1]:
      basis[:, i] = (t >= knots[i]) & (t < knots[i + 1])
  last = max(i for i in range(len(knots) - 1) if knots[i] < knots[i + 1])
  basis[-1, :] = 0.0
  basis[-1, last] = 1.0
  for p in range(1, degree + 1):
    new = np.zeros((num_samples, len(knots) - 1 - p))
    for i in range(len(knots) - 1 - p):
      left_den = knots[i + p] - knots[i]
      right_den = knots[i + p + 1] - knots[i + 1]
      if left_den > 0:
        new[:, i] += (t - knots[i]) / left_den * basis[:, i]
      if right_den > 0:
        new[:, i] += (knots[i + p + 1] - t) / right_den * basis[:, i + 1]
    basis = new
  return basis


def render_curves(points: np.ndarray, half_widths: np.ndarray,
                  image_size: int = 28, chunk: int = 32) -> np.ndarray:
  """Renders polylines into anti-aliased grey images with values in [0, 1].

  A pixel's value is the box-filtered coverage of a stroke of half-width
  ``w`` by its centre's distance ``d`` to the polyline:
  ``clip(w + 0.5 - d, 0, 1)``.

  Args:
    points: ``(n, S, 2)`` polyline vertices in pixel coordinates (x, y).
    half_widths: ``(n,)`` stroke half-widths in pixels.
    image_size: the images are ``image_size x image_size``.
    chunk: images rendered per vectorised block (bounds memory).

  Returns:
    ``(n, image_size * image_size)`` float32, row-major (y, x).
  """
  points = np.asarray(points, np.float32)
  n = points.shape[0]
  coords = np.arange(image_size, dtype=np.float32)
  yy, xx = np.meshgrid(coords, coords, indexing="ij")
  px = xx.reshape(-1)[None, :, None]  # (1, P, 1)
  py = yy.reshape(-1)[None, :, None]
  out = np.empty((n, image_size * image_size), np.float32)
  for start in range(0, n, chunk):
    pts = points[start:start + chunk]
    ax, ay = pts[:, None, :-1, 0], pts[:, None, :-1, 1]  # (c, 1, S-1)
    bx = pts[:, None, 1:, 0] - ax
    by = pts[:, None, 1:, 1] - ay
    seg_sq = np.maximum(bx * bx + by * by, 1e-12)
    rx, ry = px - ax, py - ay  # (c, P, S-1)
    t = np.clip((rx * bx + ry * by) / seg_sq, 0.0, 1.0)
    dx, dy = rx - t * bx, ry - t * by
    dist = np.sqrt((dx * dx + dy * dy).min(axis=-1))  # (c, P)
    w = np.asarray(half_widths[start:start + chunk], np.float32)[:, None]
    out[start:start + chunk] = np.clip(w + 0.5 - dist, 0.0, 1.0)
  return out


def _curves_split(n: int, seed: int, stream: int, num_ctrl: int,
                  image_size: int, num_samples: int) -> np.ndarray:
  if n == 0:
    return np.zeros((0, image_size * image_size), np.float32)
  rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
  # One draw per image (control points, then the stroke width), so the first
  # k images do not depend on n: a smaller set is a prefix of a larger one.
  raw = rng.random((n, 2 * num_ctrl + 1))
  margin = 3.0
  ctrl = margin + raw[:, :2 * num_ctrl].reshape(n, num_ctrl, 2) * (
      image_size - 1 - 2 * margin)
  half_widths = 0.6 + 0.6 * raw[:, -1]
  basis = _clamped_bspline_basis(num_ctrl, num_samples)  # (S, K)
  points = np.einsum("sk,nkd->nsd", basis, ctrl)
  return render_curves(points, half_widths, image_size)


_CURVES_VERSION = 1  # bump when the generator changes (invalidates caches)


@functools.lru_cache(maxsize=8)
def _curves_cached(n_train, n_test, seed, num_ctrl, image_size, num_samples,
                   cache_dir):
  key = dict(v=_CURVES_VERSION, n_train=n_train, n_test=n_test, seed=seed,
             num_ctrl=num_ctrl, image_size=image_size, num_samples=num_samples)
  path = None
  if cache_dir is not None:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = pathlib.Path(cache_dir) / f"curves-{digest[:16]}.npz"
    if path.exists():
      with np.load(path) as f:
        return f["x_train"], f["x_test"]
  x_train = _curves_split(n_train, seed, 0, num_ctrl, image_size, num_samples)
  x_test = _curves_split(n_test, seed, 1, num_ctrl, image_size, num_samples)
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x_train=x_train, x_test=x_test)
    os.replace(tmp, path)
  return x_train, x_test


def make_curves(n_train: int = 20_000, n_test: int = 10_000, *, seed: int = 0,
                num_control_points: int = 5, image_size: int = 28,
                num_samples: int = 25,
                cache_dir: Optional[str] = None) -> Dataset:
  """Synthetic CURVES: 28 x 28 images of random smooth curves, pixels in [0, 1].

  Each image is a clamped cubic B-spline through ``num_control_points``
  uniformly random control points (3 px margin), sampled at ``num_samples``
  points and drawn as an anti-aliased stroke of random half-width in
  [0.6, 1.2] px. Deterministic for a seed; train and test come from separate
  random streams, and a smaller set is a prefix of a larger one (same seed).
  It mimics, but is not, the original CURVES data of Hinton and
  Salakhutdinov (2006).

  Args:
    n_train: training images (the original set has 20,000).
    n_test: test images (10,000).
    seed: the generator seed.
    num_control_points: B-spline control points per curve (>= 4).
    image_size: image side in pixels.
    num_samples: points at which each spline is evaluated (polyline vertices).
    cache_dir: if given, the arrays are also cached there as ``.npz``, keyed
      by all the parameters above.

  Returns:
    A :class:`Dataset` with ``y_train = y_test = None``; the arrays are
    shared with an in-memory cache: do not modify them in place.
  """
  x_train, x_test = _curves_cached(
      int(n_train), int(n_test), int(seed), int(num_control_points),
      int(image_size), int(num_samples),
      None if cache_dir is None else str(cache_dir))
  return Dataset(x_train, None, x_test, None,
                 f"synthetic CURVES ({n_train} train / {n_test} test)")


# --------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.2, *, seed: int = 0,
                n_train: Optional[int] = None) -> Dataset:
  """scikit-learn's bundled 8 x 8 digits, scaled to [0, 1], NHWC images.

  Args:
    test_fraction: held-out fraction (stratified-free random split).
    seed: the split's seed.
    n_train: optionally keep only the first ``n_train`` training images.

  Returns:
    A :class:`Dataset` with ``x`` of shape ``(n, 8, 8, 1)`` and int32 labels.
  """
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover
    raise DataUnavailableError(
        "The digits benchmark needs scikit-learn: pip install "
        "'optax-layerwise[bench]'") from e
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = perm[:n_test], perm[n_test:]
  if n_train is not None:
    train = train[:n_train]
  return Dataset(x[train], y[train], x[test], y[test],
                 f"sklearn digits ({len(train)} train / {len(test)} test)")


# --------------------------------------------------------------------------
# IDX files (MNIST format)
# --------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {v.newbyteorder(">") if v.itemsize > 1 else v: k
              for k, v in _IDX_DTYPES.items()}


def _open(path):
  path = str(path)
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzipped (``.gz``) or raw.

  The header is two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B
  int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions,
  then each dimension as a big-endian uint32; the data follow, big-endian.

  Raises:
    ValueError: the header is malformed or the data are truncated.
  """
  with _open(path) as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic number).")
  code, ndim = data[2], data[3]
  if code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}.")
  header = 4 + 4 * ndim
  shape = struct.unpack(f">{ndim}I", data[4:header])
  dtype = _IDX_DTYPES[code]
  count = int(np.prod(shape, dtype=np.int64))
  if len(data) - header < count * dtype.itemsize:
    raise ValueError(f"{path}: truncated IDX data ({len(data) - header} bytes "
                     f"for shape {shape} of {dtype}).")
  array = np.frombuffer(data, dtype, count, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file (gzipped if ``path`` ends in ``.gz``)."""
  array = np.asarray(array)
  big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
  if big not in _IDX_CODES:
    raise ValueError(f"IDX cannot store dtype {array.dtype}.")
  header = bytes([0, 0, _IDX_CODES[big], array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  payload = header + array.astype(big).tobytes()
  path = str(path)
  if path.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)


_IDX_NAME = re.compile(
    r"^(train|t10k|test)-(images|labels)[-.]idx[0-9]-ubyte(\.gz)?$")


def find_idx_files(data_dir) -> dict:
  """Maps ``(split, kind)`` -> path for the MNIST-style files in a directory.

  Accepts ``train-images-idx3-ubyte[.gz]``, ``t10k-labels.idx1-ubyte`` and
  the like (``test-`` is read as ``t10k-``). Uncompressed files win.
  """
  found = {}
  directory = pathlib.Path(data_dir)
  if not directory.is_dir():
    return found
  for p in sorted(directory.iterdir(), key=lambda q: q.name.endswith(".gz")):
    m = _IDX_NAME.match(p.name)
    if m:
      split = "train" if m.group(1) == "train" else "test"
      found.setdefault((split, m.group(2)), p)
  return found


_NEEDED = (("train", "images"), ("train", "labels"), ("test", "images"),
           ("test", "labels"))


def load_idx_dataset(data_dir, *, n_train: Optional[int] = None,
                     n_test: Optional[int] = None, flatten: bool = True,
                     name: Optional[str] = None) -> Dataset:
  """Loads an MNIST-format IDX directory (MNIST, Fashion-MNIST, ...).

  Args:
    data_dir: directory with ``train-images-idx3-ubyte[.gz]``,
      ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
      ``t10k-labels-idx1-ubyte[.gz]``.
    n_train: keep the first ``n_train`` training examples.
    n_test: keep the first ``n_test`` test examples.
    flatten: ``(n, H*W)`` if true, else ``(n, H, W, 1)``.
    name: description for tables (defaults to the directory).

  Returns:
    A :class:`Dataset`, pixels scaled to [0, 1], int32 labels.

  Raises:
    DataUnavailableError: a file is missing.
  """
  files = find_idx_files(data_dir)
  missing = [f"{s}-{k}" for s, k in _NEEDED if (s, k) not in files]
  if missing:
    raise DataUnavailableError(
        f"No MNIST-format IDX files for {', '.join(missing)} in {data_dir!s} "
        "(expected train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).")

  def images(split, n):
    x = read_idx(files[(split, "images")])[:n]
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    return x.reshape(len(x), -1) if flatten else x[..., None]

  def labels(split, n):
    return read_idx(files[(split, "labels")])[:n].astype(np.int32)

  x_train, y_train = images("train", n_train), labels("train", n_train)
  x_test, y_test = images("test", n_test), labels("test", n_test)
  if len(x_train) != len(y_train) or len(x_test) != len(y_test):
    raise ValueError(f"{data_dir}: image and label counts differ.")
  return Dataset(x_train, y_train, x_test, y_test,
                 f"{name or data_dir} ({len(x_train)} train / {len(x_test)} "
                 "test)")


def load_fashion_mnist(data_dir=None, **kwargs) -> Dataset:
  """Fashion-MNIST from ``data_dir`` or Debian's ``dataset-fashion-mnist``.

  Args:
    data_dir: an MNIST-format IDX directory; ``None`` searches
      :data:`FASHION_MNIST_DIRS`.
    **kwargs: passed to :func:`load_idx_dataset`.

  Raises:
    DataUnavailableError: with instructions, when no files are found.
  """
  candidates: Sequence = [data_dir] if data_dir else FASHION_MNIST_DIRS
  for d in candidates:
    if len(find_idx_files(d)) == len(_NEEDED):
      return load_idx_dataset(d, name=f"Fashion-MNIST/IDX from {d}", **kwargs)
  where = data_dir or " or ".join(FASHION_MNIST_DIRS)
  raise DataUnavailableError(
      f"Fashion-MNIST (or MNIST) IDX files not found in {where}. Install "
      "Debian's package (`sudo apt-get install dataset-fashion-mnist`, files "
      "in /usr/share/datasets/fashion-mnist/) or pass --data-dir DIR pointing "
      "to a directory of MNIST-format IDX files "
      "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
      "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]). Nothing is "
      "downloaded at run time. Use --dataset curves to run on synthetic "
      "CURVES instead.")


# --------------------------------------------------------------------------
# Contextual stochastic block model
# --------------------------------------------------------------------------


class Graph(NamedTuple):
  """A node-classification graph.

  Attributes:
    adjacency: ``(N, N)`` float32, the GCN-normalised
      ``D^-1/2 (A + I) D^-1/2``.
    features: ``(N, F)`` float32 node features.
    labels: ``(N,)`` int32 classes.
    train_mask: ``(N,)`` float32, 1 on training nodes.
    test_mask: ``(N,)`` float32, 1 on test nodes.
    num_edges: undirected edges of ``A`` (without self loops).
    name: a short description.
  """
  adjacency: np.ndarray
  features: np.ndarray
  labels: np.ndarray
  train_mask: np.ndarray
  test_mask: np.ndarray
  num_edges: int
  name: str


def make_csbm(num_nodes: int = 2000, num_classes: int = 5,
              num_features: int = 64, *, average_degree: float = 10.0,
              homophily: float = 0.7, feature_signal: float = 1.0,
              train_fraction: float = 0.5, seed: int = 0) -> Graph:
  """A contextual stochastic block model (CSBM) graph with node features.

  Classes are balanced; an edge joins two nodes with probability ``p_in``
  (same class) or ``p_out`` (different classes), chosen so the expected
  degree is ``average_degree`` and a fraction ``homophily`` of the edges is
  intra-class. Node ``i`` has features ``feature_signal * mu[y_i] + noise``
  with class means ``mu`` random directions of norm ``0.25 sqrt(F)`` and
  standard normal noise, so neither the features nor the graph alone
  determine the class.

  Returns:
    A :class:`Graph`; the normalised adjacency is dense (fine for a few
    thousand nodes).
  """
  rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
  n, c = int(num_nodes), int(num_classes)
  labels = (np.arange(n) % c).astype(np.int32)
  rng.shuffle(labels)
  same = labels[:, None] == labels[None, :]
  n_same = n / c - 1.0
  n_diff = n - n / c
  p_in = min(1.0, homophily * average_degree / max(n_same, 1.0))
  p_out = min(1.0, (1.0 - homophily) * average_degree / max(n_diff, 1.0))
  probs = np.where(same, p_in, p_out)
  upper = np.triu(rng.random((n, n)) < probs, k=1)
  adj = (upper | upper.T).astype(np.float32)
  a_hat = adj + np.eye(n, dtype=np.float32)
  d_inv_sqrt = 1.0 / np.sqrt(a_hat.sum(1))
  a_norm = (a_hat * d_inv_sqrt[:, None] * d_inv_sqrt[None, :]).astype(
      np.float32)
  means = rng.standard_normal((c, num_features))
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  means *= np.sqrt(num_features) * 0.25
  features = (feature_signal * means[labels]
              + rng.standard_normal((n, num_features))).astype(np.float32)
  order = rng.permutation(n)
  n_train = int(round(train_fraction * n))
  train_mask = np.zeros(n, np.float32)
  train_mask[order[:n_train]] = 1.0
  test_mask = 1.0 - train_mask
  return Graph(a_norm, features, labels, train_mask, test_mask,
               int(upper.sum()),
               f"CSBM ({n} nodes, {c} classes, {int(upper.sum())} edges, "
               f"homophily {homophily})")


# --------------------------------------------------------------------------
# A character corpus from the Python standard library's own source files
# --------------------------------------------------------------------------


class Corpus(NamedTuple):
  """A byte-level language-modelling corpus cut into fixed windows.

  Attributes:
    x_train: ``(n, seq_len)`` int32 input bytes (non-overlapping windows of
      the training text).
    y_train: ``(n, seq_len)`` int32 next bytes (the inputs shifted by one).
    x_test: held-out inputs, from text after the training text.
    y_test: held-out next bytes.
    files: the source files read, in order (paths relative to ``root``).
    num_bytes: bytes of text read (train and held-out).
    name: a short description.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  files: tuple
  num_bytes: int
  name: str


def stdlib_source_files(root=None) -> list:
  """The ``.py`` files directly in the standard library's directory
  (``sysconfig.get_paths()['stdlib']`` unless ``root``), sorted by name."""
  if root is None:
    import sysconfig  # pylint: disable=import-outside-toplevel
    root = sysconfig.get_paths()["stdlib"]
  root = pathlib.Path(root)
  files = sorted(p for p in root.glob("*.py") if p.is_file())
  if not files:
    raise DataUnavailableError(f"no .py files in {root}")
  return files


def load_stdlib_corpus(max_bytes: int = 1_000_000, *, seq_len: int = 64,
                       held_out_fraction: float = 0.1,
                       root=None) -> Corpus:
  """Byte-level text of the standard library's top-level ``.py`` files.

  The files of :func:`stdlib_source_files` are concatenated in that (sorted)
  order, each followed by a newline, and the text is cut at ``max_bytes``.
  The last ``held_out_fraction`` of it is held out (so held-out windows come
  from files never trained on, except the one straddling the cut). Each part
  is cut into non-overlapping windows of ``seq_len + 1`` bytes: inputs are
  the first ``seq_len`` bytes, targets the last ``seq_len``. Nothing is
  downloaded; the text depends on the Python version that runs it (the
  files read are returned).
  """
  files = stdlib_source_files(root)
  base = files[0].parent
  chunks, used, total = [], [], 0
  for path in files:
    if total >= max_bytes:
      break
    text = path.read_bytes() + b"\n"
    chunks.append(text)
    used.append(str(path.relative_to(base)))
    total += len(text)
  data = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)
  cut = int(round(len(data) * (1.0 - held_out_fraction)))
  window = seq_len + 1

  def windows(part):
    n = len(part) // window
    w = part[:n * window].reshape(n, window).astype(np.int32)
    return w[:, :-1], w[:, 1:]

  (x_train, y_train), (x_test, y_test) = windows(data[:cut]), windows(
      data[cut:])
  return Corpus(
      x_train, y_train, x_test, y_test, tuple(used), int(len(data)),
      f"Python {'.'.join(map(str, sys.version_info[:3]))} "
      f"stdlib source, {len(used)} files, {len(data) / 1e6:.2f} MB bytes "
      f"({len(x_train)} train / {len(x_test)} held-out windows of "
      f"{seq_len})")
