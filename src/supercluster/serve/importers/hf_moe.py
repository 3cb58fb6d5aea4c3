"""The Mixture-of-Experts parts of Hugging Face Mixtral, Qwen3-MoE and OLMoE folders: their
config keys as `ModelConfig`'s moe_* fields, and their expert tensors stacked the way
`model.moe.GroupedExperts` holds them.

Checkpoints store experts one Linear each (`experts.3.w1.weight` in Mixtral's names,
`experts.3.gate_proj.weight` in Qwen's and OLMoE's, [width, hidden] like any nn.Linear);
transformers 5 holds them stacked in memory (`experts.gate_up_proj` [E, 2*width, hidden],
`experts.down_proj` [E, hidden, width]) and either may be on disk. Ours are stacked and
transposed for `x @ w`: w1, w3 [E, hidden, width], w2 [E, width, hidden].

Routing as each architecture does it: softmax over all experts in fp32, top-k of those
scores; Mixtral always renormalises the chosen k to sum to 1, Qwen3-MoE and OLMoE when
`norm_topk_prob` is set.
"""

from __future__ import annotations

import re
from pathlib import Path

from supercluster.errors import UserError

MOE_TYPES = ("mixtral", "qwen3_moe", "olmoe")

# checkpoint name of one expert's matrix -> ours
_EXPERT_PART = {"w1": "w1", "w2": "w2", "w3": "w3", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_QK_NORM = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight$")


def moe_fields(folder: Path, hf: dict, kind: str) -> dict:
    """ModelConfig's fields for an MoE config.json (attention fields included where they differ from Llama's)."""
    experts = hf.get("num_local_experts") if kind == "mixtral" else hf.get("num_experts", hf.get("num_local_experts"))
    if not experts or not hf.get("num_experts_per_tok"):
        raise UserError(f"{str(folder)!r} is a {kind} model whose config.json lacks its expert counts "
                        f"(num_{'local_' if kind == 'mixtral' else ''}experts, num_experts_per_tok).")
    layers = int(hf["num_hidden_layers"])
    fields = dict(moe_experts=int(experts), moe_top_k=int(hf["num_experts_per_tok"]), moe_router="softmax",
                  moe_norm_topk=True if kind == "mixtral" else bool(hf.get("norm_topk_prob", False)),
                  # kept for fine-tuning the imported model as it was trained
                  moe_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0))
    if hf.get("sliding_window") and (kind == "mixtral" or hf.get("use_sliding_window")):
        raise UserError(f"{str(folder)!r} uses sliding-window attention, which this model does not implement; "
                        f"it cannot be imported.")
    if kind == "mixtral":
        fields["moe_hidden"] = int(hf["intermediate_size"])
    elif kind == "qwen3_moe":
        fields["moe_hidden"] = int(hf["moe_intermediate_size"])
        fields.update(qk_norm=True, head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]))
        # Qwen3-MoE names its dense layers (mlp_only_layers) and spaces its MoE ones (decoder_sparse_step):
        # this model keeps dense only its first N layers.
        sparse = [i for i in range(layers) if i not in set(hf.get("mlp_only_layers") or [])
                  and (i + 1) % int(hf.get("decoder_sparse_step", 1) or 1) == 0]
        dense = layers - len(sparse)
        if sparse != list(range(dense, layers)):
            raise UserError(f"{str(folder)!r} mixes dense and MoE layers other than dense-first (MoE layers "
                            f"{sparse}); this model keeps dense only its first layers.")
        fields["moe_dense_layers"] = dense
    else:  # olmoe: q and k normed over the whole projection, not per head
        fields["moe_hidden"] = int(hf["intermediate_size"])
        if hf.get("clip_qkv") is not None:
            raise UserError(f"{str(folder)!r} clips q, k and v (clip_qkv), which this model does not implement; "
                            f"it cannot be imported.")
        fields.update(qk_norm=True, qk_norm_per_head=False)
    return fields


class ExpertTensors:
    """Collects one folder's MoE tensors under our names; `finish` stacks the experts and checks
    that every MoE layer has exactly the config's experts."""

    def __init__(self, folder: Path, experts: int, moe_layer):
        self.folder, self.experts, self.moe_layer = folder, experts, moe_layer
        self.parts: dict[tuple[int, str], dict[int, object]] = {}  # (layer, w1|w2|w3) -> expert -> [out, in]
        self.stacked: dict[str, object] = {}

    def take(self, name: str, tensor) -> str | None:
        """Our name for an MoE checkpoint tensor (stored here until `finish` if it is an expert's),
        "" once held for stacking, None when `name` is no MoE tensor."""
        if m := _ROUTER.match(name):
            self._check_layer(int(m[1]), name)
            return f"layers.{m[1]}.feed_forward.router.gate.weight"
        if m := _QK_NORM.match(name):
            return f"layers.{m[1]}.attention.{m[2]}.weight"
        if (m := _EXPERT.match(name)) and m[3] in _EXPERT_PART:
            layer, expert = int(m[1]), int(m[2])
            self._check_layer(layer, name)
            if expert >= self.experts:
                raise UserError(f"{str(self.folder)!r} has a tensor {name!r} for expert {expert}, but its config.json "
                                f"counts {self.experts} experts; the folder is inconsistent.")
            self.parts.setdefault((layer, _EXPERT_PART[m[3]]), {})[expert] = tensor
            return ""
        if m := _STACKED.match(name):
            layer = int(m[1])
            self._check_layer(layer, name)
            if tensor.dim() != 3 or tensor.shape[0] != self.experts:
                raise UserError(f"{str(self.folder)!r} stacks {tuple(tensor.shape)[:1]} experts in {name!r}, but its "
                                f"config.json counts {self.experts}; the folder is inconsistent.")
            pre = f"layers.{layer}.feed_forward.experts."
            if m[2] == "gate_up_proj":
                gate, up = tensor.chunk(2, dim=1)
                self.stacked[pre + "w1"], self.stacked[pre + "w3"] = gate.transpose(1, 2), up.transpose(1, 2)
            else:
                self.stacked[pre + "w2"] = tensor.transpose(1, 2)
            return ""
        return None

    def _check_layer(self, layer: int, name: str) -> None:
        if not self.moe_layer(layer):
            raise UserError(f"{str(self.folder)!r} has an expert tensor {name!r} in layer {layer}, which its config.json "
                            f"makes dense; the folder is inconsistent.")

    def finish(self) -> dict:
        import torch

        out = dict(self.stacked)
        for (layer, part), by_expert in sorted(self.parts.items()):
            if sorted(by_expert) != list(range(self.experts)):
                missing = sorted(set(range(self.experts)) - set(by_expert))
                raise UserError(f"{str(self.folder)!r} has {len(by_expert)} of layer {layer}'s {self.experts} experts' "
                                f"{part} (expert {missing[0]} missing); the folder is inconsistent.")
            out[f"layers.{layer}.feed_forward.experts.{part}"] = torch.stack(
                [by_expert[e].t() for e in range(self.experts)]).contiguous()
        return out


def router_bias(cfg) -> dict:
    """The routers' balancing bias buffers (zero: an imported model routes by its scores alone)."""
    import torch

    return {f"layers.{i}.feed_forward.router.expert_bias": torch.zeros(cfg.moe_experts)
            for i in range(cfg.layers) if cfg.moe_layer(i)}
