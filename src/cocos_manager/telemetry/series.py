"""The manager's metric series as plain numbers, turned into Prometheus metric families only
when something reads them (a /metrics scrape, a test's `registry.get_sample_value`).

Recording (`inc`, `set`, `observe`) is a dict update on the event loop, as cheap as
prometheus-client's own; what this saves is prometheus-client itself (its exposition pulls
in `wsgiref`, `http.server`, `urllib.request`: about 15 ms of CPU and 2 MiB at start-up),
loaded by `Metrics.registry` on first use instead of by every daemon, /metrics or not
(docs/decisions.md, "Start-up and the bench's targets").

Reads come from prometheus-client's HTTP thread: each series is copied (`dict.copy`, one
C-level call under the GIL) before it is walked, never iterated while the loop may add to it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric

Labels = tuple[str, ...]


class Series:
    """One metric: its name, help text, label names, and a value per label set."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {list(self.labelnames)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def family(self) -> Metric:
        raise NotImplementedError


class _Point:
    """A label set's handle, as prometheus-client's `labels(...)` returns."""

    __slots__ = ("_key", "_series")

    def __init__(self, series: Counter | Gauge, key: Labels) -> None:
        self._series = series
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        self._series.add(self._key, amount)

    def set(self, value: float) -> None:
        self._series.put(self._key, value)

    def value(self) -> float:
        return self._series.value_of(self._key)


class Counter(Series):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[Labels, float] = {} if labelnames else {(): 0.0}

    def labels(self, **labels: str) -> _Point:
        return _Point(self, self._key(labels))

    def inc(self, amount: float = 1.0) -> None:
        self.add((), amount)

    def value(self) -> float:
        """The value without labels (a label set's: `labels(...).value()`)."""
        return self.value_of(())

    def value_of(self, key: Labels) -> float:
        return self._values.get(key, 0.0)

    def add(self, key: Labels, amount: float) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up")
        self._values[key] = self._values.get(key, 0.0) + amount

    def put(self, key: Labels, value: float) -> None:
        raise TypeError(f"{self.name} is a counter: inc, not set")

    def family(self) -> Metric:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in self._values.copy().items():
            family.add_metric(key, value)
        return family


class Gauge(Counter):
    def set(self, value: float) -> None:
        self.put((), value)

    def add(self, key: Labels, amount: float) -> None:
        self._values[key] = self._values.get(key, 0.0) + amount

    def put(self, key: Labels, value: float) -> None:
        self._values[key] = float(value)

    def family(self) -> Metric:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, value in self._values.copy().items():
            family.add_metric(key, value)
        return family


class _Observed:
    """One label set of a histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0


class _Observer:
    __slots__ = ("_key", "_series")

    def __init__(self, series: Histogram, key: Labels) -> None:
        self._series = series
        self._key = key

    def observe(self, value: float) -> None:
        self._series.record(self._key, value)


class Histogram(Series):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
    ) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = sorted(float(b) for b in buckets)
        self.bounds = (*bounds, float("inf")) if bounds[-1:] != [float("inf")] else tuple(bounds)
        self._values: dict[Labels, _Observed] = {}

    def labels(self, **labels: str) -> _Observer:
        return _Observer(self, self._key(labels))

    def record(self, key: Labels, value: float) -> None:
        observed = self._values.get(key)
        if observed is None:
            observed = self._values[key] = _Observed(len(self.bounds))
        # Prometheus buckets are "less than or equal": the first bound >= value.
        observed.counts[bisect.bisect_left(self.bounds, value)] += 1
        observed.total += value

    def family(self) -> Metric:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, observed in self._values.copy().items():
            counts, running, buckets = list(observed.counts), 0, []
            for bound, count in zip(self.bounds, counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), float(running)))  # type: ignore[no-untyped-call]
            family.add_metric(key, buckets, observed.total)
        return family


class SeriesCollector:
    """A prometheus-client collector over some series; `shown()` says which are exported now."""

    def __init__(self, shown: Callable[[], Sequence[Series]]) -> None:
        self._shown = shown

    def collect(self) -> Iterator[Metric]:
        for series in self._shown():
            yield series.family()
