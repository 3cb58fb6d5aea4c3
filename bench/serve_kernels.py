"""What one forward pass's matrix products cost, per weight format, on this CPU.

A decode step multiplies a few rows (one per running sequence) by every weight matrix of the
model, so its floor is the time these products take. This bench builds the linear layers of a
SmolLM2-135M-shaped model (30 layers of fused q|k|v, o, gate|up and down, plus the 49,152-row
output head) with random weights and times one pass through all of them, at 1, 16 and 128 rows,
in each form `supercluster serve` can hold them:

- `fp32 (nn.Linear)`: PyTorch's own `F.linear`, which repacks every weight at every call;
- `fp32 oneDNN-packed`: what `serve` runs by default on CPUs (`PackedLinear`);
- `int8`: `serve --quantize int8` (`Int8Linear`, bf16 activations);
- `int4 g32`, for reference: PyTorch's 4-bit kernel (`_weight_int4pack_mm_for_cpu`), which
  holds llama.cpp's Q4_1 blocks; `serve` does not offer it.

Every format runs in the same process, one after another, so the ratios compare like with like;
the absolute times move with the machine's load (printed with the results).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from supercluster.hardware.local import cpu_model
from supercluster.serve.quantize import Int8Linear, PackedLinear

HIDDEN, KV, FFN, LAYERS, VOCAB = 576, 192, 1536, 30, 49152  # SmolLM2-135M


def model_shapes() -> list[tuple[int, int]]:
    per_layer = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN), (HIDDEN, FFN)]
    return per_layer * LAYERS + [(VOCAB, HIDDEN)]


class Int4Reference(nn.Module):
    """Random 4-bit weights in groups of 32 through PyTorch's int4 CPU kernel (bf16 activations)."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.in_features = in_features
        q = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_zeros = (torch.rand(in_features // 32, out_features, 2) * 0.01).to(torch.bfloat16)

    def forward(self, x):
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, 32, self.scales_zeros).to(x.dtype)


def layers(fmt: str) -> list[nn.Module]:
    out = []
    for n, k in model_shapes():
        if fmt == "int4 g32":
            out.append(Int4Reference(n, k))
            continue
        linear = nn.Linear(k, n, bias=False).requires_grad_(False)
        out.append({"fp32 (nn.Linear)": lambda m: m, "fp32 oneDNN-packed": PackedLinear.pack,
                    "int8": Int8Linear}[fmt](linear))
    return out


@torch.inference_mode()
def seconds(modules: list[nn.Module], rows: int, repeats: int) -> float:
    inputs = {k: torch.randn(rows, k) for k in (HIDDEN, FFN)}

    def once():
        for m in modules:
            m(inputs[m.in_features])

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16,128", help="rows per product (sequences a decode step runs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    params = sum(n * k for n, k in model_shapes())
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {params / 1e6:.1f}M weights a pass")
    formats = {"fp32 (nn.Linear)": 4, "fp32 oneDNN-packed": 4, "int8": 1, "int4 g32": 0.5 + 4 / 32}  # bytes a weight
    base = {}
    for fmt, width in formats.items():
        modules = layers(fmt)
        cells = []
        for r in rows:
            s = seconds(modules, r, args.repeats if r < 128 else 1)
            base.setdefault(r, s)
            cells.append(f"{r:>3} rows {s * 1e3:7.1f} ms ({base[r] / s:4.2f}x)")
        print(f"{fmt:<20} {params * width / 1e6:5.0f} MB  " + "  ".join(cells), flush=True)
        del modules
    print("ratios: speed against fp32 (nn.Linear) at the same rows, in this process")


if __name__ == "__main__":
    main()
