"""attrlab's serving metrics, through `ray.serve.metrics` (Ray adds the deployment, replica,
application and route tags and exports them with its own metrics; cluster/prometheus.yml scrapes
that export). Created once per replica process, on first use: metric objects need a Ray worker.

    attrlab_request_latency_seconds{route, model}      histogram, at the ingress
    attrlab_errors_total{route, kind}                  counter: kind = the HTTP status and field
    attrlab_retries_total{model, error}                counter: model calls sent again because the replica
                                                       serving them died (error = Ray's exception class)
    attrlab_batch_size{model, op}                      histogram, per @serve.batch call
    attrlab_inference_seconds{model, op}               histogram, model time per batch
    attrlab_index_size{model}                          gauge: vectors in the model's index
    attrlab_model_info{model, method, version}         gauge = 1: which checkpoint is live
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

LATENCY_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128]


@dataclass(frozen=True)
class Metrics:
    latency: Any
    errors: Any
    retries: Any
    batch: Any
    inference: Any
    index_size: Any
    model_info: Any


@functools.lru_cache(maxsize=1)
def metrics() -> Metrics:
    from ray.serve.metrics import Counter, Gauge, Histogram

    return Metrics(
        latency=Histogram("attrlab_request_latency_seconds", description="HTTP request latency at the ingress",
                          boundaries=LATENCY_BOUNDS, tag_keys=("route", "model")),
        errors=Counter("attrlab_errors_total", description="requests answered with an error, by kind",
                       tag_keys=("route", "kind")),
        retries=Counter("attrlab_retries_total", description="model calls retried once after their replica died",
                        tag_keys=("model", "error")),
        batch=Histogram("attrlab_batch_size", description="items per batched model call",
                        boundaries=BATCH_BOUNDS, tag_keys=("model", "op")),
        inference=Histogram("attrlab_inference_seconds", description="model time per batch",
                            boundaries=LATENCY_BOUNDS, tag_keys=("model", "op")),
        index_size=Gauge("attrlab_index_size", description="vectors in the model's index", tag_keys=("model",)),
        model_info=Gauge("attrlab_model_info", description="1 for the live version of each model",
                         tag_keys=("model", "method", "version")),
    )
