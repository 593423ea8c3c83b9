"""kronjax: Kronecker factorization in JAX.

K-FAC natural-gradient training as optax transformations, Kronecker-factored
Fisher blocks from per-layer tapes of Flax and pure-JAX models, and Kronecker
linear algebra.
"""

from importlib import metadata as _metadata

from kronjax import linalg as linalg
from kronjax import losses as losses
from kronjax import nn as nn
from kronjax._distributed import Placement as Placement
from kronjax._batch import Tape as Tape
from kronjax._params import uncovered_parameters as uncovered_parameters
from kronjax.blocks import fisher_blocks as fisher_blocks
from kronjax.blocks import layer_block as layer_block
from kronjax.curvature import Curvature as Curvature
from kronjax.curvature import fit_curvature as fit_curvature
from kronjax.influence import influence_scores as influence_scores
from kronjax.laplace import Laplace as Laplace
from kronjax.laplace import laplace as laplace
from kronjax.tape import LayerTape as LayerTape
from kronjax.transform import AdaptiveKfacState as AdaptiveKfacState
from kronjax.transform import KfacState as KfacState
from kronjax.transform import SkipNonFiniteState as SkipNonFiniteState
from kronjax.transform import curvature_due as curvature_due
from kronjax.transform import kfac as kfac
from kronjax.transform import scale_by_adaptive_kfac as scale_by_adaptive_kfac
from kronjax.transform import scale_by_kfac as scale_by_kfac
from kronjax.transform import skip_non_finite as skip_non_finite

try:
  __version__ = _metadata.version("kronjax")
except _metadata.PackageNotFoundError:  # running from a source tree
  __version__ = "0.0.0"

__all__ = [
    "AdaptiveKfacState",
    "Curvature",
    "KfacState",
    "Laplace",
    "LayerTape",
    "Placement",
    "SkipNonFiniteState",
    "Tape",
    "curvature_due",
    "fisher_blocks",
    "fit_curvature",
    "flax",
    "influence_scores",
    "kfac",
    "laplace",
    "layer_block",
    "linalg",
    "losses",
    "nn",
    "scale_by_adaptive_kfac",
    "scale_by_kfac",
    "skip_non_finite",
    "uncovered_parameters",
]


def __getattr__(name):
  # The Flax adapters load on first use: the core never imports Flax.
  if name == "flax":
    import importlib
    return importlib.import_module("kronjax.flax")
  raise AttributeError(f"module 'kronjax' has no attribute {name!r}")
