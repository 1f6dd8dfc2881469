"""Prometheus text exposition (format 0.0.4) for `lorakit serve`'s GET /metrics, with no extra dependency:
counters, gauges and histograms (cumulative `le` buckets, `_sum`, `_count`), labelled or not.

    requests = Counter("lorakit_requests_total", "requests served", labels=("model",))
    requests.inc(model="base")
    latency = Histogram("lorakit_request_latency_seconds", "...", buckets=LATENCY_BUCKETS, labels=("phase",))
    latency.observe(0.12, phase="total")
    render([requests, latency]) -> "# HELP ...\\n# TYPE ...\\nlorakit_requests_total{model=\\"base\\"} 1\\n..."

Each metric takes a lock around its updates, so the event loop and the engine thread may both write to one.
Reference: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # sequences per decode step

LabelValues = tuple[str, ...]


def escape_label(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a decimal point, +Inf / -Inf / NaN spelled as Prometheus spells them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def format_labels(names: Sequence[str], values: Sequence[str]) -> str:
    """`{a="x",b="y"}` for the pairs, or "" when there are none."""
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values)) + "}"


class Metric:
    """A named metric family with fixed label names; `kind` is its Prometheus TYPE."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        """The label values in declaration order.

        Raises:
            ValueError: labels that are not exactly the declared ones.
        """
        if set(labels) != set(self.labels):
            raise ValueError(f"metric {self.name} takes labels {list(self.labels)}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> str:
        return "\n".join(self.header() + self.samples()) + "\n"


class _Values(Metric):
    """A family of plain values, one per label combination."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{format_labels(self.labels, key)} {format_value(v)}" for key, v in items]


