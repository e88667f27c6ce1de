"""ptv2-kernels: fast P-Tuning v2 (deep prompt tuning) with attention that reads a shared prefix in place."""

from .ops import prefix_attention
from .reference import prefix_attention_reference

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_reference", "__version__"]
