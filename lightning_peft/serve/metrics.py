"""Request counters and latency percentiles per adapter, in the Prometheus text format a monitor scrapes."""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np

#: latencies kept per adapter for the percentiles (a sliding window)
LATENCY_WINDOW = 2048
QUANTILES = (0.5, 0.9, 0.99)


class ServingMetrics:
    """Counts requests and errors and keeps recent latencies, per adapter (``-`` for requests that named none).

    Example::

        metrics = ServingMetrics()
        metrics.observe("sentiment", 0.012, ok=True)
        print(metrics.prometheus())  # lightning_peft_requests_total{adapter="sentiment"} 1 …
    """

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latencies: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=LATENCY_WINDOW))

    def observe(self, adapter: str | None, seconds: float, ok: bool) -> None:
        name = adapter or "-"
        self.requests[name] += 1
        if not ok:
            self.errors[name] += 1
        self.latencies[name].append(seconds)

    def percentiles(self, adapter: str) -> dict[float, float]:
        values = np.fromiter(self.latencies[adapter], dtype=float)
        return {q: float(np.quantile(values, q)) if values.size else 0.0 for q in QUANTILES}

    def prometheus(self) -> str:
        lines = ["# HELP lightning_peft_requests_total Requests answered, per adapter.",
                 "# TYPE lightning_peft_requests_total counter"]
        lines += [f'lightning_peft_requests_total{{adapter="{a}"}} {n}' for a, n in sorted(self.requests.items())]
        lines += ["# HELP lightning_peft_errors_total Requests answered with an error status, per adapter.",
                  "# TYPE lightning_peft_errors_total counter"]
        lines += [f'lightning_peft_errors_total{{adapter="{a}"}} {self.errors[a]}' for a in sorted(self.requests)]
        lines += ["# HELP lightning_peft_latency_seconds Request latency over the last requests, per adapter.",
                  "# TYPE lightning_peft_latency_seconds summary"]
        for adapter in sorted(self.requests):
            for q, value in self.percentiles(adapter).items():
                lines.append(f'lightning_peft_latency_seconds{{adapter="{adapter}",quantile="{q}"}} {value:.6f}')
            lines.append(f'lightning_peft_latency_seconds_count{{adapter="{adapter}"}} {self.requests[adapter]}')
        return "\n".join(lines) + "\n"
