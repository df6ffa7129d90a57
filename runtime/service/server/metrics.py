"""The server's metrics in Prometheus' text exposition format (version 0.0.4).

A few counters, gauges and histograms written by hand: the format is plain text, and a client
library would be one more dependency on the board for forty lines of code. Everything is updated
from the event loop's thread, so there are no locks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0}

    def inc(self, amount: float = 1, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0)

    def samples(self) -> Iterable[str]:
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


class Gauge:
    """A value read when scraped (from a callable) or set."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        read: Callable[[], float] | None = None,
        labels: tuple[str, ...] = (),
        label_values: tuple[str, ...] = (),
    ):
        self.name, self.help, self.read = name, help, read
        self.label_names, self.label_values = labels, label_values
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value

    def samples(self) -> Iterable[str]:
        value = self.read() if self.read is not None else self.value
        yield f"{self.name}{_labels(self.label_names, self.label_values)} {_number(value)}"


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> Iterable[str]:
        cumulative = 0
        for bound, count in zip(self.buckets + (math.inf,), self.counts, strict=True):
            cumulative += count
            yield f'{self.name}_bucket{{le="{_number(float(bound))}"}} {cumulative}'
        yield f"{self.name}_sum {_number(self.sum)}"
        yield f"{self.name}_count {self.count}"


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines = []
        for metric in self.metrics:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """What the server reports. Gauges that read live state get their callables from the app."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(
            Counter("edgellm_requests_total", "HTTP requests answered, by path and status.", ("path", "status"))
        )
        self.rejected = r.add(
            Counter(
                "edgellm_rejected_total",
                "Requests refused before generating: queue_full (429), draining or loading (503).",
                ("reason",),
            )
        )
        self.generations = r.add(
            Counter(
                "edgellm_generations_total",
                "Generations ended, by finish reason (stop, length, cancelled, error).",
                ("finish_reason",),
            )
        )
        self.cancelled = r.add(
            Counter(
                "edgellm_cancelled_total",
                "Generations cancelled, by why: client_disconnected, timeout, shutdown.",
                ("reason",),
            )
        )
        self.prompt_tokens = r.add(Counter("edgellm_prompt_tokens_total", "Prompt tokens of generations that ran."))
        self.generated_tokens = r.add(Counter("edgellm_generated_tokens_total", "Tokens generated."))
        self.ttft = r.add(
            Histogram(
                "edgellm_time_to_first_token_seconds",
                "From the request's arrival (queue wait included) to its first token.",
                TTFT_BUCKETS,
            )
        )
        self.decode_speed = r.add(
            Histogram(
                "edgellm_decode_tokens_per_second",
                "Decode speed of each generation of two or more tokens.",
                TOKENS_PER_SECOND_BUCKETS,
            )
        )
        self.duration = r.add(
            Histogram(
                "edgellm_request_duration_seconds",
                "From arrival to the last byte of the answer, generation requests.",
                DURATION_BUCKETS,
            )
        )

    def gauge(self, name: str, help: str, read: Callable[[], float], **labels: str) -> Gauge:
        return self.registry.add(Gauge(name, help, read, tuple(labels), tuple(labels.values())))

    def render(self) -> str:
        return self.registry.render()
