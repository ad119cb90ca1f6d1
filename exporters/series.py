"""Counters whose number of series is bounded per metric, newest kept.

Label values come from the traced machine (process names, uids, namespaces), so the product
of a metric's labels is unbounded: a cap per label (200 names x 200 uids) still allows
40,000 series, and a cap that admits the first 200 values forever lets 200 junk names hide
every later newcomer. Here each metric holds at most `max_series` label sets; a new one
evicts the least recently updated, so the callers active now are always visible, and every
eviction is counted in `imdswatch_series_evicted_total{metric}` for an alert rule. A series
that comes back after eviction starts again from its new increments, which Prometheus'
`rate()`/`increase()` read as a counter reset.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class BoundedCounter(Collector):
    """A labelled counter family holding at most `max_series` series (LRU by update)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 max_series: int, on_evict: Callable[[str, int], None]) -> None:
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.max_series = max_series
        self._on_evict = on_evict
        self._series: OrderedDict[tuple[str, ...], float] = OrderedDict()
        self._lock = threading.Lock()

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label values")
        evicted = 0
        with self._lock:
            series = self._series
            if labels in series:
                series[labels] += amount
                series.move_to_end(labels)
            else:
                while len(series) >= self.max_series:
                    series.popitem(last=False)
                    evicted += 1
                series[labels] = amount
        if evicted:
            self._on_evict(self.name, evicted)

    def __len__(self) -> int:
        with self._lock:
            return len(self._series)

    def value(self, labels: tuple[str, ...]) -> float | None:
        with self._lock:
            return self._series.get(labels)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            rows = list(self._series.items())
        for labels, value in rows:
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry would call collect() at registration time.
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
