"""Turn a Prometheus exposition into the short table ``deltaserve metrics`` prints."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile estimate from cumulative histogram buckets (upper bound of the bucket that reaches q)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    for upper, count in buckets:
        if count >= target:
            return upper
    return None


def summarize(text: str) -> str:
    samples: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name].append(s)

    def total(name: str, **match) -> float:
        return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in match.items()))

    tasks = sorted({s.labels["task"] for s in samples.get("deltaserve_requests_total", [])})
    lines = [
        "requests by task:",
        f"  {'task':<24} {'ok':>6} {'errors':>7} {'tokens':>8} {'p50 latency':>12} {'p50 TTFT':>10}",
    ]
    for task in tasks:
        ok = total("deltaserve_requests_total", task=task, outcome="ok")
        all_ = total("deltaserve_requests_total", task=task)
        tokens = total("deltaserve_generated_tokens_total", task=task)

        def p50(metric: str) -> str:
            buckets = sorted(
                (float(s.labels["le"]), s.value)
                for s in samples.get(f"{metric}_bucket", [])
                if s.labels.get("task") == task
            )
            value = _quantile(buckets, 0.5)
            return "-" if value is None else f"≤{value:g}s"

        lines.append(
            f"  {task:<24} {ok:>6.0f} {all_ - ok:>7.0f} {tokens:>8.0f} {p50('deltaserve_request_latency_seconds'):>12} "
            f"{p50('deltaserve_time_to_first_token_seconds'):>10}"
        )
    kinds = {s.labels["kind"]: s.value for s in samples.get("deltaserve_registered_deltas", [])}
    lines.append("registered deltas: " + (", ".join(f"{k}={v:.0f}" for k, v in sorted(kinds.items())) or "none"))
    ops = {
        (s.labels["op"], s.labels["result"]): s.value for s in samples.get("deltaserve_registry_operations_total", [])
    }
    lines.append(
        "registry operations: " + (", ".join(f"{o}/{r}={v:.0f}" for (o, r), v in sorted(ops.items())) or "none")
    )
    routes = {
        (s.labels["router"], s.labels["expert"]): s.value for s in samples.get("deltaserve_routing_decisions_total", [])
    }
    lines.append("routing: " + (", ".join(f"{r}->{e}={v:.0f}" for (r, e), v in sorted(routes.items())) or "none"))
    switches = total("deltaserve_state_switches_total")
    lines.append(f"engine state switches: {switches:.0f}")
    lines.append(
        f"vLLM: running={total('vllm:num_requests_running'):.0f} waiting={total('vllm:num_requests_waiting'):.0f} "
        f"generated tokens={total('vllm:generation_tokens_total'):.0f} prompt tokens={total('vllm:prompt_tokens_total'):.0f}"
    )
    return "\n".join(lines)
