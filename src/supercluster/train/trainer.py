"""The training loop: one process per rank, the same code for 1 rank or 1000.

`Trainer(cfg)` joins the process group that torchrun set up (or runs alone), builds the
model on a device mesh through `parallel.parallelize` (whole, or cut into pipeline stages
run by a torch schedule), resumes from the latest checkpoint in the run directory, and
`fit()` trains to `train.steps`, writing `metrics.jsonl` as it goes and leaving when to
checkpoint to a `CheckpointManager`, the bar to `Progress` and test faults to `Faults`.

Data: every rank of one data-parallel group (its tp, cp and pp ranks) draws the same
batch; context parallelism then keeps this rank's load-balanced chunks of each sequence.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from supercluster.data import BatchSampler, eval_batches, prepare_data
from supercluster.data.mixture import open_prepared, run_tokenizer_digest, uses_prepared
from supercluster.data.packing import packed_eval_batches
from supercluster.hardware.device import select_device
from supercluster.model.config import flops_per_token
from supercluster.model.moe import balance_step, set_aux_grad_scale
from supercluster.model.transformer import Transformer, materialize
from supercluster.model.weights import WEIGHTS_FILE, imported_tokenizer, load_weights
from supercluster.parallel import ParallelDims
from supercluster.parallel.context import SequenceSharding
from supercluster.parallel.parallelize import all_reduce_gradients, parallelize
from supercluster.parallel.pipeline import build_schedule, cross_entropy, split_model
from supercluster.train import checkpoint
from supercluster.train.checkpointing import CheckpointManager
from supercluster.train.config import Config, check_splits, layout_of, validate
from supercluster.train.faults import Faults
from supercluster.train.metrics import CollectiveBytes, MetricsLog, RankStats, device_peak, memory_gib
from supercluster.train.optim import build_optimizer, lr_at
from supercluster.train.packed import IGNORE, counted_targets, masked_loss, open_packed, packs
from supercluster.train.progress import Progress
from supercluster.hardware.device import resolve_precision


def init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "gloo" if device.type == "cpu" else f"cpu:gloo,{device.type}:{dist.Backend.default_device_backend_map.get(device.type, 'nccl')}"
        store = _restart_safe_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _restart_safe_store(world: int):
    """torchrun's store, under a prefix of its own for each restart of the workers.

    Workers restarted by torchrun (--max-restarts) share the agent's store with the attempt
    that died, and with torch 2.13 gloo then reads the dead workers' addresses from it and
    fails with "connectFullMesh ... Connection refused"; a prefix per attempt keeps them apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"supercluster/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = select_device()
        self.rank, self.world = init_distributed(self.device)
        self.model_cfg = validate(cfg)
        t = cfg.train
        self.dims = ParallelDims.of(layout_of(cfg, self.world), self.world, self.model_cfg, t.seq_len, t.global_batch,
                                    int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
        self.mesh = self.dims.build_mesh(self.device.type)
        self.run_dir = Path(cfg.run.dir)

        self.dp_mesh = self.dims.dp_mesh(self.mesh)
        dp_rank = self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0
        # Chat data and document masking: whole documents packed into rows, a loss on the targets that count.
        self.packed = open_packed(cfg, self.model_cfg.vocab_size, self.run_dir, dp_rank, self.dims.dp) if packs(cfg) else None
        self.prepared = self.packed is None and uses_prepared(cfg.data)
        if self.packed is not None:
            self.sampler = self.packed.train
        elif self.prepared:  # a prepared folder or a mixture of them: the run's tokenizer must be theirs
            self.data = open_prepared(cfg.data.path, cfg.data.mix, cfg.data.val_fraction, self.model_cfg.vocab_size,
                                      run_tokenizer_digest(self.run_dir))
            check_splits(cfg, self.data.train_tokens, self.data.val_tokens)
            self.sampler = self.data.sampler(t.seq_len, t.global_batch, dp_rank, self.dims.dp, cfg.data.seed)
        else:
            # An imported model reads text through its own tokenizer, whatever checkpoint it resumes from.
            self.data = prepare_data(cfg.data.path, self.model_cfg.vocab_size, val_fraction=cfg.data.val_fraction,
                                     max_mb=cfg.data.max_mb, tokenizer_path=imported_tokenizer(self.run_dir))
            check_splits(cfg, len(self.data.train), len(self.data.val))  # validation never reads training tokens
            self.sampler = BatchSampler(self.data.train, t.seq_len, t.global_batch, dp_rank, self.dims.dp, cfg.data.seed)
        self.dp_rank = dp_rank
        # Targets a loss mask leaves out (chat data, packed or inside a mixture): the loss of a step
        # is then the mean over the targets that count in the whole global batch, not per microbatch.
        self.masked = self.packed is not None or (self.prepared and any(s.mask is not None for s in self.data.train))
        # The ranks a loss is averaged over (data and context parallel), and the pipeline.
        self.loss_mesh = self.mesh["dp_cp"] if self.mesh is not None and self.dims.dp * self.dims.cp > 1 else None
        self.pp_mesh = self.mesh["pp"] if self.dims.pp > 1 else None
        cp_mesh = self.mesh["cp"] if self.dims.cp > 1 else None
        self.sequence = SequenceSharding(t.seq_len, self.device, cp_mesh)

        self.precision = resolve_precision(self.device, t.precision)
        torch.manual_seed(t.seed)
        with torch.device("meta"):
            model = Transformer(self.model_cfg)
        materialize(model, self.device)
        model.init_weights(seed=t.seed)  # same weights on every rank and in every layout
        self.imported_from = self._imported_weights()
        if self.imported_from is not None:  # fine-tuning an imported model: start from its weights
            load_weights(self.imported_from, model)
        # Positions are passed to the model by the sequence sharding when a rank holds only
        # part of a sequence (cp) or a pipeline stage's input is hidden states (pp).
        sequence = self.sequence if self.dims.cp > 1 or self.dims.pp > 1 else None
        self.schedule = None
        if self.dims.pp > 1:
            stages = split_model(model, self.dims, self.pp_mesh.get_local_rank())
            self.model_parts = [parallelize(part, self.dims, self.mesh, sequence, self.precision, t.compile)
                                for _, part in stages]
            ids = [sid for sid, _ in stages]
            self.has_first_stage, self.has_last_stage = 0 in ids, self.dims.num_stages - 1 in ids
            self.schedule = build_schedule(list(zip(ids, self.model_parts)), self.dims, self.pp_mesh, self.device,
                                           self.dims.microbatches(t.global_batch), cross_entropy)
        else:
            self.model_parts = [parallelize(model, self.dims, self.mesh, sequence, self.precision, t.compile)]
        self.replica_mesh = self.dims.replica_mesh(self.mesh)
        self.model = self.model_parts[0]
        self.optimizers = [build_optimizer(part, t, self.device) for part in self.model_parts]
        self.accum = self.dims.microbatches(t.global_batch)
        self.micro_batch = self.dims.microbatch
        self.tokens_per_step = t.global_batch * t.seq_len
        self.flops_per_token = flops_per_token(self.model_cfg, t.seq_len)
        self.peak = device_peak(self.device, self.precision)
        self.rank_stats = RankStats(self.world, self.rank, self.device, window=max(1, min(10, t.steps // 2)))
        self.faults = Faults(self.rank)
        self.comm_bytes = None
        # Background checkpoint writes get a process group of their own (gloo: DCP stages on the CPU).
        async_group = dist.new_group(backend="gloo") if t.async_checkpoint and self.world > 1 else None
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", t, self.model_parts, self.optimizers,
                                             self._train_state, async_group)
        self.step = 0
        self.resumed_from = None
        if cfg.run.resume and (found := self.checkpoints.resume()) is not None:
            state, self.resumed_from = found
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])

    def _train_state(self) -> dict:
        """What a checkpoint holds besides the weights and optimizer: where the data stream is."""
        return {"sampler": self.sampler.state_dict(), "tokens_seen": self.step * self.tokens_per_step}

    def _imported_weights(self) -> Path | None:
        """The run's imported weights file, when training starts from it (no checkpoint to resume)."""
        weights = self.run_dir / WEIGHTS_FILE
        if not weights.is_file():
            return None
        if self.cfg.run.resume and checkpoint.latest(self.run_dir / "checkpoints") is not None:
            return None  # the checkpoint is newer than the imported weights
        return weights

    # ---- one step ------------------------------------------------------------------

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_of(self, x, y, documents=None, denominator=None):
        """The mean loss of a microbatch; of packed rows (`denominator` given), their summed loss
        over it (see `train.packed.masked_loss`)."""
        with self._autocast():
            logits = self.model(x) if documents is None else self.model(x, documents=documents)
        return cross_entropy(logits, y) if denominator is None else masked_loss(logits, y, denominator)

    def _packed_denominator(self, y_all) -> torch.Tensor:
        """What each microbatch's summed loss of masked rows is divided by, so that the loss of the
        step is the mean over every counted target of the global batch, whichever rank and
        microbatch holds them (`train.packed.masked_loss`)."""
        group = self.loss_mesh.get_group() if self.loss_mesh is not None else None
        counted = counted_targets(y_all, group)
        self.tokens_counted = int(counted)
        return counted.clamp(min=1) / (self.loss_mesh.size() if self.loss_mesh is not None else 1)

    def _run_pipeline(self, x, y, train: bool) -> torch.Tensor:
        """The whole local batch through the schedule; the mean loss on the last stage, else 0."""
        losses = [] if self.has_last_stage else None
        target = y if self.has_last_stage else None
        args = (x,) if self.has_first_stage else ()
        with self._autocast():
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            else:
                self.schedule.eval(*args, target=target, losses=losses)
        if not self.has_last_stage:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.detach().float() for loss in losses]).mean()

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (mean loss, grad norm)."""
        t, tic = self.cfg.train, time.perf_counter()
        lr = lr_at(self.step, t)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        x_all, y_all, *documents = self.sampler.next()
        x_all, y_all = self.sequence.shard(x_all.to(self.device), y_all.to(self.device))
        # MoE: the auxiliary loss's gradient is scaled as the loss is (a schedule scales its own).
        set_aux_grad_scale(1.0 if self.schedule is not None else 1.0 / self.accum)
        if self.schedule is not None:
            total = self._run_pipeline(x_all, y_all, train=True)
        else:
            # Packed rows (chat data, document masking): their document ids; masked targets: their global count.
            docs = documents[0].to(self.device) if self.packed is not None and self.packed.isolate else None
            denominator = self._packed_denominator(y_all) if self.masked else None
            total = torch.zeros((), device=self.device)
            for i in range(self.accum):
                if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP: reduce once, after the last
                    self.model.set_requires_gradient_sync(i == self.accum - 1)
                sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
                loss = self.loss_of(x_all[sl], y_all[sl], None if docs is None else docs[sl], denominator)
                if denominator is None:
                    loss = loss / self.accum
                loss.backward()
                total += loss.detach()
        all_reduce_gradients(self.model_parts, self.replica_mesh)
        grad_norm = self._clip_gradients(t.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # MoE: expert load over the data-parallel ranks, the load-balancing bias update, metrics.
        self.moe_metrics = balance_step(self.model_parts, self.loss_mesh.get_group() if self.loss_mesh else None)
        self.step += 1
        if self.device.type != "cpu":
            torch.accelerator.synchronize()
        self.faults.after_step()
        self.rank_step_time = time.perf_counter() - tic  # before the loss's all-reduce lines every rank up
        return self._mean_loss(total), grad_norm

    def _clip_gradients(self, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient: over tp and dp shards (DTensor) and
        over pipeline stages (each rank holds only its stages' part of the sum)."""
        params = [p for part in self.model_parts for p in part.parameters() if p.grad is not None]
        # Gradients live on different meshes (tp-sharded, dp-sharded, both, or plain tensors
        # replicated on every rank without sequence parallelism): a norm per mesh, then combined.
        groups: dict = {}
        for p in params:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
        squares = []
        for group in groups.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
            squares.append((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).pow(2))
        norm = torch.stack(squares).sum().sqrt()
        if self.pp_mesh is not None:
            norm = norm.pow(2)
            dist.all_reduce(norm, group=self.pp_mesh.get_group())
            norm = norm.sqrt()
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
        return float(norm)

    def _mean_loss(self, value: torch.Tensor) -> float:
        """Each data/context-parallel rank holds the mean over its share of the tokens (all the
        same size): average them; under pipelining only the last stage has it, so sum over stages."""
        value = value.detach().clone()
        if self.loss_mesh is not None:
            dist.all_reduce(value, group=self.loss_mesh.get_group())
            value /= self.loss_mesh.size()
        if self.pp_mesh is not None:
            dist.all_reduce(value, group=self.pp_mesh.get_group())
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over `eval_batches` fixed global batches of the validation split."""
        t = self.cfg.train
        if self.packed is not None:
            return self._evaluate_packed()
        for part in self.model_parts:
            part.eval()
        if self.prepared:
            batches = self.data.eval_batches(t.seq_len, t.global_batch, t.eval_batches, self.dp_rank, self.dims.dp,
                                             self.cfg.data.seed + 1)
        else:
            batches = eval_batches(self.data.val, t.seq_len, t.global_batch, t.eval_batches, self.dp_rank, self.dims.dp,
                                   self.cfg.data.seed + 1)
        total, counted = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x, y in batches:
            x, y = self.sequence.shard(x.to(self.device), y.to(self.device))
            if self.schedule is not None:
                total += self._run_pipeline(x, y, train=False)
            else:
                for i in range(self.accum):
                    sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
                    if self.masked:  # summed, and divided once by the count of every rank's targets
                        total += self.loss_of(x[sl], y[sl], None, 1.0)
                        counted += (y[sl] != IGNORE).sum()
                    else:
                        total += self.loss_of(x[sl], y[sl]) / self.accum
        for part in self.model_parts:
            part.train()
        if self.masked and self.schedule is None:
            if self.loss_mesh is not None:
                dist.all_reduce(total, group=self.loss_mesh.get_group())
                dist.all_reduce(counted, group=self.loss_mesh.get_group())
            return float(total / counted.clamp(min=1))
        return self._mean_loss(total / t.eval_batches)

    @torch.no_grad()
    def _evaluate_packed(self) -> float:
        """Mean loss over every counted target of (up to `eval_batches` global batches of) the
        held-out documents, each document once."""
        self.model.eval()
        group = self.loss_mesh.get_group() if self.loss_mesh is not None else None
        total, counted = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for x, y, documents in packed_eval_batches(self.packed.val, self.cfg.train.eval_batches):
            x, y, documents = x.to(self.device), y.to(self.device), documents.to(self.device)
            total += self.loss_of(x, y, documents if self.packed.isolate else None, 1.0)
            counted += (y != IGNORE).sum()
        self.model.train()
        if group is not None:
            dist.all_reduce(total, group=group)
            dist.all_reduce(counted, group=group)
        return float(total / counted.clamp(min=1))

    # ---- the loop --------------------------------------------------------------------

    def _should_stop(self, started: float) -> bool:
        """Whether this step is the run's last: train.max_minutes ran out, or SIGTERM arrived
        (a preemption, a Slurm requeue, an operator): the run then checkpoints and stops."""
        limit = self.cfg.train.max_minutes
        over = limit is not None and time.perf_counter() - started > limit * 60
        flag = torch.tensor(float(over or self.stop_signal is not None))
        if self.world > 1:  # every rank must stop at the same step, or the collectives hang
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def _on_stop_signal(self, signum, _frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def fit(self) -> dict:
        t, rank0 = self.cfg.train, self.rank == 0
        log = MetricsLog(self.run_dir, enabled=rank0, tensorboard=t.tensorboard)
        progress = Progress(rank0, start=self.step, total=t.steps)
        started, last = time.perf_counter(), {}
        for part in self.model_parts:
            part.train()
        measure_comm_at = self.step + (2 if t.steps - self.step >= 2 else 1)  # the 2nd step: no warm-up in it
        stopping = False  # train.max_minutes ran out or SIGTERM came: this step is the run's last
        self.stop_signal = None
        in_main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
        previous = signal.signal(signal.SIGTERM, self._on_stop_signal) if in_main else None
        try:
            while self.step < t.steps and not stopping:
                self.faults.before_step(self.step)
                tic = time.perf_counter()
                if self.world > 1 and self.step + 1 == measure_comm_at:  # the counter slows that step
                    with CollectiveBytes() as counter:
                        loss, grad_norm = self.train_step()
                    self.comm_bytes = self._gather_comm(counter)
                else:
                    loss, grad_norm = self.train_step()
                if self.device.type != "cpu":
                    torch.accelerator.synchronize()
                step_time = time.perf_counter() - tic
                tokens_per_s = self.tokens_per_step / step_time
                mem = memory_gib(self.device)
                last = {
                    "step": self.step, "loss": loss, "lr": lr_at(self.step - 1, t),
                    "tokens_per_s": tokens_per_s,
                    "mfu": self.flops_per_token * tokens_per_s / (self.peak.tflops * 1e12 * self.world),
                    "mem_gib": mem, "step_time_s": step_time, "grad_norm": grad_norm,
                    **({"tokens_counted": self.tokens_counted} if self.masked and self.schedule is None else {}),
                    **self.rank_stats.gather(self.rank_step_time, mem), **self.moe_metrics,
                }
                if self.world > 1 and self.step == measure_comm_at:
                    last.update(self.comm_bytes, comm_measured=True)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}")
                stopping = self._should_stop(started)
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps or stopping):
                    last["val_loss"] = self.evaluate()
                log.write(last)
                progress.update(last)
                self.checkpoints.step_done(self.step, last=stopping or self.step == t.steps)
            self.checkpoints.close(self.step)  # also a run resumed at its last step ends committed
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
            progress.close()
            log.close()
        if self.stop_signal is not None:
            last["stopped_by"] = self.stop_signal
        return {**last, **(self.comm_bytes or {}), "peak_source": self.peak.source, "precision": self.precision,
                "world_size": self.world, "layout": self.dims.layout.describe(),
                "stage_layers": list(self.dims.layout.split(self.model_cfg)) if self.dims.pp > 1 else None}

    def _gather_comm(self, counter: CollectiveBytes) -> dict:
        """Bytes per collective kind in one step: this rank's (rank 0 logs them) and the world's sum."""
        mine = {"bytes": counter.bytes, "calls": counter.calls}
        everyone = [mine] * self.world
        if self.world > 1:
            dist.all_gather_object(everyone, mine)
        world: dict[str, int] = {}
        for entry in everyone:
            for kind, size in entry["bytes"].items():
                world[kind] = world.get(kind, 0) + size
        return {"comm_bytes": mine["bytes"], "comm_calls": mine["calls"], "comm_bytes_world": dict(sorted(world.items()))}

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
