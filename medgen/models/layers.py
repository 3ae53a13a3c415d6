"""Layers shared by medgen's networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """GroupNorm that runs in the input's dtype.

    Under autocast PyTorch runs `group_norm` in fp32 and writes an fp32 output that the next
    convolution casts back to bf16: two extra full-size passes. The native kernels accept a bf16
    input with fp32 affine parameters and accumulate the statistics in fp32, so we call them with
    autocast off: same statistics precision, half the bytes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                # the CUDA kernel wants weight/bias in the input dtype (no mixed-type path)
                w = self.weight.to(x.dtype) if self.weight is not None else None
                b = self.bias.to(x.dtype) if self.bias is not None else None
                return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
