"""kl_metal: fused KL-divergence losses for MLX (Metal kernels, composed-op fallback elsewhere)."""
from .logits import explain_from_logits, kl_div_from_logits
from .losses import explain, kl_div_loss

__all__ = ["kl_div_loss", "explain", "kl_div_from_logits", "explain_from_logits"]
__version__ = "0.1.0"
