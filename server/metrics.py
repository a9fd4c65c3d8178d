"""Prometheus metrics of deltaserve (prefix ``deltaserve_``).

All metrics live on prometheus-client's default registry, next to vLLM's own
``vllm:*`` metrics (vLLM's ``PrometheusStatLogger`` registers there in this process),
so one ``/metrics`` exposes both. ``task`` labels are bounded: a task label is only
ever a registered delta name, the base model's name, or ``"unknown"`` — never free
text from a request.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("deltaserve_requests", "Inference requests by task and outcome.", ["task", "outcome", "api"])
REQUEST_LATENCY = Histogram(
    "deltaserve_request_latency_seconds",
    "End-to-end latency of successful requests.",
    ["task"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "deltaserve_time_to_first_token_seconds",
    "Time to first generated token of streamed requests (a non-streamed answer arrives whole; vLLM's own vllm:time_to_first_token_seconds counts every request).",
    ["task"],
    buckets=_LATENCY_BUCKETS,
)
GENERATED_TOKENS = Counter("deltaserve_generated_tokens", "Generated tokens by task.", ["task"])
PROMPT_TOKENS = Counter("deltaserve_prompt_tokens", "Prompt tokens (image tokens included) by task.", ["task"])
DELTAS = Gauge("deltaserve_registered_deltas", "Registered deltas by kind.", ["kind"])
DELTA_LOAD_SECONDS = Histogram(
    "deltaserve_delta_load_seconds",
    "Time to validate, store and bind a delta on registration or restore.",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REGISTRY_OPS = Counter(
    "deltaserve_registry_operations", "Registry operations by operation and result.", ["op", "result"]
)
ROUTING = Counter(
    "deltaserve_routing_decisions", "Routing decisions by router and chosen expert.", ["router", "expert"]
)
INFLIGHT = Gauge("deltaserve_inflight_requests", "Requests being served right now.")

# Engine states (exclusive deltas): see deltaserve.server.scheduler. `state` is a task name or "base".
STATE_SWITCHES = Counter("deltaserve_state_switches", "Engine state switches.", ["from_state", "to_state"])
STATE_SWITCH_SECONDS = Histogram(
    "deltaserve_state_switch_seconds",
    "Time to switch the engine between states.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
STATE_QUEUE_DEPTH = Gauge("deltaserve_state_queue_depth", "Requests waiting for their engine state.", ["state"])
STATE_WAIT = Histogram(
    "deltaserve_state_wait_seconds",
    "Time a request waited for its engine state.",
    ["state"],
    buckets=(0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)

# Engine replicas (deltaserve serve --replicas): see deltaserve.server.deploy_ray.
AFFINITY = Counter(
    "deltaserve_replica_affinity",
    "Delta requests an engine replica served with the delta already bound (hit) or loaded for them (load).",
    ["outcome"],
)


def exposition(others: Iterable[tuple[dict[str, str], str]] = ()) -> bytes:
    """This process's metrics in Prometheus' text format, merged with ``others``: (labels, exposition text) of
    other processes — the engine replicas behind a Ray Serve ingress, each with ``{"replica": id}`` — whose
    samples get those labels. A name shared by several sources stays one family (Prometheus refuses a scrape
    that repeats a family), holding every source's series."""
    own = generate_latest(REGISTRY)
    others = list(others)
    if not others:
        return own
    families: dict[str, Metric] = {}
    for labels, text in [({}, own.decode()), *others]:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [s._replace(labels={**s.labels, **labels}) for s in family.samples]

    class _Merged:
        def collect(self):
            return list(families.values())

    return generate_latest(_Merged())
