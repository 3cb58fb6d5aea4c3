"""The inference engine: a run directory's model, its paged KV cache, and a step loop that
runs every scheduled sequence's new tokens in one forward pass.

The loop lives in a thread of its own; callers (the HTTP API, the terminal chat) submit
requests and receive events through a callback: {"token": id, "text": delta, "logprob": ...}
as tokens arrive, then {"finish_reason": ...}. `abort` stops a request at the next step and
frees its blocks, also in the middle of its prefill.

A runner (`serve/runner.py`) runs each step's forward pass: in this process, or with `tp` > 1
split tensor-parallel over that many CPU processes (`serve/tensor_parallel.py`); scheduling and
sampling stay here either way.

With `speculate` > 0 a greedy sequence's step also carries up to that many draft tokens found by
prompt lookup (`serve/speculative.py`); the step's logits at each draft position decide how many
are kept (`_emit`), so the output is the one decoding a token at a time gives.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections import deque
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from supercluster.errors import UserError
from supercluster.serve.config import EngineConfig
from supercluster.serve.kv_cache import PagedKVCache
from supercluster.serve.quantize import quantize, weight_format
from supercluster.serve.runner import LocalRunner, StepBatch
from supercluster.serve.sampling import Sampled, SamplingParams, is_plain_greedy, sample
from supercluster.serve.scheduler import Scheduler, Sequence
from supercluster.serve.speculative import PromptLookup
from supercluster.serve.structured import Constraint, Grammars
from supercluster.serve.tensor_parallel import TensorParallelRunner, check_tp
from supercluster.serve.tokens import Detokenizer, TokenText

# bf16 replaces fp32 only when its best step time is under this share of fp32's: a 10% win is
# beyond the noise of a busy CPU, and the rounding costs answers their fp32 log-probabilities.
BF16_MARGIN = 0.9


@dataclass
class Stats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    draft_tokens: int = 0  # speculative decoding: tokens proposed and verified
    accepted_tokens: int = 0  # of which the model chose the same (emitted without a step of their own)
    # Drained by the metrics exporter; bounded, so a server nobody scrapes does not grow forever.
    ttft_s: deque = field(default_factory=lambda: deque(maxlen=10_000))
    tpot_s: deque = field(default_factory=lambda: deque(maxlen=10_000))


class Engine:
    def __init__(self, run_dir: Path, config: EngineConfig | None = None):
        from supercluster.hardware.device import select_device
        from supercluster.serve.tokens import load_chat, load_tokenizer_and_specials
        from supercluster.train.sample import load_trained

        self.config = (config or EngineConfig()).check()  # before the model loads: a typo fails in a second
        run_dir = Path(run_dir)
        # Tensor-parallel ranks are local CPU processes joined by gloo.
        self.device = select_device() if self.config.tp == 1 else torch.device("cpu")
        # bf16 as training runs it: fp32 weights and residual stream, matmuls in bf16 under autocast
        # (its weight-cast cache lives as long as the engine's loop, so weights are cast once). A
        # model cast to bf16 whole loses small updates to the residual stream's large outlier
        # features (SmolLM2's reach 2.5e4, where bf16 steps by 128) and stops answering right.
        self.model = load_trained(run_dir).to(self.device).eval()
        self.cfg = self.model.cfg
        # The run's own files are checked before the slow steps (quantizing, a first kernel build).
        self.tokenizer, self.eos_ids = load_tokenizer_and_specials(run_dir)
        self.chat = load_chat(run_dir, self.tokenizer)
        self.token_text = TokenText(self.tokenizer, self.cfg.vocab_size)
        check_tp(self.config.tp, self.cfg.heads, self.cfg.kv_heads)
        if self.config.tp > 1 and (self.cfg.is_moe or (self.cfg.qk_norm and not self.cfg.qk_norm_per_head)):
            # the split shards matrices by name, not experts; a norm over all heads would see a rank's share only
            raise UserError(f"{str(run_dir)!r} is a {'Mixture-of-Experts' if self.cfg.is_moe else 'whole-projection qk-norm'} "
                            f"model, which serves on one rank; drop --tp.")
        if self.config.tp == 1:  # the tensor-parallel split shards q, k, v (and gate, up) one by one
            self.model = quantize(self.model.fuse_projections(), self.config.quantize)
        # what "auto" became: int4 for a model whose matrices are 4-bit blocks already, else none
        self.quantize = weight_format(self.model)
        # bf16 from this many tokens a step on (None: never, or always when precision is bf16)
        self.bf16_from_tokens: int | None = None
        if self.config.precision != "auto":
            self.precision = self.config.precision
        elif self.quantize.startswith("int4"):  # its kernel computes in integers: bf16 would only add casts
            self.precision = "fp32"
        else:
            self.precision, self.bf16_from_tokens = self._faster_precision(batched=self.config.tp == 1)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        # The KV cache's element type. A decode step of many sequences reads all of their contexts at
        # every layer and is bound by memory there, so int4 keeps fp16 keys and values, as llama.cpp
        # does by default (the attention kernel computes in fp32 from them).
        self.kv_dtype = torch.float16 if self.quantize.startswith("int4") else self.dtype
        self._grammars: Grammars | None = None  # built at the first constrained request (a second or two)
        self._grammars_lock = threading.Lock()
        self.name = run_dir.name
        # Sized for all of the heads: under tensor parallelism the ranks share kv_cache_gib between them.
        blocks = self.config.num_blocks or PagedKVCache.blocks_for_budget(
            self.config.kv_cache_gib, self.cfg.layers, self.config.block_size, self.cfg.kv_heads, self.cfg.head_dim, self.kv_dtype)
        if self.config.tp == 1:
            self.runner = LocalRunner(self.model, PagedKVCache(self.cfg.layers, blocks, self.config.block_size,
                                                               self.cfg.kv_heads, self.cfg.head_dim, self.kv_dtype, self.device),
                                      self.device)
        else:
            self.runner = TensorParallelRunner(self.model, run_dir, self.config.tp, blocks, self.config.block_size,
                                               self.precision == "bf16")
        self.cache = self.runner.cache
        self.scheduler = Scheduler(self.cache.pool, self.config.block_size, self.config.max_running,
                                   self.config.max_step_tokens, self._propose if self.config.speculate else None)
        self.stats = Stats()
        self._lock = threading.Condition()
        self._inbox: list[Sequence] = []
        self._calls: list[tuple[object, concurrent.futures.Future]] = []  # work run between steps
        self._aborts: set[str] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @torch.inference_mode()
    def _faster_precision(self, batched: bool = True, rows: int = 16, repeats: int = 5) -> tuple[str, int | None]:
        """bf16 on accelerators; on a CPU whichever runs this model's steps faster: a decode step
        of one sequence (one row through every matrix) and, where `batched`, one of `rows`
        sequences. CPUs whose bf16 kernels win on many rows can lose on one, where a step just
        reads the weights: then steps of `rows` tokens or more run in bf16 and smaller ones in
        fp32 ("fp32", rows). The trainer's square-matmul probe is no guide to either.
        fp32 stays unless bf16 wins clearly (BF16_MARGIN, on the best of bursts taken in turn):
        on a busy machine a close race is decided by the noise, and the same model would then
        answer with other log-probabilities from one start to the next."""
        if self.device.type != "cpu":
            return "bf16", None

        def bf16_wins(tokens: int) -> bool:
            x = torch.zeros((1, tokens), dtype=torch.long, device=self.device)
            positions = torch.arange(tokens, device=self.device)
            best = {False: float("inf"), True: float("inf")}
            for _ in range(repeats):
                for bf16 in (False, True):  # in turn, so that load drifting on the machine hits both
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        start = time.perf_counter()
                        self.model(x, positions, logits_index=positions)
                        best[bf16] = min(best[bf16], time.perf_counter() - start)
            return best[True] < BF16_MARGIN * best[False]

        if bf16_wins(1):
            return "bf16", None
        if batched and bf16_wins(rows):
            return "fp32", rows
        return "fp32", None

    def describe_precision(self) -> str:
        weights = f"{self.quantize} weights, " if self.quantize != "none" else ""
        return weights + self.precision + (f", bf16 from {self.bf16_from_tokens} tokens a step" if self.bf16_from_tokens else "")

    # ---- requests --------------------------------------------------------------------------

    @property
    def max_len(self) -> int:
        return self.cfg.max_seq_len

    @property
    def room(self) -> int:
        """Tokens (prompt and output) one request may hold: the model's context, or the whole KV cache if smaller."""
        return min(self.max_len, self.cache.pool.num_blocks * self.config.block_size)

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        self.check_prompt(prompt, params.max_tokens)

    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        """A prompt and its max_tokens fit this model and this server (UserError naming the limit)."""
        if not prompt:
            raise UserError("The prompt is empty; give at least one token.")
        if max(prompt) >= self.cfg.vocab_size or min(prompt) < 0:
            raise UserError(f"Token ids must be in 0..{self.cfg.vocab_size - 1}.")
        if len(prompt) + max_tokens > self.max_len:
            raise UserError(f"The prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is beyond this "
                            f"model's context of {self.max_len} tokens; shorten the prompt or lower max_tokens.")
        # Beyond the whole pool it could never run: it would preempt itself and start over forever.
        if len(prompt) + max_tokens > self.room:
            raise UserError(f"The prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is beyond this "
                            f"server's whole KV cache of {self.room} tokens ({self.cache.pool.num_blocks} blocks of "
                            f"{self.config.block_size}); shorten the prompt or lower max_tokens.")

    @property
    def grammars(self) -> Grammars:
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.token_text, self.eos_ids)
            return self._grammars

    def compile(self, constraint: Constraint):
        """A constraint's compiled grammar, for SamplingParams.constraint (UserError when invalid)."""
        return self.grammars.compile(constraint)

    def call(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the engine's thread between two steps (its precision, no race with a step)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first,
        which nothing predicts), with the `top` most likely there: what `echo` with `logprobs`
        returns. One forward pass of the model over the ids, on the engine's thread."""
        ids = torch.tensor(prompt, device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        logits = self.model(ids[None], positions, logits_index=positions)[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        chosen = logprobs.gather(1, ids[1:, None])[:, 0].tolist()
        if top:
            values, where = torch.topk(logprobs, top, dim=-1)
            tops = [list(zip(w, v)) for w, v in zip(where.tolist(), values.tolist())]
        else:
            tops = [[] for _ in chosen]
        return [None] + list(zip(chosen, tops))

    def waiting(self) -> int:
        with self._lock:
            return len(self.scheduler.waiting) + len(self._inbox)

    def submit(self, prompt: list[int], params: SamplingParams, emit) -> str:
        """Queue a request; `emit(event)` is called from the engine thread. Returns its id."""
        self.check_request(prompt, params)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(uuid.uuid4().hex, list(prompt), params, emit, generator)
        seq.detokenizer = Detokenizer(self.tokenizer, seq.prompt)
        if params.constraint is not None:
            seq.matcher = self.grammars.matcher(params.constraint)
        with self._lock:
            self.stats.prompt_tokens += len(prompt)
            self._inbox.append(seq)
            self._lock.notify()
        return seq.id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
            self._lock.notify()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10)
        self.runner.close()

    # ---- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        # One autocast region for the loop's life, so each weight is cast to bf16 once, not every step.
        bf16 = self.precision == "bf16" or self.bf16_from_tokens is not None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            self._serve_forever()

    def _serve_forever(self) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self._calls or self.scheduler.running or self.scheduler.waiting
                           or self._stopping):
                    self._lock.wait()
                if self._stopping:
                    return
                calls, self._calls = self._calls, []
                for seq in self._inbox:
                    self.scheduler.add(seq)
                self._inbox.clear()
                aborts, self._aborts = self._aborts, set()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as err:
                        future.set_exception(err)
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                if seq.id in aborts:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"
            try:
                self.step()
            except Exception as err:  # a bug must not hang every client: fail what was running
                for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                    self.scheduler.finish(seq)
                    seq.emit({"error": f"{type(err).__name__}: {err}"})

    @torch.inference_mode()
    def step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch:
            return
        step = StepBatch([], [], [])
        for seq, count in batch:
            step.tokens += seq.tokens[seq.computed:seq.computed + count - len(seq.draft)] + seq.draft
            step.seqs.append((seq.computed, count, seq.blocks))
            step.logits.append(1 + len(seq.draft))
        small = self.bf16_from_tokens is not None and len(step.tokens) < self.bf16_from_tokens
        with torch.autocast(self.device.type, enabled=False) if small else contextlib.nullcontext():
            logits = self.runner.run(step)
        now = time.monotonic()
        first_row = [0]  # each sequence's first row of logits: a verifying one has a row per draft token too
        for rows in step.logits:
            first_row.append(first_row[-1] + rows)
        # Constrained rows that sample this step get their grammar's mask, in place, before any
        # argmax or sampling: they share the step with the free ones (and are never drafted for).
        constrained = [(first_row[i], seq.matcher) for i, (seq, count) in enumerate(batch)
                       if seq.matcher is not None and seq.computed + count >= len(seq.tokens)]
        if constrained:
            logits = logits.float()
            self.grammars.mask(logits, constrained)
        # Plain greedy requests (the usual benchmark and tool-calling case) take one argmax over
        # the whole batch instead of a sampling call each.
        greedy = logits.argmax(dim=-1).tolist() if any(is_plain_greedy(seq.params) for seq, _ in batch) else None
        outbox: list[tuple[object, dict]] = []
        for i, (seq, count) in enumerate(batch):
            draft, seq.draft = seq.draft, []
            seq.computed += count - len(draft)
            self.scheduler.publish_full_blocks(seq)
            if seq.computed < len(seq.tokens):
                continue  # a prefill chunk: more of the prompt to go
            rows = slice(first_row[i], first_row[i + 1])
            self._emit(seq, draft, logits[rows], greedy and greedy[rows], now, outbox)
        # The step's events leave together, after its work: a listener woken by the first (the
        # API's event loop) finds them all at once instead of taking the CPU once per sequence.
        for emit, event in outbox:
            emit(event)

    # ---- speculative decoding --------------------------------------------------------------------

    def _propose(self, seq: Sequence, most: int) -> list[int]:
        """Draft tokens for `seq`'s step (the scheduler's `propose`). Only greedy requests are
        drafted for: their verification is an exact comparison. A sampled request would need
        rejection sampling to keep its distribution, and a constrained one a grammar mask per
        draft position; they decode a token a step. Drafts stop where max_tokens would."""
        p = seq.params
        k = min(most, p.max_tokens - len(seq.output) - 1)
        if p.temperature > 0 or seq.matcher is not None or k <= 0:
            return []
        if seq.lookup is None:
            seq.lookup = PromptLookup(self.config.speculate)
        return seq.lookup.propose(seq.tokens, k)

    def _emit(self, seq: Sequence, draft: list[int], rows: torch.Tensor, greedy: list[int] | None,
              now: float, outbox: list) -> None:
        """Emit the token the model chooses at each of the sequence's rows of the step while they
        equal its draft (row j follows draft[j - 1]), then the first one that does not, or the one
        after the whole draft: without a draft the one token of its step; with one, one to
        len(draft) + 1 tokens, each as decoding alone would have chosen it (logprobs and
        penalties included, from the same rows). A stop, EOS or max_tokens ends the run there,
        and the cache keeps the accepted drafts and forgets the rest."""
        computed, accepted = seq.computed, 0
        for j, row in enumerate(rows):
            drawn = Sampled(greedy[j]) if greedy and is_plain_greedy(seq.params) else sample(row, seq.params, seq.output, seq.generator, seq.prompt)
            self._append(seq, drawn, now, outbox)
            hit = j < len(draft) and drawn.token == draft[j]
            accepted += hit
            if not hit or seq.finish_reason is not None:
                break
        if draft:
            self.stats.draft_tokens += len(draft)
            self.stats.accepted_tokens += accepted
            seq.lookup.verified(len(draft), accepted)
            if seq.finish_reason is None:  # a finished sequence has given all of its blocks back
                self.scheduler.rollback(seq, computed + accepted)

    def _append(self, seq: Sequence, drawn, now: float, outbox: list) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.stats.ttft_s.append(now - seq.arrival)
        else:
            self.stats.tpot_s.append((now - seq.first_token_at) / max(1, len(seq.output)))
        seq.output.append(drawn.token)
        self.stats.generation_tokens += 1
        p = seq.params
        finish = None
        if drawn.token in p.stop_token_ids or (drawn.token in self.eos_ids and not p.ignore_eos):
            finish = "stop"
        if seq.matcher is not None:
            # Its grammar allowed only this token; once complete, the output is whole (a stop token ends it).
            seq.matcher.accept_token(drawn.token)
            if seq.matcher.is_terminated():
                finish = "stop"
        before = len(seq.text)
        seq.text += seq.detokenizer.step(drawn.token)
        text, hold = seq.text, 0
        if p.stop:
            longest = max(map(len, p.stop))
            start = max(0, before - longest + 1)  # a stop string not seen before ends in the new piece
            hits = [h for h in (text.find(s, start) for s in p.stop) if h >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
                seq.text = text
            hold = longest - 1  # what could still be the start of a stop string is not sent yet
        if finish is None and (len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.max_len):
            finish = "length"
        ready = len(text) if finish else max(seq.sent, len(text) - hold)
        delta = text[seq.sent:ready]
        seq.sent = max(seq.sent, ready)
        event = {"token": drawn.token, "text": delta}
        if p.logprobs is not None:
            event["logprob"], event["top_logprobs"] = drawn.logprob, drawn.top
        outbox.append((seq.emit, event))
        if finish:
            seq.finish_reason = finish
            self.scheduler.finish(seq)
            outbox.append((seq.emit, {"finish_reason": finish, "prompt_tokens": len(seq.prompt),
                                      "completion_tokens": len(seq.output)}))

    # ---- observability -------------------------------------------------------------------------

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting) + len(self._inbox),
                "kv_blocks_used": self.cache.pool.used,
                "kv_blocks_total": self.cache.pool.num_blocks,
                "prefix_cache_hits": self.cache.pool.prefix_hits,
                "preemptions": self.scheduler.preemptions,
                "draft_tokens": self.stats.draft_tokens,
                "accepted_tokens": self.stats.accepted_tokens,
            }

