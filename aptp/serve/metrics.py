"""A few Prometheus metrics, written in the text exposition format (version 0.0.4)."""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self._v: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *values: str, by: float = 1.0) -> None:
        with self._lock:
            self._v[values] = self._v.get(values, 0.0) + by

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for vals, v in sorted(self._v.items()):
                yield f"{self.name}{_labels(self.labels, vals)} {_num(v)}"


class Gauge:
    """A gauge read at scrape time from ``fn`` → {label values: value}."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...], fn: Callable[[], dict[tuple[str, ...], float]]):
        self.name, self.help, self.labels, self.fn = name, help, labels, fn

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for vals, v in sorted(self.fn().items()):
            yield f"{self.name}{_labels(self.labels, vals)} {_num(v)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._v: dict[tuple[str, ...], list[float]] = {}  # counts per bucket..., sum, count
        self._lock = threading.Lock()

    def observe(self, x: float, *values: str) -> None:
        with self._lock:
            row = self._v.setdefault(values, [0.0] * (len(self.buckets) + 2))
            for i, b in enumerate(self.buckets):
                if x <= b:
                    row[i] += 1
            row[-2] += x
            row[-1] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for vals, row in sorted(self._v.items()):
                for b, c in zip(self.buckets, row):
                    le = 'le="' + _num(b) + '"'
                    yield f"{self.name}_bucket{_labels(self.labels, vals, le)} {_num(c)}"
                yield f"{self.name}_sum{_labels(self.labels, vals)} {_num(row[-2])}"
                yield f"{self.name}_count{_labels(self.labels, vals)} {_num(row[-1])}"


class Registry:
    def __init__(self):
        self.metrics: list = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"
