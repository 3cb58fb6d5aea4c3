"""Prometheus metrics of a serving engine, named after vLLM's so that its dashboards apply."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self, engine):
        self.engine = engine
        self.registry = CollectorRegistry()  # one per app: several servers may live in one process (tests)
        r = self.registry
        self.ttft = Histogram("supercluster_time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("supercluster_time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("supercluster_num_requests_running", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge("supercluster_num_requests_waiting", "Sequences waiting to start.", registry=r)
        self.blocks_used = Gauge("supercluster_kv_cache_blocks_used", "KV cache blocks held by sequences.", registry=r)
        self.blocks_total = Gauge("supercluster_kv_cache_blocks_total", "KV cache blocks in the pool.", registry=r)
        self.prompt = Counter("supercluster_prompt_tokens", "Prompt tokens received.", registry=r)
        self.generated = Counter("supercluster_generation_tokens", "Tokens generated.", registry=r)
        self.prefix_hits = Counter("supercluster_prefix_cache_hit_blocks", "Prompt blocks reused from the prefix cache.",
                                   registry=r)
        # Speculative decoding (vLLM's spec_decode counters): acceptance rate = accepted / draft tokens.
        self.drafted = Counter("supercluster_spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", registry=r)
        self.accepted = Counter("supercluster_spec_decode_num_accepted_tokens", "Draft tokens the model chose too.",
                                registry=r)
        self.acceptance = Gauge("supercluster_spec_decode_acceptance_rate", "Accepted over drafted tokens since the start.",
                                registry=r)
        self._seen = {"prompt": 0, "generated": 0, "prefix": 0, "drafted": 0, "accepted": 0}

    def render(self) -> bytes:
        stats, snap = self.engine.stats, self.engine.snapshot()
        while stats.ttft_s:
            self.ttft.observe(stats.ttft_s.pop())
        while stats.tpot_s:
            self.tpot.observe(stats.tpot_s.pop())
        self.running.set(snap["running"])
        self.waiting.set(snap["waiting"])
        self.blocks_used.set(snap["kv_blocks_used"])
        self.blocks_total.set(snap["kv_blocks_total"])
        for key, counter, value in (("prompt", self.prompt, stats.prompt_tokens),
                                    ("generated", self.generated, stats.generation_tokens),
                                    ("prefix", self.prefix_hits, snap["prefix_cache_hits"]),
                                    ("drafted", self.drafted, snap["draft_tokens"]),
                                    ("accepted", self.accepted, snap["accepted_tokens"])):
            counter.inc(value - self._seen[key])
            self._seen[key] = value
        self.acceptance.set(snap["accepted_tokens"] / snap["draft_tokens"] if snap["draft_tokens"] else 0.0)
        return generate_latest(self.registry)
