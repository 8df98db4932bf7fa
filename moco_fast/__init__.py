"""moco-fast: MoCo v1/v2 with fused InfoNCE, multi-tensor EMA and device-side queue kernels."""
from moco_fast import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
