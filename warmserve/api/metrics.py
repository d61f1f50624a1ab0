"""Prometheus metrics: one registry per gateway app, so several servers can live in one process.

Request figures are recorded as requests finish; load and unload durations from the
controller's events, so loads on demand, idle unloads and evictions count as well as admin
requests; pool figures (worker states, memory, host cache) are read from the controller at
scrape time so they can never go stale.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warmserve.api.model_metrics import ModelCollector

WORKER_STATES = ("starting", "ready", "dead")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_INTERVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Requests that matched no route share one label value, so probing random paths adds no series.
UNMATCHED_ROUTE = "unmatched"
# The controller's policy counters, exposed as warmserve_<name>_total.
POLICY_COUNTERS = {
    "auto_loads": "Registered models loaded on demand by a request",
    "evictions": "Idle models unloaded to make room for another model",
    "idle_unloads": "Models unloaded after their keep-alive expired (keep_alive 0 included)",
}


class PoolCollector:
    """Reads the worker pool, the host weight store and the policy counters from the controller
    on every scrape."""

    def __init__(self, controller):
        self.controller = controller

    def collect(self):
        state = GaugeMetricFamily(
            "warmserve_worker_state",
            "1 for the state each worker is in, 0 for the others",
            labels=["worker", "state"],
        )
        used = GaugeMetricFamily(
            "warmserve_worker_memory_used_bytes",
            "Memory a worker process holds (its baseline and its models)",
            labels=["worker"],
        )
        total = GaugeMetricFamily(
            "warmserve_worker_memory_total_bytes",
            "Memory of a worker's device",
            labels=["worker"],
        )
        for worker in self.controller.workers():
            worker_id = str(worker.id)
            for name in dict.fromkeys((*WORKER_STATES, worker.state)):
                state.add_metric([worker_id, name], 1.0 if name == worker.state else 0.0)
            used.add_metric([worker_id], worker.memory_used_bytes)
            total.add_metric([worker_id], worker.memory_total_bytes)
        in_flight = GaugeMetricFamily(
            "warmserve_model_requests_in_flight",
            "Generations running or queued per model",
            labels=["model"],
        )
        for model in self.controller.models():
            in_flight.add_metric([model.name], model.requests_in_flight)
        yield state
        yield used
        yield total
        yield in_flight
        yield GaugeMetricFamily(
            "warmserve_host_cache_bytes",
            "Bytes of model weights held in the host-memory weight store",
            value=self.controller.host_cache_bytes,
        )
        yield GaugeMetricFamily(
            "warmserve_host_cache_capacity_bytes",
            "Capacity of the host-memory weight store",
            value=self.controller.host_cache_capacity_bytes,
        )
        for name, documentation in POLICY_COUNTERS.items():
            yield CounterMetricFamily(
                f"warmserve_{name}", documentation, value=self.controller.counters[name]
            )


class Metrics:
    def __init__(self, controller):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "warmserve_requests",
            "HTTP requests answered",
            ["model", "route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "warmserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "warmserve_generation_tokens",
            "Tokens generated",
            ["model"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "warmserve_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "warmserve_time_per_output_token_seconds",
            "Mean interval between generated tokens after the first, per request",
            ["model"],
            buckets=TOKEN_INTERVAL_BUCKETS,
            registry=self.registry,
        )
        self.load_duration = Histogram(
            "warmserve_model_load_seconds",
            "Time to load a model until it answers requests, by where its weights came from",
            ["source"],
            buckets=SWAP_BUCKETS,
            registry=self.registry,
        )
        self.unload_duration = Histogram(
            "warmserve_model_unload_seconds",
            "Time to unload a model until its device memory is free",
            buckets=SWAP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(PoolCollector(controller))
        self.registry.register(ModelCollector(controller))
        self.controller = controller
        self._unloads_started: dict[str, float] = {}

    def on_model_event(self, event: str, name: str) -> None:
        """Controller listener: times every load and unload, whatever asked for it."""
        if event == "loaded":
            info = self.controller.model(name)
            if info.load_seconds is not None:
                source = info.load_source or "unknown"
                self.load_duration.labels(source).observe(info.load_seconds)
        elif event == "unloading":
            self._unloads_started[name] = time.perf_counter()
        elif event == "unloaded" and name in self._unloads_started:
            self.unload_duration.observe(time.perf_counter() - self._unloads_started.pop(name))
        elif event == "failed":
            self._unloads_started.pop(name, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_generation(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        time_to_first_token: float | None,
        time_per_output_token: float | None,
    ) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if time_to_first_token is not None:
            self.time_to_first_token.labels(model).observe(time_to_first_token)
        if time_per_output_token is not None:
            self.time_per_output_token.labels(model).observe(time_per_output_token)


class RequestCountMiddleware:
    """Counts every answered request by model, route template and status.

    Routes put the model name in `request.state.model` once they know the model exists, so
    requests for unknown names do not create series.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(
                model=scope.get("state", {}).get("model", ""),
                route=getattr(route, "path", UNMATCHED_ROUTE),
                status=str(status),
            ).inc()
