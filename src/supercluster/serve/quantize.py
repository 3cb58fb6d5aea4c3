"""How a served model's linear layers hold their weights (`serve/quantizations.py` lists the ways):
fp32 in oneDNN's blocked layout, weight-only int8, or 4-bit blocks multiplied in integers
(`BlockLinear`, `--quantize int4`, in supercluster's C++ kernel) by activations in 16-bit blocks,
or in 8-bit ones as llama.cpp does (`int4-q8act`). The default, `auto`, takes int4 where every
transformer matrix already is 4-bit blocks (an imported Q4_0 or Q4_1 GGUF: then int4 holds the
file's own numbers exactly and only the activations' rounding is added, which 16 bits keep to
about 1e-4 of each block's largest value) and fp32 otherwise.

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
from supercluster.serve.quantizations import INT4_ACTIVATION_BITS, check


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


class BlockLinear(nn.Module):
    """A frozen nn.Linear whose weight is held in blocks of 32 inputs, multiplied in integers by
    activations quantized inside the kernel (`serve/kernels/blocks_linear.cpp`) to blocks of
    `activation_bits` 8 (int8, as llama.cpp does on CPUs) or 16 (two int8 planes, about 15 bits).

    - 4 bits: each block has an fp16 scale d and offset m, w = d*q + m with q in 0..15: GGUF's
      Q4_1 (m the block's minimum), or Q4_0 (m = -8d, the block's largest magnitude at q = 0),
      whichever fits the block more closely. A Q4_1 or Q4_0 GGUF's own weights come back exactly
      to their own blocks (`exact`).
    - 8 bits: each block has an fp16 scale, w = d*q with q in -127..127, GGUF's Q8_0.

    Output features are laid out in panels of 16, each block's inputs in groups of 4, so that the
    kernel multiplies one row's 4 inputs into 16 features at a time (see the kernel's header).
    """

    fuses_swiglu = True  # forward(x, swiglu=True) folds SwiGLU into the down matrix's kernel (serve/moe.py asks)

    PANEL, BLOCK = 16, 32

    def __init__(self, linear: nn.Linear, bits: int, arch: str = "native", activation_bits: int = 16):
        super().__init__()
        from supercluster.serve.kernels import library

        if bits not in (4, 8) or activation_bits not in (8, 16):
            raise ValueError(f"weight blocks of 4 or 8 bits and activations of 8 or 16, not {bits} and {activation_bits}")
        self.kernel = library(arch).linear  # arch: which of the kernel's code paths (tests pick each)
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        rows, cols = -(-out_features // self.PANEL) * self.PANEL, -(-in_features // self.BLOCK) * self.BLOCK
        blocks = F.pad(weight, (0, cols - in_features, 0, rows - out_features)).view(rows, cols // 32, 32)
        # Rounded against the fp16 scale and offset the kernel reads, so each entry lies within
        # half a step of its true value.
        if bits == 4:
            q, d, m = _fit(blocks, *_q4_1(blocks))
            q0, d0, m0 = _fit(blocks, *_q4_0(blocks))
            error = lambda q, d, m: (q * d.float()[..., None] + m.float()[..., None] - blocks).abs().amax(dim=2)  # noqa: E731
            error1, error0 = error(q, d, m), error(q0, d0, m0)
            pick = error0 < error1
            q, d, m = torch.where(pick[..., None], q0, q), torch.where(pick, d0, d), torch.where(pick, m0, m)
            fitted = torch.minimum(error0, error1)
        else:  # stored unsigned, q + 128, with the offset -128*d
            d = (blocks.abs().amax(dim=2) / 127).half()
            q = torch.round(blocks * _reciprocal(d)[..., None]).clamp(-127, 127)
            fitted = (q * d.float()[..., None] - blocks).abs().amax(dim=2)
            q, m = q + 128, (-128 * d.float()).half()
        # Exact: every block's values are its own grid's, to fp32 rounding (an imported GGUF's blocks).
        self.exact = bool((fitted <= 1e-6 * blocks.abs().amax(dim=2)).all())
        self.register_buffer("qweight", self._panels(q.to(torch.uint8), bits))
        panel = lambda t: t.view(rows // self.PANEL, self.PANEL, -1).transpose(1, 2).contiguous()  # noqa: E731
        self.register_buffer("d", panel(d))
        self.register_buffer("m", panel(m))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.activation_bits = activation_bits

    @classmethod
    def _panels(cls, q: torch.Tensor, bits: int) -> torch.Tensor:
        """[rows, blocks, 32] unsigned values -> per panel and block, chunks of inputs 4c..4c+3 for
        all 16 features (byte 4*feature + j); 4-bit chunks pair inputs 8c.. (low) with 8c+4.. (high)."""
        panels, blocks = q.shape[0] // cls.PANEL, q.shape[1]
        if bits == 8:
            return q.view(panels, cls.PANEL, blocks, 8, 4).permute(0, 2, 3, 1, 4).contiguous().view(-1)
        halves = q.view(panels, cls.PANEL, blocks, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
        return (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).contiguous().view(-1)

    def dequantized(self) -> torch.Tensor:
        """The weight these blocks hold, in fp32 [out, in] (for tests and error bounds)."""
        panels, blocks = self.d.shape[0], self.d.shape[1]
        if self.bits == 8:
            q = self.qweight.view(panels, blocks, 8, self.PANEL, 4).permute(0, 3, 1, 2, 4)
        else:
            packed = self.qweight.view(panels, blocks, 4, self.PANEL, 4)
            q = torch.stack([packed & 0x0F, packed >> 4], dim=3).permute(0, 4, 1, 2, 3, 5)  # [p, n, b, c, h, j]
        q = q.reshape(panels * self.PANEL, blocks, 32).float()
        scale = lambda t: t.float().transpose(1, 2).reshape(panels * self.PANEL, blocks, 1)  # noqa: E731
        w = q * scale(self.d) + scale(self.m)
        return w.reshape(panels * self.PANEL, -1)[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor, norm: nn.RMSNorm | None = None, swiglu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias). Folded into the same call (`serve/fused.py`): `norm` applied to x first,
        or `swiglu`: x is [gate | up], twice in_features wide, and silu(gate) * up is multiplied;
        `residual` added to the result."""
        eps = 0.0 if norm is None else rms_norm_eps(norm)
        y = self.kernel(x if x.dtype == torch.float32 else x.float(), self.qweight, self.d, self.m, self.bits,
                        self.out_features, None if norm is None else norm.weight, eps, swiglu,
                        None if self.bias is not None else residual, self.activation_bits).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
            if residual is not None:
                y = y + residual
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit blocks of 32, "
                f"{self.activation_bits}-bit activations")


