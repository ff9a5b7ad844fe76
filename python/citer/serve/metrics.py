"""Prometheus metrics of one server (its own registry: no global state)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("citer_requests_running", "Requests being decoded", registry=r)
        self.waiting = Gauge("citer_requests_waiting", "Requests waiting for KV blocks", registry=r)
        self.kv_used = Gauge("citer_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("citer_kv_blocks_total", "KV cache blocks in the pool", registry=r)
        self.tokens = Counter("citer_generated_tokens", "Generated tokens by the model that made them", ["model"],
                              registry=r)
        self.llm_share = Gauge("citer_llm_share", "Share of generated tokens the LLM made, since start", registry=r)
        self.router_seconds = Counter("citer_router_seconds", "Time in the router MLP (servers started with "
                                      "--profile)", registry=r)
        self.finished = Counter("citer_requests_finished", "Finished requests (each of n samples counts) by "
                                "finish reason: stop, length, abort (the client left), error", ["reason"],
                                registry=r)
        self.ttft = Histogram("citer_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("citer_inter_token_latency_seconds", "Time between a request's token deliveries",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._made = {"slm": 0, "llm": 0}

    def on_output(self, out) -> None:
        """A finished request's output."""
        llm = sum(out.from_llm)
        self._made["llm"] += llm
        self._made["slm"] += len(out.from_llm) - llm
        self.tokens.labels("llm").inc(llm)
        self.tokens.labels("slm").inc(len(out.from_llm) - llm)
        total = self._made["llm"] + self._made["slm"]
        self.llm_share.set(self._made["llm"] / total if total else 0.0)
        self.router_seconds.inc(out.stats.get("router_time", 0.0))
        self.finished.labels(out.finish_reason or "unknown").inc()

    def on_end(self, reason: str, count: int = 1) -> None:
        """Requests that ended with no output of their own: "abort" (their client left) or "error"."""
        if count:
            self.finished.labels(reason).inc(count)

    def render(self, stats: dict) -> bytes:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_used.set(stats["kv_blocks_used"])
        self.kv_total.set(stats["kv_blocks_total"])
        return generate_latest(self.registry)
