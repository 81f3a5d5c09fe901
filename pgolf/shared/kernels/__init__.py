"""Custom GPU kernels (Triton): the fused LeakyReLU^2 MLP (pgolf.shared.kernels.fused_mlp).

Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors (tests).
"""

from pgolf.shared.kernels.fused_mlp import eager_mlp, fused_leaky_relu_sq_mlp

__all__ = ["eager_mlp", "fused_leaky_relu_sq_mlp"]
