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


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def sum_expositions(texts: Iterable[str], extra: Iterable[Metric] = ()) -> bytes:
    """The families of every text, each series summed (or the lowest, for LOWEST), in
    first-seen order; `extra` families are appended as they are."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
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
