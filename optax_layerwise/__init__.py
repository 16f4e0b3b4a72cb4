"""optax-layerwise: curvature-aware layer-wise optimizers for Optax.

Three methods as composable :class:`optax.GradientTransformationExtraArgs`:

* layer-wise adaptive step sizes (Bahamou and Goldfarb, arXiv 2305.13664):
  :func:`scale_by_layerwise_step_size`, :func:`layerwise_sgd`,
  :func:`layerwise_adamw`;
* curvature-based layer-wise learning rates (Gao and Zhong, arXiv 2012.08795):
  :func:`scale_by_curvature_lr`, :func:`cblr`, :func:`mclr`, and the
  large-batch helpers :func:`batch_size_schedule`, :func:`small_loss_weights`;
* K-BFGS and K-BFGS(L) (Goldfarb, Ren and Bahamou, NeurIPS 2020).

Transforms that need curvature take the mini-batch loss as the keyword
argument ``value_fn`` of ``update``.
"""

from optax_layerwise._coverage import kbfgs_coverage
from optax_layerwise._coverage import KBFGSCoverage
from optax_layerwise._coverage import LeafCoverage
from optax_layerwise._curvature_lr import cblr
from optax_layerwise._curvature_lr import mclr
from optax_layerwise._curvature_lr import scale_by_curvature_lr
from optax_layerwise._curvature_lr import ScaleByCurvatureLRState
from optax_layerwise._flax import apply_gradients
from optax_layerwise._flax import nnx_value_fn
from optax_layerwise._input_factor import precondition_by_inputs
from optax_layerwise._input_factor import PreconditionByInputsState
from optax_layerwise._diagnostics import diagnostics
from optax_layerwise._kbfgs import kbfgs
from optax_layerwise._kbfgs import kbfgs_layer_names
from optax_layerwise._kbfgs import KBFGSLayerState
from optax_layerwise._kbfgs import KBFGSState
from optax_layerwise._large_batch import batch_size_schedule
from optax_layerwise._layer_kinds import LayerCall
from optax_layerwise._layer_kinds import LayerKind
from optax_layerwise._layer_kinds import register_layer_kind
from optax_layerwise._large_batch import small_loss_weights
from optax_layerwise._large_batch import SmallLossWeights
from optax_layerwise._layers import group_layers
from optax_layerwise._layers import Layers
from optax_layerwise._step_size import layerwise_adamw
from optax_layerwise._step_size import layerwise_sgd
from optax_layerwise._step_size import scale_by_layerwise_step_size
from optax_layerwise._step_size import ScaleByLayerwiseStepSizeState
from optax_layerwise._taps import dense
from optax_layerwise._taps import DenseTap
from optax_layerwise._taps import tap_dense_layers
from optax_layerwise._taps import TapResult

__version__ = "0.1.0"

__all__ = (
    "DenseTap",
    "KBFGSCoverage",
    "KBFGSLayerState",
    "KBFGSState",
    "LayerCall",
    "LayerKind",
    "Layers",
    "LeafCoverage",
    "PreconditionByInputsState",
    "ScaleByCurvatureLRState",
    "ScaleByLayerwiseStepSizeState",
    "SmallLossWeights",
    "TapResult",
    "apply_gradients",
    "batch_size_schedule",
    "cblr",
    "dense",
    "diagnostics",
    "group_layers",
    "kbfgs",
    "kbfgs_coverage",
    "kbfgs_layer_names",
    "layerwise_adamw",
    "layerwise_sgd",
    "mclr",
    "nnx_value_fn",
    "precondition_by_inputs",
    "register_layer_kind",
    "scale_by_curvature_lr",
    "scale_by_layerwise_step_size",
    "small_loss_weights",
    "tap_dense_layers",
)
