"""Per-model placement figures, read from the controller at scrape time: what each resident model
takes on each worker, each worker's free and usable memory, each model's admission queue (its
length now and how long requests waited in it) and how often it was evicted."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from warmserve.controller.admission import QUEUE_WAIT_BUCKETS


class ModelCollector:
    def __init__(self, controller):
        self.controller = controller

    def collect(self):
        resident = GaugeMetricFamily(
            "warmserve_model_resident_bytes",
            "Memory a model takes on a worker (weights, KV cache, activations)",
            labels=["model", "worker"],
        )
        free = GaugeMetricFamily(
            "warmserve_worker_memory_free_bytes",
            "Memory of a worker that another model may take",
            labels=["worker"],
        )
        usable = GaugeMetricFamily(
            "warmserve_worker_memory_usable_bytes",
            "Memory of a worker that models may take, all together",
            labels=["worker"],
        )
        for worker in self.controller.workers():
            free.add_metric([str(worker.id)], worker.memory_free_bytes)
            usable.add_metric([str(worker.id)], worker.memory_usable_bytes)
            for model in worker.models:
                resident.add_metric([model.name, str(worker.id)], model.memory_bytes)
        queued = GaugeMetricFamily(
            "warmserve_model_requests_queued",
            "Requests waiting for their model to be loaded",
            labels=["model"],
        )
        evictions = CounterMetricFamily(
            "warmserve_model_evictions",
            "Times a model was evicted to make room for another",
            labels=["model"],
        )
        for model in self.controller.models():
            queued.add_metric([model.name], model.requests_queued)
            evictions.add_metric([model.name], model.evictions)
        yield from (resident, free, usable, queued, evictions, self._queue_waits())

    def _queue_waits(self) -> HistogramMetricFamily:
        stats = self.controller.queue_stats
        waits = HistogramMetricFamily(
            "warmserve_queue_wait_seconds",
            "How long requests waited for their model to be loaded",
            labels=["model"],
        )
        for name, counts in stats.wait_counts.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*QUEUE_WAIT_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            waits.add_metric([name], buckets, stats.wait_sums[name])
        return waits
