"""Per-model placement figures, read from the controller at scrape time: what each resident model
takes on each worker and its KV cache there, each worker's free and usable memory and KV pool,
each model's admission queue (its length now and how long requests waited in it), how often
it was evicted, and how long its engine steps take."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from warmserve.controller.histograms import Histograms


class ModelCollector:
    def __init__(self, controller):
        self.controller = controller

    def collect(self):
        resident = GaugeMetricFamily(
            "warmserve_model_resident_bytes",
            "A model's footprint on a worker (weights, activations, its minimum KV cache)",
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
        kv_mapped = GaugeMetricFamily(
            "warmserve_model_kv_mapped_bytes",
            "A model's KV cache on a worker: pages of the worker's KV pool it has mapped",
            labels=["model", "worker"],
        )
        kv_used = GaugeMetricFamily(
            "warmserve_model_kv_used_bytes",
            "A model's KV cache blocks that running sequences hold",
            labels=["model", "worker"],
        )
        pool_free = GaugeMetricFamily(
            "warmserve_worker_kv_pool_free_bytes",
            "What the KV caches of a worker's models may still map without taking from each other",
            labels=["worker"],
        )
        for worker in self.controller.workers():
            free.add_metric([str(worker.id)], worker.memory_free_bytes)
            usable.add_metric([str(worker.id)], worker.memory_usable_bytes)
            pool_free.add_metric([str(worker.id)], worker.kv_pool_free_bytes)
            for model in worker.models:
                labels = [model.name, str(worker.id)]
                resident.add_metric(labels, model.memory_bytes)
                kv_mapped.add_metric(labels, model.kv_mapped_bytes)
                kv_used.add_metric(labels, model.kv_used_bytes)
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
        yield from (resident, free, usable, kv_mapped, kv_used, pool_free, queued, evictions)
        yield self._queue_waits()
        yield self._step_times()

    def _queue_waits(self) -> HistogramMetricFamily:
        waits = HistogramMetricFamily(
            "warmserve_queue_wait_seconds",
            "How long requests waited for their model to be loaded",
            labels=["model"],
        )
        return add_histograms(waits, self.controller.queue_stats.waits)

    def _step_times(self) -> HistogramMetricFamily:
        steps = HistogramMetricFamily(
            "warmserve_engine_step_seconds",
            "Host time of a model's engine steps that yielded tokens, by kind: decode, mixed "
            "(decodes beside prompt tokens) or prefill, each from a captured CUDA graph (-graph) "
            "or eager",
            labels=["model", "kind"],
        )
        return add_histograms(steps, self.controller.step_stats)


def add_histograms(family: HistogramMetricFamily, histograms: Histograms) -> HistogramMetricFamily:
    for labels, counts in histograms.counts.items():
        cumulative, buckets = 0, []
        for bound, count in zip((*histograms.bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
        family.add_metric(list(labels), buckets, histograms.sums[labels])
    return family
