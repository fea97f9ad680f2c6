"""GET /metrics: the engine's gauges, counters and latency histograms in Prometheus' text format (prometheus-client).

Names follow vLLM's (`vllm:num_requests_running` is `jaxinfer:num_requests_running` here), each labelled with the
served model's name, so a dashboard built for vLLM needs only the prefix changed. Read at scrape time: the engine's
own counters (Engine.metrics()) and what only the server sees (ServerStats: tokens answered, finish reasons, the
end-to-end latency of each choice), nothing kept twice.
"""

from __future__ import annotations

import collections
import dataclasses

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from jaxinfer.engine.engine import Histogram

PREFIX = "jaxinfer:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclasses.dataclass
class ServerStats:
    """What the HTTP layer counts: per choice (one engine request) of every answered API request."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # finish_reason -> n
    e2e: Histogram = dataclasses.field(default_factory=Histogram)  # queued -> last token, seconds


def render(engine_metrics: dict, stats: ServerStats, model_name: str) -> bytes:
    """-> the /metrics body."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: list(_families(engine_metrics, stats, model_name))))
    return generate_latest(registry)


class _Collector:
    def __init__(self, families):
        self.collect = families


def _families(m: dict, stats: ServerStats, model_name: str):
    labels, values = ["model_name"], [model_name]

    def gauge(name, doc, value):
        family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
        family.add_metric(values, value)
        return family

    def counter(name, doc, value):
        family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
        family.add_metric(values, value)
        return family

    yield gauge("num_requests_running", "Requests in the running batch (holding a slot).", m["running"])
    yield gauge("num_requests_waiting", "Requests queued for a slot, preempted ones included.", m["waiting"])
    usage = m["kv_pages_running"] / m["kv_pages_total"] if m["kv_pages_total"] else 0.0
    yield gauge("kv_cache_usage_perc", "Fraction of the KV page pool held by requests (1 = full).", usage)
    pages = GaugeMetricFamily(PREFIX + "kv_cache_pages", "KV pages by state: held by requests, free but holding a "
                              "cached prefix, empty.", labels=[*labels, "state"])
    for state in ("running", "cached", "free"):
        pages.add_metric([*values, state], m[f"kv_pages_{state}"])
    yield pages
    yield counter("num_preemptions", "Requests preempted (pages freed, recomputed later).", m["preemptions"])
    yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                  m["prefix_cache_queried_tokens"])
    yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", m["prefix_cache_hit_tokens"])
    yield counter("prompt_tokens", "Prompt tokens of the requests answered.", stats.prompt_tokens)
    yield counter("generation_tokens", "Tokens generated for the requests answered.", stats.generation_tokens)
    yield gauge("compilations_after_warm_up", "Programs compiled while serving (0 once warmed up).",
                m["compilations_after_warm_up"])
    success = CounterMetricFamily(PREFIX + "request_success", "Choices finished, by finish reason.",
                                  labels=[*labels, "finished_reason"])
    for reason in ("stop", "length", "abort"):
        success.add_metric([*values, reason], stats.finished[reason])
    yield success
    yield _histogram("time_to_first_token_seconds", "Queued to first token.", m["ttft_seconds"], labels, values)
    yield _histogram("inter_token_latency_seconds", "Between a request's tokens.",
                     m["inter_token_latency_seconds"], labels, values)
    yield _histogram("e2e_request_latency_seconds", "Queued to finished, per choice.", stats.e2e.snapshot(),
                     labels, values)


def _histogram(name: str, doc: str, snapshot: dict, labels, values) -> HistogramMetricFamily:
    """Histogram.snapshot() (cumulative counts by upper bound, sum) -> a Prometheus histogram."""
    family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    buckets = [("+Inf" if bound == float("inf") else repr(bound), n) for bound, n in snapshot["buckets"].items()]
    family.add_metric(values, buckets, sum_value=snapshot["sum"])
    return family
