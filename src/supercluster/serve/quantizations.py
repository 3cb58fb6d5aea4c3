"""The ways `serve --quantize` holds a model's linear layers: one list, read by the CLI, the engine
and the service's endpoint schema (importable without torch)."""

from __future__ import annotations

QUANTIZATIONS = {
    "auto": "int4 where the weights already are 4-bit blocks (an imported Q4_0/Q4_1 GGUF, kept exactly), "
            "otherwise none",
    "none": "fp32 weights (bf16 matmuls where the CPU runs them faster)",
    "int8": "weight-only int8, one scale per output row",
    "int4": "4-bit blocks of 32 (the output head 8-bit) times 16-bit activation blocks, multiplied in integers "
            "(on SmolLM2's Q4_1 GGUF: first-token log-probabilities within 0.005 of fp32, fp32's greedy answers)",
    "int4-q8act": "int4 with 8-bit activation blocks, llama.cpp's arithmetic: up to 1.4x faster on many streams, "
                  "less faithful (on SmolLM2: first-token log-probabilities up to 0.24 from fp32; 'What is the capital "
                  "of France?' answered 'L'Étoile...' where fp32 says Paris)",
}
DEFAULT = "auto"
# each int4 variant's activation bits, in `serve/kernels/blocks_linear.cpp`
INT4_ACTIVATION_BITS = {"int4": 16, "int4-q8act": 8}


def check(method: str) -> str:
    """`method`, or one sentence naming the allowed values."""
    from supercluster.errors import UserError

    if method not in QUANTIZATIONS:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}.")
    return method


def help_text() -> str:
    return "; ".join(f"{name}: {what}" for name, what in QUANTIZATIONS.items()) + "."
