import torch
from torch import nn

from worker_orcd.kernels.fused import silu_mul


class SiluAndMul(nn.Module):
    """SwiGLU's gate: silu(gate) * up."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.is_cuda:
            return silu_mul(gate, up)
        # Not F.silu: its vectorized and scalar CPU paths round differently, so an element's
        # result would depend on where it falls in the tensor; exp's agree.
        return gate / (1.0 + torch.exp(-gate)) * up
