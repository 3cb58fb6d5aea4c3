"""The transformer and its presets. `config` is torch-free; `transformer` needs torch."""

from supercluster.model.config import PRESETS, ModelConfig, flops_per_token, num_params, preset

__all__ = ["PRESETS", "ModelConfig", "flops_per_token", "num_params", "preset"]
