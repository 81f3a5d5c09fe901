"""Custom GPU kernels (Triton): the fused LeakyReLU^2 MLP (pgolf.shared.kernels.fused_mlp) and the
fused q/k norm + partial RoPE + query gain (pgolf.shared.kernels.qk_norm_rope).

Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors (tests).
"""

from pgolf.shared.kernels.fused_mlp import eager_mlp, fused_leaky_relu_sq_mlp
from pgolf.shared.kernels.qk_norm_rope import fused_qk_norm_rope

__all__ = ["eager_mlp", "fused_leaky_relu_sq_mlp", "fused_qk_norm_rope"]