class Counter(_Values):
    """A value that only goes up (requests, tokens)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (>= 0) to the series named by `labels`.

        Raises:
            ValueError: a negative amount, or labels that are not the declared ones.
        """
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (amount {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Values):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Reading(Metric):
    """An unlabelled counter or gauge whose value is read when the metrics are rendered: a total another
    component keeps (the engine's generated tokens, the registry's cache hits)."""

    def __init__(self, name: str, help: str, kind: str, read: Callable[[], float]) -> None:
        super().__init__(name, help)
        self.kind = kind
        self.read = read

    def samples(self) -> list[str]:
        return [f"{self.name} {format_value(float(self.read()))}"]


class Histogram(Metric):
    """Observations counted into cumulative buckets `le` (upper bounds, +Inf added), with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: Sequence[str] = ()) -> None:
        """Raises: ValueError: buckets that are empty, not increasing, or not finite."""
        super().__init__(name, help, labels)
        bounds = [float(b) for b in buckets]
        if not bounds or any(not math.isfinite(b) for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(f"histogram {name}: buckets must be finite and strictly increasing, got {bounds}")
        self.buckets = tuple(bounds)
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}  # key -> (bucket counts, [sum])
        if not labels:
            self._series[()] = ([0] * (len(bounds) + 1), [0.0])

    def observe(self, value: float, **labels: str) -> None:
        """Count one observation into the first bucket whose bound is >= value (and the sum)."""
        key = self._key(labels)
        slot = bisect.bisect_left(self.buckets, value)  # len(buckets) = the +Inf bucket
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[slot] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((key, (list(c), t[0])) for key, (c, t) in self._series.items())
        lines = []
        for key, (counts, total) in items:
            lines += histogram_lines(self.name, self.labels, key, self.buckets, counts, total)
        return lines


def histogram_lines(name: str, label_names: Sequence[str], key: LabelValues, buckets: Sequence[float],
                    counts: Sequence[int], total: float) -> list[str]:
    """The `_bucket` (cumulative, `le` = each bound then +Inf), `_sum` and `_count` lines of one series;
    counts[i] is the number of observations in (buckets[i-1], buckets[i]], the last one past every bound."""
    lines, cumulative = [], 0
    for bound, n in zip((*buckets, math.inf), counts):
        cumulative += n
        lines.append(f"{name}_bucket{format_labels((*label_names, 'le'), (*key, format_value(bound)))} {cumulative}")
    plain = format_labels(label_names, key)
    return lines + [f"{name}_sum{plain} {format_value(total)}", f"{name}_count{plain} {cumulative}"]


def bucket_counts(observed: Mapping[float, int], buckets: Sequence[float]) -> tuple[list[int], float]:
    """Per-bucket counts (the last past every bound) and the sum of a {value: times observed} table."""
    counts = [0] * (len(buckets) + 1)
    total = 0.0
    for value, times in observed.items():
        counts[bisect.bisect_left(buckets, value)] += times
        total += value * times
    return counts, total


class ReadHistogram(Metric):
    """An unlabelled histogram rendered from a {value: times observed} table read at render time (the
    engine's decode batch sizes)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float],
                 read: Callable[[], Mapping[float, int]]) -> None:
        super().__init__(name, help)
        self.buckets = tuple(float(b) for b in buckets)
        self.read = read

    def samples(self) -> list[str]:
        counts, total = bucket_counts(self.read(), self.buckets)
        return histogram_lines(self.name, (), (), self.buckets, counts, total)


def render(metrics: Iterable[Metric]) -> str:
    """The exposition text of `metrics`, in order (content type: CONTENT_TYPE)."""
    return "".join(m.render() for m in metrics)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"



class ServeMetrics:
    """The metrics of `lorakit serve`: what the app counts (requests by model, errors by status, latencies)
    and what it reads from the engine (tokens, steps, running / waiting, decode batch sizes) and the adapter
    registry (cache hits, loads, evictions, resident adapters) when /metrics is asked for."""

    def __init__(self, engine: Any, registry: Any) -> None:
        self.engine, self.registry = engine, registry
        self._engine: dict[str, Any] = {}  # snapshots taken by render()
        self._registry: dict[str, Any] = {}
        self.requests = Counter("lorakit_requests_total", "generation requests accepted, by served model",
                                labels=("model",))
        self.errors = Counter("lorakit_request_errors_total", "requests answered with an error, by HTTP status",
                              labels=("status",))
        self.latency = Histogram("lorakit_request_latency_seconds", "seconds from a request's arrival to its "
                                 "first token (phase first_token) and to its last (phase total)",
                                 LATENCY_BUCKETS, labels=("phase",))

        def engine_stat(key: str) -> Callable[[], float]:
            return lambda: float(self._engine.get(key, 0))

        def registry_stat(key: str) -> Callable[[], float]:
            return lambda: float(self._registry.get(key, 0))

        self.families: list[Metric] = [
            self.requests, self.errors,
            Reading("lorakit_prompt_tokens_total", "prompt tokens of the sequences submitted", "counter",
                    engine_stat("prompt_tokens")),
            Reading("lorakit_generation_tokens_total", "tokens generated", "counter",
                    engine_stat("generated_tokens")),
            Reading("lorakit_decode_steps_total", "batched decode forwards", "counter", engine_stat("steps")),
            Reading("lorakit_sequences_cancelled_total", "sequences ended early because their client went away",
                    "counter", engine_stat("cancelled")),
            Reading("lorakit_sequence_errors_total", "sequences the engine ended with an error", "counter",
                    engine_stat("errors")),
            Reading("lorakit_running", "sequences in the running batch", "gauge", engine_stat("running")),
            Reading("lorakit_waiting", "sequences waiting to join the batch", "gauge", engine_stat("waiting")),
            ReadHistogram("lorakit_batch_size", "sequences per decode forward", BATCH_BUCKETS,
                          lambda: self._engine.get("batch_sizes", {})),
            Reading("lorakit_adapter_cache_hits_total", "adapter requests served by a resident adapter",
                    "counter", registry_stat("hits")),
            Reading("lorakit_adapter_loads_total", "adapters loaded from disk", "counter", registry_stat("loads")),
            Reading("lorakit_adapter_evictions_total", "resident adapters evicted (least recently used)", "counter",
                    registry_stat("evictions")),
            Reading("lorakit_adapter_mixes_total", "weighted mixes of adapters built", "counter",
                    registry_stat("mixes")),
            Reading("lorakit_adapter_load_failures_total", "adapter loads that failed", "counter",
                    registry_stat("load_failures")),
            Reading("lorakit_adapters_resident", "adapters resident on the model", "gauge",
                    registry_stat("resident")),
            self.latency,
        ]

    def render(self) -> str:
        """The exposition text, with the engine's and the registry's counters read now."""
        self._engine = dict(self.engine.stats)
        self._registry = dict(self.registry.stats)
        return render(self.families)


__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "LATENCY_BUCKETS", "Counter", "Gauge", "Histogram", "Metric",
           "ReadHistogram", "Reading", "ServeMetrics", "bucket_counts", "escape_label", "format_labels",
           "format_value", "histogram_lines", "render"]
