"""How a served model's linear layers hold their weights: fp32 in oneDNN's blocked layout
(the default on CPUs), or weight-only int8.

PyTorch's fp32 `mm` on a CPU repacks the weight into the BLAS library's blocked layout at every
call, which costs about what the product of a few rows does (`bench/serve_kernels.py`: packing
once made 16 rows 2.5x faster and one row 1.3x on a Zen CPU). `PackedLinear` packs once at load
(oneDNN, which PyTorch ships; Inductor does the same for frozen models) and keeps fp32's numbers.

One sequence's decode step multiplies one row by every weight matrix, so it costs about the time
it takes to read the weights. Stored as int8 with one scale per
output row they are a quarter of fp32's bytes (SmolLM2-135M: 135 MB a token instead of 538).
The rounding error is at most half a step, about max|row| / 254, well inside what a Q4 GGUF has
already lost. Only the matrices change: embeddings, norms, attention and the residual stream
keep their precision, and each product returns in its input's dtype.

Activations enter PyTorch's int8 kernel (`_weight_int8pack_mm`) in bf16: on CPUs its fp32
variant is many times slower, its bf16 one runs on AVX-512 BF16 where present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supercluster.errors import UserError

QUANTIZATIONS = ("none", "int8")


class Int8Linear(nn.Module):
    """A frozen nn.Linear whose weight is int8 with one bf16 scale per output feature."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # The kernel multiplies by the scale in its activation dtype, bf16: rounding the weights
        # against the bf16 scale keeps every entry within half a step of its true value.
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        q = torch.round(weight / scale.float()[:, None]).clamp(-128, 127)
        self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.qweight, self.scale).view(*x.shape[:-1], self.out_features)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class PackedLinear(nn.Module):
    """A frozen fp32 nn.Linear that also holds its weight packed for oneDNN's matmul. Under
    autocast (bf16 steps) it is a plain linear: autocast casts the original weight."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.weight, self.bias, self.packed = linear.weight, linear.bias, packed
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @staticmethod
    def pack(linear: nn.Linear) -> nn.Module:
        """`linear` packed, or as it is where this PyTorch has no oneDNN or the weight is not fp32 on a CPU."""
        if linear.weight.device.type != "cpu" or linear.weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            return linear
        try:
            # laid out for steps of about 16 rows: 1 to 512 rows ran within 6% of their own best layout
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 16)
        except (RuntimeError, AttributeError):  # a build without these ops
            return linear
        return PackedLinear(linear, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def quantize(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear of `model` in place: int8 for "int8", packed fp32 for "none"."""
    if method not in QUANTIZATIONS:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}.")
    device = next(model.parameters()).device
    if method == "int8" and device.type not in ("cpu", "cuda"):
        raise UserError(f"int8 weights run on CPUs and CUDA GPUs, not on {device.type}; serve with --quantize none.")
    convert = Int8Linear if method == "int8" else PackedLinear.pack
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, convert(child))
    return model
