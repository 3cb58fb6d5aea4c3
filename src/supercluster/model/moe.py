"""The Mixture-of-Experts feed-forward: router, experts, load balancing.

- Router: scores in fp32 (softmax, Mixtral/Qwen3; or sigmoid, DeepSeek-V3) from a bias-free
  linear; optionally group-limited (experts in `moe_groups` groups, each token's top-k drawn
  from its best `moe_topk_groups` groups); the chosen scores renormalised and scaled.
- Load balancing both ways the field uses: the auxiliary loss (Switch Transformer's
  E * sum_i f_i * P_i, times `moe_aux_loss_coef`), whose gradient is attached to the block's
  output so the training loss and every pipeline schedule stay as they are; and DeepSeek-V3's
  auxiliary-loss-free bias, a per-expert buffer added to the scores only to choose experts, which
  `balance_step` moves after each optimizer step from the step's token counts.
- Experts: stacked 3-D weights w1, w3 [E, hidden, width], w2 [E, width, hidden] run by one
  `torch._grouped_mm` over the tokens sorted by expert where this device and dtype run it (probed
  once at run time) and it pays (not fp32 on CPU, where the loop measured faster), else a loop
  over experts (the reference path).
- Shared experts (DeepSeek) see every token: one dense SwiGLU of `shared * width`.

Expert parallelism (`parallel.experts`) sets `dispatcher` on a layer: it sends each token to
the rank holding its expert and back, around the same grouped matmul.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from supercluster.model.config import ModelConfig


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (CPU in torch 2.9+ wants 16-byte
    aligned rows; some GPUs and dtypes have no kernel), checked on a tiny case against the loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Its own saved-tensor hooks: probed first inside a checkpointed block, its tensors would
    # otherwise count as the block's, and the recomputation (probe cached) would save fewer.
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return _probe_grouped_mm(device_type, dtype)
    except (RuntimeError, NotImplementedError):
        return False


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    with torch.enable_grad():
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(6, 16, generator=gen).to(device_type, dtype).requires_grad_()
        b = torch.randn(2, 16, 8, generator=gen).to(device_type, dtype).requires_grad_()
        out = torch._grouped_mm(a, b, offs=torch.tensor([2, 6], dtype=torch.int32, device=device_type))
        out.float().square().sum().backward()
        ref = torch.cat([a[:2] @ b[0], a[2:] @ b[1]])
        return bool(torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2)) and a.grad is not None


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0 for t in tensors)


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor | None,
                  grouped: bool) -> torch.Tensor:
    """Rows of x [n, a] sorted by expert (counts [E] of them each) times their expert's w [E, a, b]."""
    if grouped and offsets is not None and _aligned(x, w):
        out = torch._grouped_mm(x, w, offs=offsets)
        if out.requires_grad:  # its backward wants a dense gradient (a sum's is expanded)
            out.register_hook(lambda g: g.contiguous())
        return out
    parts = torch.split(x, counts.tolist())
    return torch.cat([part @ w[e] for e, part in enumerate(parts)]) if parts else x.new_zeros(0, w.shape[-1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights (parameter dim 0 is the expert: what ep shards)."""

    def __init__(self, experts: int, hidden: int, width: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, hidden, width))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, width))
        self.w2 = nn.Parameter(torch.empty(experts, width, hidden))
        # None: grouped_mm where it works and pays (bench/moe.py on AVX-512 EPYC: fp32 grouped_mm on CPU
        # ran 1.3-3.5x slower than the loop, bf16 1.2-12x faster); True: wherever it works; False: the loop
        self.use_grouped_mm: bool | None = None
        self.grad_scale = 1.0  # expert parallelism: 1/ep (parallel.experts explains why)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, hidden] sorted by (local) expert, counts [local experts] rows each."""
        w1, w3, w2 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w3, self.w2))
        if self.grad_scale != 1.0:
            w1, w3, w2 = (_ScaleGrad.apply(w, self.grad_scale) for w in (w1, w3, w2))
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover grouped_mm: cast here
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w1, w3, w2 = (w.to(x.dtype) for w in (w1, w3, w2))
        wanted = self.use_grouped_mm if self.use_grouped_mm is not None else not (
            x.device.type == "cpu" and x.dtype == torch.float32)
        grouped = wanted and grouped_mm_works(x.device.type, x.dtype)
        offsets = torch.cumsum(counts, 0).to(torch.int32) if grouped else None
        h = F.silu(expert_matmul(x, w1, counts, offsets, grouped)) * expert_matmul(x, w3, counts, offsets, grouped)
        return expert_matmul(h, w2, counts, offsets, grouped)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden, cfg.moe_experts, bias=False)
        # Auxiliary-loss-free balancing: added to the scores only to choose experts.
        self.register_buffer("expert_bias", torch.zeros(cfg.moe_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        """x [T, hidden] -> (weights [T, k] fp32, experts [T, k], scores [T, E] fp32)."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            logits = F.linear(x.float(), self.gate.weight.float())
        scores = torch.sigmoid(logits) if cfg.moe_router == "sigmoid" else torch.softmax(logits, dim=-1)
        choose = scores.detach() + self.expert_bias if cfg.moe_bias_update_rate > 0 else scores.detach()
        if cfg.moe_groups > 1:
            grouped = choose.view(x.shape[0], cfg.moe_groups, -1)
            # DeepSeek-V3 rates a group by its best two scores; one expert per group: its best.
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_score.topk(cfg.moe_topk_groups, dim=-1).indices
            mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            choose = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
        experts = choose.topk(cfg.moe_top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if cfg.moe_norm_topk and cfg.moe_top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if cfg.moe_router == "sigmoid" else 0))
        return weights * cfg.moe_route_scale, experts, scores


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the block's output whose backward also starts the auxiliary loss's gradient
    (scaled as the training loss is), so the loss the trainer sees needs no extra term."""

    @staticmethod
    def forward(ctx, out, aux):
        ctx.save_for_backward(aux)
        return out

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, MoE.aux_grad_scale)


class MoE(nn.Module):
    # Gradient scale of the auxiliary loss: the trainer sets it to its loss's (1/microbatches
    # in a plain loop; 1 under a pipeline schedule, which scales gradients itself).
    aux_grad_scale: float = 1.0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.moe_experts, cfg.hidden, cfg.moe_hidden)
        width = cfg.moe_shared_experts * cfg.moe_hidden
        self.shared = None
        if cfg.moe_shared_experts:
            self.shared = nn.ModuleDict({"w1": nn.Linear(cfg.hidden, width, bias=False),
                                         "w2": nn.Linear(width, cfg.hidden, bias=False),
                                         "w3": nn.Linear(cfg.hidden, width, bias=False)})
        self.dispatcher = None  # parallel.experts.ExpertDispatcher under expert parallelism
        # Tokens per expert since the last balance_step (this rank's), and the aux loss summed over
        # the microbatches (and pipeline stages' calls) since then, with their count: the metric
        # is the step's mean, not whichever microbatch came last.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.moe_experts), persistent=False)
        self.aux_loss_sum, self.aux_loss_calls = torch.zeros(()), 0

    def fuse_projections(self) -> None:
        """Serving's fused layout is for dense blocks; experts keep theirs."""

    def reset_buffers(self) -> None:
        self.router.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, scores = self.router(x)
        k, n_experts = experts.shape[1], scores.shape[1]
        flat = experts.flatten()
        counts = torch.bincount(flat, minlength=n_experts)
        if self.training:  # the load the bias update and the metrics follow: training tokens only
            with torch.no_grad():
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        order = torch.argsort(flat, stable=True)
        rows = order // k
        routed = x[rows]
        if self.dispatcher is not None:
            out = self.dispatcher(routed, counts, self.experts)
        else:
            out = self.experts(routed, counts)
        out = out.float() * weights.flatten()[order, None]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, rows, out).to(x.dtype)
        if self.shared is not None:
            s = self.shared
            y = y + s["w2"](F.silu(s["w1"](x)) * s["w3"](x))
        y = y.view(shape)
        if self.cfg.moe_aux_loss_coef > 0:
            aux = self.aux_loss(scores, counts, k)
            if self.training and torch.is_grad_enabled():
                self.aux_loss_sum = self.aux_loss_sum.to(aux.device) + aux.detach()  # no device sync per call
                self.aux_loss_calls += 1
                y = _AttachAuxLoss.apply(y, aux)
        return y

    def aux_loss(self, scores: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
        """Switch Transformer's balance loss: E * sum_i (share of routed tokens_i) * (mean score_i)."""
        probs = scores if self.cfg.moe_router == "softmax" else scores / scores.sum(-1, keepdim=True)
        share = counts.float() / (scores.shape[0] * k)
        return self.cfg.moe_aux_loss_coef * scores.shape[1] * (share * probs.mean(0)).sum()


def moe_layers(parts) -> list[tuple[str, MoE]]:
    """(layer name, MoE) of every MoE feed-forward in these model parts."""
    return [(name, m) for part in parts for name, m in part.named_modules() if isinstance(m, MoE)]


def set_aux_grad_scale(scale: float) -> None:
    MoE.aux_grad_scale = scale


@torch.no_grad()
def balance_step(parts, group=None) -> dict:
    """After an optimizer step: each MoE layer's load (max and mean tokens per expert, summed over
    `group`, the data-parallel ranks), the auxiliary-loss-free bias update (bias += rate *
    sign(mean - load): underused experts get chosen more), and the metrics to log."""
    layers = moe_layers(parts)
    if not layers:
        return {}
    counts = torch.stack([m.tokens_per_expert for _, m in layers])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=group)
    out, aux, bias = {}, [], []
    for (name, m), load in zip(layers, counts):
        key = name.split(".")[1] if name.startswith("layers.") else (name or "0")  # the layer number
        mean = load.mean()
        out[f"moe_load_max_over_mean/{key}"] = float(load.max() / mean) if mean > 0 else 0.0
        rate = m.cfg.moe_bias_update_rate
        if rate > 0:
            m.router.expert_bias += rate * torch.sign(mean - load)
            bias.append(float(m.router.expert_bias.abs().max()))
        if m.aux_loss_calls:
            aux.append(float(m.aux_loss_sum) / m.aux_loss_calls)
        m.tokens_per_expert.zero_()
        m.aux_loss_sum, m.aux_loss_calls = torch.zeros(()), 0
    if aux:
        out["moe_aux_loss"] = sum(aux) / len(aux)
    if bias:
        out["moe_bias_abs_max"] = max(bias)
    return out
