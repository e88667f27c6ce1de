"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own.

Task labels take only the served task names (a request naming an unknown task counts under
``task="-"``), so a client cannot grow the label set.
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

INVALID_TASK = "-"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        sizes = sorted({2 ** i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.requests = Counter("ptv2_serve_requests", "Requests answered, by task and HTTP status",
                                ("task", "status"), registry=self.registry)
        self.latency = Histogram("ptv2_serve_request_seconds", "Time from a request's arrival to its answer, by task",
                                 ("task",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ptv2_serve_batch_size", "Requests per backbone pass", buckets=sizes,
                                    registry=self.registry)
        self.batch_tasks = Histogram("ptv2_serve_batch_tasks", "Distinct tasks per backbone pass", buckets=sizes,
                                     registry=self.registry)
        self.batch_seconds = Histogram("ptv2_serve_batch_seconds", "Time of one backbone pass and the heads",
                                       buckets=_LATENCY_BUCKETS, registry=self.registry)

    def request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task, str(status)).inc()
        self.latency.labels(task).observe(seconds)

    def batch(self, tasks: Sequence[str], seconds: float) -> None:
        self.batch_size.observe(len(tasks))
        self.batch_tasks.observe(len(set(tasks)))
        self.batch_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
