"""optax-layerwise: curvature-aware layer-wise optimizers for Optax.

Three methods as composable :class:`optax.GradientTransformationExtraArgs`:

* layer-wise adaptive step sizes (Bahamou and Goldfarb, arXiv 2305.13664):
  :func:`scale_by_layerwise_step_size`, :func:`layerwise_sgd`,
  :func:`layerwise_adamw`;
* curvature-based layer-wise learning rates (Gao and Zhong, arXiv 2012.08795);
* K-BFGS and K-BFGS(L) (Goldfarb, Ren and Bahamou, NeurIPS 2020).

Transforms that need curvature take the mini-batch loss as the keyword
argument ``value_fn`` of ``update``.
"""

from optax_layerwise._layers import group_layers
from optax_layerwise._layers import Layers
from optax_layerwise._step_size import layerwise_adamw
from optax_layerwise._step_size import layerwise_sgd
from optax_layerwise._step_size import scale_by_layerwise_step_size
from optax_layerwise._step_size import ScaleByLayerwiseStepSizeState

__version__ = "0.1.0"

__all__ = (
    "Layers",
    "ScaleByLayerwiseStepSizeState",
    "group_layers",
    "layerwise_adamw",
    "layerwise_sgd",
    "scale_by_layerwise_step_size",
)
