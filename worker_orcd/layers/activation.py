import torch
import torch.nn.functional as F
from torch import nn

from worker_orcd.kernels.fused import silu_mul


class SiluAndMul(nn.Module):
    """SwiGLU's gate: silu(gate) * up."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.is_cuda:
            return silu_mul(gate, up)
        return F.silu(gate) * up
