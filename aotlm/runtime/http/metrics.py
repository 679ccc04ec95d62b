"""Prometheus metrics in vLLM's style (`aotlm:` prefix), one `CollectorRegistry` per server.

A per-server registry (never the global one) lets several apps share a process, as tests do.
Engine-wide numbers (running, waiting, pages, prefix cache, padding, compiles) are read from the
engine thread's published `EngineStats` at scrape time; per-request numbers (latencies, tokens,
finish reasons) are observed by the request handlers as outputs arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aotlm.runtime.generation.streams import RequestOutput
from aotlm.runtime.worker import EngineStats

# Latency buckets in seconds: a CPU tiny model answers in milliseconds, a TPU 70B in seconds.
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
_LONG = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class _EngineCollector:
    """Turns the latest `EngineStats` into gauges and counters at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = {
            "num_requests_running": ("Requests with sequences in the running batch.", s.running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.waiting),
            "kv_pages_used": ("KV cache pages held by sequences.", s.kv_pages_used),
            "kv_pages_total": ("KV cache pages in the pool (page 0 excluded).", s.kv_pages_total),
            "compiles_after_ready": (
                "XLA compiles since the bundle was sealed; must stay 0.",
                s.compiles_after_ready,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"aotlm:{name}", doc, value=value)
        counters = {
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_queries,
            ),
            "prefix_cache_hits": ("Looked-up tokens whose KV was reused.", s.prefix_hits),
            "real_tokens": ("Tokens run by the device, excluding padding.", s.real_tokens),
            "padded_tokens": ("Tokens run by the device, padding included.", s.padded_tokens),
            "num_preemptions": ("Sequences preempted for lack of KV pages.", s.preemptions),
            "grammar_masks": (
                "Token masks filled on the host for rows under a grammar (structured output).",
                s.grammar_masks,
            ),
            "grammar_mask_seconds": (
                "Host time spent filling those masks.",
                s.grammar_mask_seconds,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"aotlm:{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("aotlm:prompt_tokens", "Prompt tokens served.", registry=r)
        self.generation_tokens = Counter(
            "aotlm:generation_tokens", "Generated tokens served.", registry=r
        )
        self.request_success = Counter(
            "aotlm:request_success",
            "Choices finished, by finish reason (abort: the client went away).",
            ["finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "aotlm:time_to_first_token_seconds",
            "From the request's arrival to its first token.",
            buckets=sorted({*_LATENCY, *_LONG}),
            registry=r,
        )
        self.itl = Histogram(
            "aotlm:inter_token_latency_seconds",
            "Between consecutive tokens of a request (k tokens that arrive together after an "
            "interval, from a multi-step decode, count as k intervals of interval / k).",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "aotlm:e2e_request_latency_seconds",
            "From the request's arrival to its last token.",
            buckets=_LONG,
            registry=r,
        )
        self.queue_time = Histogram(
            "aotlm:request_queue_time_seconds",
            "From the engine taking the request to its first step.",
            buckets=_LONG,
            registry=r,
        )
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)


class RequestTimer:
    """Observes one engine request's latencies and token counts from its outputs."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        m = self.metrics
        new_tokens = sum(len(c.token_ids) for c in out.choices)
        if new_tokens:
            if self.last is None:
                m.ttft.observe(out.time - self.arrival)
            else:
                burst = max(len(c.token_ids) for c in out.choices)
                for _ in range(burst):
                    m.itl.observe((out.time - self.last) / burst)
            self.last = out.time
            m.generation_tokens.inc(new_tokens)
        for c in out.choices:
            if c.finish_reason is not None:
                m.request_success.labels(c.finish_reason).inc()
        if out.finished:
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            m.e2e.observe(out.time - self.arrival)
            if out.scheduled_time is not None:
                m.queue_time.observe(out.scheduled_time - out.arrival_time)

    def on_abort(self, unfinished_choices: int) -> None:
        if unfinished_choices:
            self.metrics.request_success.labels("abort").inc(unfinished_choices)
