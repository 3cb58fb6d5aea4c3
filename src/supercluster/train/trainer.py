"""The training loop: one process per rank, the same code for 1 rank or 1000.

`Trainer(cfg)` joins the process group that torchrun set up (or runs alone), builds the
model on a device mesh through `parallel.parallelize`, resumes from the latest checkpoint
in the run directory, and `fit()` trains to `train.steps`, writing `metrics.jsonl` and
checkpoints as it goes.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from supercluster.data import BatchSampler, prepare_data
from supercluster.model.config import flops_per_token
from supercluster.model.transformer import Transformer
from supercluster.parallel import ParallelDims
from supercluster.parallel.parallelize import parallelize
from supercluster.train import checkpoint
from supercluster.train.config import Config, validate
from supercluster.train.metrics import MetricsLog, device_peak, memory_gib
from supercluster.train.optim import build_optimizer, lr_at


def pick_device() -> torch.device:
    """The local accelerator for this rank (CUDA, ROCm, XPU...), or the CPU."""
    if torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.accelerator.device_count()
        torch.accelerator.set_device_index(index)
        return torch.device(acc.type, index)
    return torch.device("cpu")


def resolve_precision(device: torch.device, requested: str) -> str:
    """bf16 where the device runs it faster than fp32, else fp32 (CPUs without AVX-512 BF16
    emulate bf16 matmuls at a small fraction of fp32 speed, so the CPU is measured)."""
    if requested != "auto":
        return requested
    if device.type == "cpu":
        from supercluster.hardware.local import bf16_speedup

        return "bf16" if bf16_speedup() > 1.2 else "fp32"
    return "bf16"


def init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "gloo" if device.type == "cpu" else f"cpu:gloo,{device.type}:{dist.Backend.default_device_backend_map.get(device.type, 'nccl')}"
        dist.init_process_group(backend=backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = pick_device()
        self.rank, self.world = init_distributed(self.device)
        self.model_cfg = validate(cfg, self.world)
        self.dims = ParallelDims.from_config(cfg.parallel, self.world)
        self.dims.validate_model(self.model_cfg, cfg.train)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.run_dir = Path(cfg.run.dir)
        t = cfg.train

        self.dp_mesh = self.dims.dp_mesh(self.mesh)
        dp_rank = self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0
        self.data = prepare_data(cfg.data.path, self.model_cfg.vocab_size, val_fraction=cfg.data.val_fraction,
                                 max_mb=cfg.data.max_mb)
        self.sampler = BatchSampler(self.data.train, t.seq_len, t.global_batch, dp_rank, self.dims.dp, cfg.data.seed)
        self.val_data = self.data.val if len(self.data.val) > t.seq_len + 1 else self.data.train
        self.dp_rank = dp_rank

        self.precision = resolve_precision(self.device, t.precision)
        torch.manual_seed(t.seed)
        with torch.device("meta"):
            model = Transformer(self.model_cfg)
        model.to_empty(device=self.device)
        model.init_weights(seed=t.seed)  # same weights on every rank and in every layout
        self.model = parallelize(model, self.dims, self.mesh, t)
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.accum = t.global_batch // (self.dims.dp * t.micro_batch)
        self.tokens_per_step = t.global_batch * t.seq_len
        self.flops_per_token = flops_per_token(self.model_cfg, t.seq_len)
        self.peak = device_peak(self.device, self.precision)
        self.step = 0
        self.resumed_from = None
        self._resume()

    # ---- state ---------------------------------------------------------------------

    def _resume(self):
        if not self.cfg.run.resume:
            return
        found = checkpoint.latest(self.run_dir / "checkpoints")
        if found is None:
            return
        state = checkpoint.load(found[1], self.model, self.optimizer)
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.resumed_from = found[1]

    def save_checkpoint(self):
        checkpoint.save(self.run_dir / "checkpoints", self.step, self.model, self.optimizer,
                        {"sampler": self.sampler.state_dict(), "tokens_seen": self.step * self.tokens_per_step},
                        keep=self.cfg.train.keep_checkpoints)

    # ---- one step ------------------------------------------------------------------

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_of(self, x, y):
        with self._autocast():
            logits = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (mean loss, grad norm)."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, t)
        x_all, y_all = self.sampler.next()
        x_all, y_all = x_all.to(self.device), y_all.to(self.device)
        total = torch.zeros((), device=self.device)
        for i in range(self.accum):
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP: reduce once, after the last
                self.model.set_requires_gradient_sync(i == self.accum - 1)
            sl = slice(i * t.micro_batch, (i + 1) * t.micro_batch)
            loss = self.loss_of(x_all[sl], y_all[sl]) / self.accum
            loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._mean_over_dp(total), float(grad_norm)

    def _mean_over_dp(self, value: torch.Tensor) -> float:
        """Each data-parallel rank holds the mean over its shard of the batch; average them."""
        if self.dp_mesh is not None:
            value = value.clone()
            dist.all_reduce(value, group=self.dp_mesh.get_group())
            value /= self.dims.dp
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.cfg.train
        self.model.eval()
        val = BatchSampler(self.val_data, t.seq_len, t.global_batch, self.dp_rank, self.dims.dp, self.cfg.data.seed + 1)
        total = torch.zeros((), device=self.device)
        for _ in range(t.eval_batches):
            x, y = val.next()
            total += self.loss_of(x[: t.micro_batch].to(self.device), y[: t.micro_batch].to(self.device))
        self.model.train()
        return self._mean_over_dp(total / t.eval_batches)

    # ---- the loop --------------------------------------------------------------------

    def _should_stop(self, started: float) -> bool:
        limit = self.cfg.train.max_minutes
        if limit is None:
            return False
        over = torch.tensor(float(time.perf_counter() - started > limit * 60))
        if self.world > 1:  # every rank must stop at the same step, or the collectives hang
            dist.all_reduce(over, op=dist.ReduceOp.MAX)
        return bool(over)

    def fit(self) -> dict:
        t, rank0 = self.cfg.train, self.rank == 0
        log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=rank0)
        progress = Progress(rank0, start=self.step, total=t.steps)
        started, last = time.perf_counter(), {}
        self.model.train()
        try:
            while self.step < t.steps and not self._should_stop(started):
                tic = time.perf_counter()
                loss, grad_norm = self.train_step()
                if self.device.type != "cpu":
                    torch.accelerator.synchronize()
                step_time = time.perf_counter() - tic
                tokens_per_s = self.tokens_per_step / step_time
                last = {
                    "step": self.step, "loss": loss, "lr": lr_at(self.step - 1, t),
                    "tokens_per_s": tokens_per_s,
                    "mfu": self.flops_per_token * tokens_per_s / (self.peak.tflops * 1e12 * self.world),
                    "mem_gib": memory_gib(self.device), "step_time_s": step_time, "grad_norm": grad_norm,
                }
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}")
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    last["val_loss"] = self.evaluate()
                log.write(last)
                progress.update(last)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.step and (not t.checkpoint_every or self.step % t.checkpoint_every):
                self.save_checkpoint()  # the end of a run is always resumable and sampleable
        finally:
            progress.close()
            log.close()
        return {**last, "peak_source": self.peak.source, "precision": self.precision, "world_size": self.world}

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()


class Progress:
    """A live bar on a terminal; a plain line every few steps in logs (Slurm, CI)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled, self.total, self.bar = enabled, total, None
        self.every = max(1, total // 20)
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, m: dict):
        if not self.enabled:
            return
        info = f"loss {m['loss']:.3f}  {m['tokens_per_s']:,.0f} tok/s  MFU {100 * m['mfu']:.1f}%"
        if "val_loss" in m:
            info += f"  val {m['val_loss']:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=m["step"], info=info)
        elif m["step"] % self.every == 0 or m["step"] == self.total or "val_loss" in m:
            print(f"step {m['step']:>6}/{self.total}  {info}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
