"""kl_metal: fused KL-divergence losses for MLX (Metal kernels, composed-op fallback elsewhere)."""
from .losses import explain, kl_div_loss

__all__ = ["kl_div_loss", "explain"]
__version__ = "0.1.0"