def rms_norm_eps(norm: nn.RMSNorm) -> float:
    """The epsilon `norm` adds on fp32 inputs (unset, nn.RMSNorm takes float32's)."""
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


def _q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1's scale and offset: the block's range in 15 steps from its minimum."""
    m = blocks.amin(dim=2).half()
    return ((blocks.amax(dim=2) - m.float()) / 15).half(), m


def _q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's as an offset: w = d*(q - 8), the block's largest magnitude at q = 0, so m = -8d."""
    extreme = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))[..., 0]
    d = (extreme / -8).half()
    return d, (-8 * d.float()).half()


def _fit(blocks: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
    """The 4-bit values of `blocks` on the grid d*q + m, q in 0..15."""
    q = torch.round((blocks - m.float()[..., None]) * _reciprocal(d)[..., None]).clamp(0, 15)
    return q, d, m


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    scale = scale.float()
    return torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))


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
    """Replace every nn.Linear of `model` in place: int8 for "int8", 4-bit blocks for "int4" (16-bit
    activations) and "int4-q8act" (8-bit ones), packed fp32 for "none"; "auto" is int4 where every
    matrix but the head is exactly 4-bit blocks already, "none" otherwise (`weight_format` says which)."""
    check(method)
    device = next(model.parameters()).device
    if method == "int8" and device.type not in ("cpu", "cuda"):
        raise UserError(f"int8 weights run on CPUs and CUDA GPUs, not on {device.type}; serve with --quantize none.")
    if method == "auto":
        from supercluster.serve.kernels import paged_attention

        # int4's kernels run on CPUs, where they build (paged_attention() is None where they do not)
        method = "auto" if device.type == "cpu" and paged_attention() is not None else "none"
    if method.startswith("int4") and device.type != "cpu":
        raise UserError(f"int4 weights run on CPUs (their kernel is C++ for x86 and others), not on {device.type}; "
                        "serve with --quantize int8 or none.")
    from supercluster.serve.moe import QuantizedExperts, experts_modules, is_router

    head = getattr(model, "output", None)
    linears = [(parent, name, child) for parent in list(model.modules()) if not is_router(parent)
               for name, child in list(parent.named_children()) if isinstance(child, nn.Linear)]
    if method == "auto":
        # The output head keeps 8-bit blocks, as llama.cpp's quantizer keeps it above 4 bits:
        # in 4 bits SmolLM2's head alone costs 16x the KL of all its other layers together.
        # Matrices are fitted in order and the search stops at the first one off the 4-bit grid
        # (a trained model pays one fit); the head last, for nothing where a matrix is off-grid.
        fitted: dict[int, BlockLinear] = {}
        for _, _, child in linears:
            if child is not head:
                fitted[id(child)] = BlockLinear(child, 4)
                if not fitted[id(child)].exact:
                    break
        experts = []
        if all(block.exact for block in fitted.values()):
            for parent, name, child in experts_modules(model):  # an MoE model's experts, per expert
                experts.append((parent, name, QuantizedExperts(child, lambda linear: BlockLinear(linear, 4))))
                if not experts[-1][2].exact:
                    break
        if all(block.exact for block in fitted.values()) and all(q.exact for _, _, q in experts):
            for parent, name, child in linears:
                setattr(parent, name, BlockLinear(child, 8) if child is head else fitted[id(child)])
            for parent, name, quantized in experts:
                setattr(parent, name, quantized)
            return model
        method = "none"
    if method.startswith("int4"):
        bits = INT4_ACTIVATION_BITS[method]
        convert = lambda linear: BlockLinear(linear, 8 if linear is head else 4, activation_bits=bits)  # noqa: E731
    else:
        convert = {"int8": Int8Linear, "none": PackedLinear.pack}[method]
    if method != "none":  # fp32 experts stay stacked for the grouped matmul
        for parent, name, child in experts_modules(model):
            setattr(parent, name, QuantizedExperts(child, convert))
    for parent, name, child in linears:
        setattr(parent, name, convert(child))
    return model


def weight_format(model: nn.Module) -> str:
    """The --quantize value `model`'s linear layers are held in (what "auto" became)."""
    for module in model.modules():
        if isinstance(module, BlockLinear):
            return "int4" if module.activation_bits == 16 else "int4-q8act"
        if isinstance(module, Int8Linear):
            return "int8"
    return "none"
