"""A served Mixture-of-Experts layer's experts with quantized weights.

The model's MoE layer (`model/moe.py`) routes in fp32, sorts the step's tokens by expert and
hands its experts the rows grouped that way with a count per expert. In fp32 and bf16 the
experts stay the model's stacked weights and run as one grouped matmul. With `--quantize int4`
or `int8` each expert's matrices become the same modules the dense layers use, converted by the
same function: per expert one [gate | up] matrix (SwiGLU folded into the down matrix's kernel
for 4-bit blocks, as the dense path's w13/w2) and one down matrix. Each expert multiplies only
its own rows, as llama.cpp's `mul_mat_id` indexes rows by expert; experts no token chose are
not read at all, which is what makes a decode step of an MoE model cheaper than its size.

In 4/8-bit blocks the served model's MoE layers run inside the one-call int4 decoder
(`serve/fused.py`; `kernels/decoder.cpp`'s `moe_ffn`), which routes as `Router.forward` and
multiplies these same blocks, each chosen expert on its own rows; `forward` here is the model's
own path (int8 experts, and wherever `FusedDecoder.supports` refuses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supercluster.model.moe import GroupedExperts, Router


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding `weight` [out, in]."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


class QuantizedExperts(nn.Module):
    def __init__(self, experts: GroupedExperts, convert):
        super().__init__()
        w1, w3, w2 = (w.detach().float() for w in (experts.w1, experts.w3, experts.w2))  # [E, h, I], [E, h, I], [E, I, h]
        self.w13 = nn.ModuleList(convert(_linear(torch.cat([w1[e], w3[e]], dim=1).t())) for e in range(w1.shape[0]))
        self.w2 = nn.ModuleList(convert(_linear(w2[e].t())) for e in range(w2.shape[0]))

    @property
    def exact(self) -> bool:
        """Every expert matrix came back exactly to its own blocks (an imported 4-bit GGUF's experts)."""
        return all(getattr(m, "exact", False) for m in (*self.w13, *self.w2))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, hidden] sorted by expert, counts [experts] rows each."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if not n:
                continue
            rows = x[start:start + n]
            gate_up = self.w13[e](rows)
            if getattr(self.w2[e], "fuses_swiglu", False):  # 4-bit blocks (not imported: quantize imports this)
                out[start:start + n] = self.w2[e](gate_up, swiglu=True)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                out[start:start + n] = self.w2[e](F.silu(gate) * up)
            start += n
        return out


def experts_modules(model: nn.Module) -> list[tuple[nn.Module, str, GroupedExperts]]:
    """(parent, attribute, experts) for every MoE layer's stacked experts in `model`."""
    return [(parent, name, child) for parent in list(model.modules())
            for name, child in list(parent.named_children()) if isinstance(child, GroupedExperts)]


def is_router(module: nn.Module) -> bool:
    """Routers keep their fp32 weight: their scores choose the experts, and quantization error there
    changes which experts a token reaches, not just by how much."""
    return isinstance(module, Router)
