"""What one forward pass's matrix products cost, per weight format, on this CPU.

A decode step multiplies a few rows (one per running sequence) by every weight matrix of the
model, so its floor is the time these products take. This bench builds the linear layers of a
SmolLM2-135M-shaped model (30 layers of fused q|k|v, o, gate|up and down, plus the 49,152-row
output head) with random weights and times one pass through all of them, at 1, 16 and 128 rows,
in each form `supercluster serve` can hold them:

- `fp32 (nn.Linear)`: PyTorch's own `F.linear`, which repacks every weight at every call;
- `fp32 oneDNN-packed`: what `serve` runs by default on CPUs (`PackedLinear`);
- `int8`: `serve --quantize int8` (`Int8Linear`, bf16 activations);
- `int4`: `serve --quantize int4`, what `serve` runs on an imported Q4 GGUF by default
  (`BlockLinear`): 4-bit blocks (GGUF's Q4_1; the output head 8-bit, Q8_0) times activations in
  16-bit blocks (two int8 planes) in supercluster's own kernel (`serve/kernels/blocks_linear.cpp`);
- `int4-q8act`: the same blocks times int8 activation blocks, the arithmetic of llama.cpp's CPU path.

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
from supercluster.serve.quantize import BlockLinear, Int8Linear, PackedLinear

HIDDEN, KV, FFN, LAYERS, VOCAB = 576, 192, 1536, 30, 49152  # SmolLM2-135M
# each format's bytes a weight
FORMATS = {"fp32 (nn.Linear)": 4, "fp32 oneDNN-packed": 4, "int8": 1, "int4": 0.5 + 4 / 32, "int4-q8act": 0.5 + 4 / 32}


def model_shapes() -> list[tuple[int, int]]:
    per_layer = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN), (HIDDEN, FFN)]
    return per_layer * LAYERS + [(VOCAB, HIDDEN)]


def layers(fmt: str) -> list[nn.Module]:
    out = []
    for n, k in model_shapes():
        linear = nn.Linear(k, n, bias=False).requires_grad_(False)
        out.append({"fp32 (nn.Linear)": lambda m: m, "fp32 oneDNN-packed": PackedLinear.pack,
                    "int8": Int8Linear,
                    # as serve --quantize int4 holds them: 4-bit blocks, the output head 8-bit ones
                    "int4": lambda m: BlockLinear(m, 8 if n == VOCAB else 4),
                    "int4-q8act": lambda m: BlockLinear(m, 8 if n == VOCAB else 4, activation_bits=8)}[fmt](linear))
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
    parser.add_argument("--formats", default=",".join(FORMATS), help="which of them, comma-separated (the first is the base)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    params = sum(n * k for n, k in model_shapes())
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; {params / 1e6:.1f}M weights a pass")
    base = {}
    for fmt in args.formats.split(","):
        width = FORMATS[fmt]
        modules = layers(fmt)
        cells = []
        for r in rows:
            s = seconds(modules, r, args.repeats if r < 128 else 1)
            base.setdefault(r, s)
            cells.append(f"{r:>3} rows {s * 1e3:7.1f} ms ({base[r] / s:4.2f}x)")
        print(f"{fmt:<20} {params * width / 1e6:5.0f} MB  " + "  ".join(cells), flush=True)
        del modules
    print("ratios: speed against the first format at the same rows, in this process")


if __name__ == "__main__":
    main()
