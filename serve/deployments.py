"""The model deployment: one per served model, a serve/services.py service behind @serve.batch.

A request's items (images, pairs, queries) enter the batcher one by one, so items of concurrent
requests share a model call. Batching comes from the deployment's `user_config` in serve.yaml
({max_batch_size, batch_wait_timeout_s}; max_batch_size 1 = off) and can change without a restart
(Serve calls `reconfigure`). Model calls run in a worker thread, so the replica's event loop keeps
collecting the next batch meanwhile.

Every answer names the replica that computed it (`served_by`: its Ray node id and Serve replica
id); the gateway turns that into the X-Attrlab-Node / X-Attrlab-Replica response headers.
`call_model` is how the gateway calls a ModelServer: a call whose replica died under it (SIGKILL,
OOM, a lost node) is sent once more, to a live replica (inference is idempotent); anything else,
a client error above all, is never retried.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import numpy as np
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from serve.schemas import RequestError

DEFAULT_BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}
SERVED_BY = "served_by"  # the key of an answer's {"node", "replica"}
NODE_HEADER, REPLICA_HEADER = "X-Attrlab-Node", "X-Attrlab-Replica"


def replica_failed(exc: BaseException) -> bool:
    """Whether a model call failed because the replica serving it died or became unreachable, so
    sending it again (to another replica) may succeed: Ray's RayActorError family (ActorDiedError
    when the replica process died mid-request, ActorUnavailableError when it cannot be reached),
    also when it arrives wrapped in a RayTaskError. Never a client error (RequestError, 4xx) nor an
    exception raised by the model code itself (a RayTaskError of, e.g., ValueError)."""
    if isinstance(exc, RequestError):
        return False
    if isinstance(exc, RayActorError):
        return True
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), RayActorError)


async def call_model(handle: Any, method: str, *args: Any, model: str = "",
                     on_retry: Callable[[BaseException], None] | None = None) -> Any:
    """`await handle.<method>.remote(*args)`, sent once more if the replica died under the first
    call (`replica_failed`; `on_retry` sees that error). A second replica failure is a 503 naming
    the model: the client may retry once Serve has replaced the replica."""
    try:
        return await getattr(handle, method).remote(*args)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a replica failure
        if not replica_failed(e):
            raise
        if on_retry is not None:
            on_retry(e)
    try:
        return await getattr(handle, method).remote(*args)
    except Exception as e:  # noqa: BLE001
        if replica_failed(e):
            raise RequestError(503, "model", f"model {model!r}: its replicas failed twice while answering; "
                                             "retry in a few seconds") from e
        raise


def served_headers(out: dict[str, Any]) -> dict[str, str]:
    """Pop an answer's `served_by` and return it as response headers (empty when absent)."""
    who = out.pop(SERVED_BY, None) or {}
    return {h: str(who[k]) for h, k in ((NODE_HEADER, "node"), (REPLICA_HEADER, "replica")) if who.get(k)}


