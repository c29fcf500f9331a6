"""One /metrics for `server.workers = N`: the workers' expositions summed series by series.

Counters, histograms and the byte/count gauges add up across workers (records in,
records out, retries, journal bytes, files waiting: the whole server's numbers, which the
runbook's alerts compare with fixed thresholds). A ratio cannot be added: the free-space
ratio is the lowest of any worker, the one that answers 503 first. Pure functions over
exposition text; the supervisor fetches the texts (supervisor.py).
"""

from collections.abc import Iterable

import prometheus_client
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Gauges where the sum means nothing; the smallest value across workers is kept.
LOWEST = frozenset({"fluentd_output_status_buffer_available_space_ratio"})


# Families whose samples only ever grow within one process.
CUMULATIVE = frozenset({"counter", "histogram", "summary"})

Key = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> Key:
    return name, tuple(sorted(labels.items()))


class WorkerTotals:
    """Each worker's last good scrape, so the summed counters never go down: a worker
    that misses a scrape counts with its last one, and one that restarted (started again
    by the supervisor, or its counters came back lower) keeps its previous totals as an
    offset. Otherwise Prometheus sees a reset of the sum and increase() counts the other
    workers' lifetime totals once more."""

    def __init__(self) -> None:
        self._start: dict[int, int] = {}  # worker -> its start number at the last scrape
        self._raw: dict[int, dict[Key, float]] = {}  # cumulative samples as last scraped
        self._offsets: dict[int, dict[Key, float]] = {}
        self._families: dict[Key, tuple[str, str, str]] = {}  # sample -> family name/help/type
        self._last: dict[int, list[Metric]] = {}

    def update(self, worker: int, start: int, text: str | None) -> list[Metric] | None:
        """The families to sum for `worker` (started `start` times) given its scrape
        (None: it did not answer): offsets added; None before its first good scrape."""
        if text is None:
            return self._last.get(worker)
        parsed = list(text_string_to_metric_families(text))
        raw = {_key(sample.name, sample.labels): sample.value
               for family in parsed if family.type in CUMULATIVE for sample in family.samples}
        previous = self._raw.get(worker, {})
        offsets = self._offsets.setdefault(worker, {})
        if self._start.get(worker, start) != start or any(
                value < previous[key] for key, value in raw.items() if key in previous):
            for key, value in previous.items():
                offsets[key] = offsets.get(key, 0.0) + value
        self._start[worker], self._raw[worker] = start, raw
        families: dict[str, Metric] = {}
        for family in parsed:
            out = families[family.name] = Metric(family.name, family.documentation,
                                                 family.type)
            for sample in family.samples:
                key = _key(sample.name, sample.labels)
                if family.type in CUMULATIVE:
                    self._families[key] = (family.name, family.documentation, family.type)
                out.add_sample(sample.name, sample.labels, sample.value + offsets.get(key, 0.0))
        for key, offset in offsets.items():
            if key not in raw:  # a series the restarted worker has not shown again yet
                name, documentation, kind = self._families[key]
                out = families.setdefault(name, Metric(name, documentation, kind))
                out.add_sample(key[0], dict(key[1]), offset)
        self._last[worker] = list(families.values())
        return self._last[worker]


def sum_expositions(texts: Iterable[str], extra: Iterable[Metric] = ()) -> bytes:
    """The families of every text, each series summed (or the lowest, for LOWEST), in
    first-seen order; `extra` families are appended as they are."""
    return sum_families([text_string_to_metric_families(text) for text in texts], extra)


def sum_families(workers: Iterable[Iterable[Metric]], extra: Iterable[Metric] = ()) -> bytes:
    """sum_expositions over parsed families (one iterable per worker)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[Key, float]] = {}
    for worker in workers:
        for family in worker:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                key = _key(sample.name, sample.labels)
                if key not in series:
                    series[key] = sample.value
                elif family.name in LOWEST:
                    series[key] = min(series[key], sample.value)
                else:
                    series[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return _render([*families.values(), *extra])


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def _render(metrics: list[Metric]) -> bytes:
    registry = prometheus_client.CollectorRegistry()
    registry.register(_Fixed(metrics))
    return prometheus_client.generate_latest(registry)