def _replica_identity() -> dict[str, str]:
    """This replica's Ray node id and Serve replica id (empty strings outside a replica)."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not inside a Serve replica (a unit test)
        replica = ""
    return {"node": node or "", "replica": replica}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64, user_config=DEFAULT_BATCH)
class ModelServer:
    def __init__(self, name: str, run: str, index: str | None = None) -> None:
        from serve.metrics import metrics
        from serve.services import load_service

        self.service = load_service(name, run, index)
        self.name = name
        self.version = self.service.info().version
        self.m = metrics()
        self.served_by = _replica_identity()
        self._gauges()

    def _gauges(self) -> None:
        # set again at every info() call: a gauge set once in __init__ did not always reach the export
        info = self.service.info()
        self.m.index_size.set(info.index_size, tags={"model": self.name})
        self.m.model_info.set(1, tags={"model": self.name, "method": info.method, "version": info.version})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = {**DEFAULT_BATCH, **(user_config or {})}
        unknown = sorted(set(cfg) - set(DEFAULT_BATCH))
        if unknown:
            raise ValueError(f"user_config: unknown key {unknown[0]!r}; expected {sorted(DEFAULT_BATCH)}")
        size, wait = int(cfg["max_batch_size"]), float(cfg["batch_wait_timeout_s"])
        if size < 1 or wait < 0:
            raise ValueError("user_config: max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        for fn in (self._rank, self._compare, self._search, self._latent, self._translate):
            fn.set_max_batch_size(size)
            fn.set_batch_wait_timeout_s(wait)

    def info(self) -> dict[str, Any]:
        self._gauges()
        return self.service.info().to_json()

    async def _run(self, op: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = await asyncio.to_thread(fn, *args)
        self.m.inference.observe(time.perf_counter() - t0, tags={"model": self.name, "op": op})
        return out

    def _observe(self, op: str, n: int) -> None:
        self.m.batch.observe(n, tags={"model": self.name, "op": op})

    # -- one public method per op: the request's items go through the batcher one by one ---------

    # each returns {"version", "results", "served_by"}: the version of the replica that answered,
    # so a client sees when a rolling update reached it, and which replica on which node it was

    def _reply(self, results: list[Any]) -> dict[str, Any]:
        return {"version": self.version, "results": results, SERVED_BY: dict(self.served_by)}

    async def _answer(self, calls: Any) -> dict[str, Any]:
        return self._reply(list(await asyncio.gather(*calls)))

    async def rank(self, images: list[np.ndarray]) -> dict[str, Any]:
        return await self._answer(self._rank(x) for x in images)

    async def compare(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        return await self._answer(self._compare(p) for p in pairs)

    async def search(self, images: list[np.ndarray], k: int, subspace: str | None = None) -> dict[str, Any]:
        return await self._answer(self._search((x, k, subspace)) for x in images)

    async def term(self, kind: str, attribute: str, value: str, k: int) -> dict[str, Any]:
        """A query term (coop_embed): no image to batch, one numpy / faiss search."""
        hits = await self._run("term", self.service.term_search, kind, attribute, value, k)
        return self._reply([hits])

    async def latent(self, queries: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._answer(self._latent(q) for q in queries)

    async def translate(self, images: list[np.ndarray], v: np.ndarray, steps: int) -> dict[str, Any]:
        return await self._answer(self._translate((x, v, steps)) for x in images)

    # -- the batched model calls ---------------------------------------------------------------

    @serve.batch(**DEFAULT_BATCH)
    async def _rank(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        self._observe("rank", len(images))
        return await self._run("rank", self.service.rank, images)

    @serve.batch(**DEFAULT_BATCH)
    async def _compare(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, float]]:
        self._observe("compare", len(pairs))
        return await self._run("compare", self.service.compare, pairs)

    @serve.batch(**DEFAULT_BATCH)
    async def _search(self, items: list[tuple[np.ndarray, int, str | None]]) -> list[list[dict[str, Any]]]:
        self._observe("search", len(items))

        def run() -> list[list[dict[str, Any]]]:
            out: list[list[dict[str, Any]]] = [[] for _ in items]
            for sub in {s for _, _, s in items}:  # one search per space, at its largest k
                idx = [i for i, it in enumerate(items) if it[2] == sub]
                hits = self.service.search([items[i][0] for i in idx], max(items[i][1] for i in idx), sub)
                for i, h in zip(idx, hits):
                    out[i] = h[:items[i][1]]
            return out

        return await self._run("search", run)

    @serve.batch(**DEFAULT_BATCH)
    async def _latent(self, queries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        self._observe("latent", len(queries))

        def run() -> list[list[dict[str, Any]]]:
            to_encode = [i for i, q in enumerate(queries) if q.get("image") is not None]
            latents = [q.get("latent") for q in queries]
            if to_encode:
                for i, w in zip(to_encode, self.service.encode([queries[i]["image"] for i in to_encode])):
                    latents[i] = w
            k = max(q["k"] for q in queries)
            hits = self.service.search(np.stack(latents), np.stack([q["adjust"] for q in queries]),
                                       np.stack([q["prefer"] for q in queries]), k)
            return [h[:q["k"]] for h, q in zip(hits, queries)]

        return await self._run("latent", run)

    @serve.batch(**DEFAULT_BATCH)
    async def _translate(self, items: list[tuple[np.ndarray, np.ndarray, int]]) -> list[bytes]:
        self._observe("translate", len(items))

        def run() -> list[bytes]:
            out: list[bytes | None] = [None] * len(items)
            for steps in sorted({s for _, _, s in items}):  # one generator call per strip length
                idx = [i for i, (_, _, s) in enumerate(items) if s == steps]
                pngs = self.service.translate([items[i][0] for i in idx], np.stack([items[i][1] for i in idx]), steps)
                for i, png in zip(idx, pngs):
                    out[i] = png
            return out  # type: ignore[return-value]

        return await self._run("translate", run)
