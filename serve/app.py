"""The attrlab Serve application: one FastAPI ingress (OpenAPI docs at /docs) composed with one
ModelServer deployment per served model (serve/deployments.py) through deployment handles.

    GET  /healthz                          liveness: {"status": "ok", "models": N}
    GET  /v1/models                        name, method, version, checkpoint, index size, attributes, routes
    POST /v1/rank/{model}                  images -> per-attribute strength (+ the STN box)
    POST /v1/rank/{model}/compare          pairs -> P(first > second) per attribute (stn_ranker, trip)
    POST /v1/search/{model}                coop_embed / deml: images, k -> top-k keys and distances;
                                           latent_retrieval: image or latent + adjust + prefer, k
    POST /v1/translate/{model}             trip: image + v (K values in [-1, 1]) [+ steps] -> PNG
Images: multipart uploads (`image`, `images`, `image_a`/`image_b`) or base64 JSON (serve/schemas.py).
Every client error is a 4xx JSON body {"error": {"status", "field", "message"}}; never a 500.
Every model answer carries the headers X-Attrlab-Node (the Ray node id of the replica that computed
it) and X-Attrlab-Replica (its Serve replica id). A model call whose replica died under it is sent
once more to a live replica (counted in attrlab_retries_total); a second failure is a 503.

`build_app(args)` is the application builder serve.yaml's `import_path: serve.app:build_app` names,
so the same file deploys through `attrlab serve --config` and Ray's own `serve deploy`.
"""
# no `from __future__ import annotations` here: FastAPI must resolve the route annotations
# (Request) at runtime, and Serve's ingress wrapper rebinds the methods outside this module's globals
import base64
import time
from typing import Any, Mapping, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve.deployments import NODE_HEADER, REPLICA_HEADER, ModelServer, call_model, served_headers
from serve.queries import latent_queries, need_images, subspace_of, term_query
from serve.schemas import Limits, RequestError, install_handlers, parse_int, parse_vector, read_request

INFO_TTL_S = 5.0  # how long the ingress trusts a model's attributes / ops before asking again
api = FastAPI(title="attrlab", description=(
    "Visual-attribute ranking, retrieval, face search and translation.\n\n"
    f"Every model answer names who computed it: `{NODE_HEADER}` is the Ray node id of the serving "
    f"replica (as in `ray.nodes()`), `{REPLICA_HEADER}` its Serve replica id (as in the replica's "
    "logs and metrics tags). A model call whose replica died mid-request is retried once on a live "
    "replica; `503` means it failed twice (retry shortly)."))
install_handlers(api)
SERVED_BY_HEADERS = {NODE_HEADER: {"description": "Ray node id of the replica that computed this answer",
                                   "schema": {"type": "string"}},
                     REPLICA_HEADER: {"description": "Serve replica id of the replica that computed this answer",
                                      "schema": {"type": "string"}}}
MODEL_RESPONSES: dict[Union[int, str], dict[str, Any]] = {
    200: {"headers": SERVED_BY_HEADERS},
    503: {"description": "the model's replicas failed twice while answering; retry shortly"}}


# graceful_shutdown_timeout_s: a rolling update restarts the gateway along with the models, whose
# new replicas may take longer than Serve's default 20 s to load; the old gateway meanwhile holds
# requests queued for them and is force-killed (a 500 for each) when this runs out
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256, graceful_shutdown_timeout_s=90)
@serve.ingress(api)
class Gateway:
    def __init__(self, models: dict[str, Any], limits: dict[str, Any] | None = None) -> None:
        from serve.metrics import metrics

        self.models = models  # name -> DeploymentHandle of its ModelServer
        self.limits = Limits.from_dict(limits or {})
        self.m = metrics()
        self._info: dict[str, tuple[float, dict[str, Any]]] = {}  # name -> (when, ModelServer.info())

    async def _model(self, name: str, op: str, route: str) -> dict[str, Any]:
        """Model `name`'s info, checked to serve `op` (a 404 naming the model otherwise)."""
        if name not in self.models:
            raise RequestError(404, "model", f"unknown model {name!r}; served: {sorted(self.models)}")
        cached = self._info.get(name)
        if cached is None or time.monotonic() - cached[0] > INFO_TTL_S:  # a rolling update may change it
            self._info[name] = (time.monotonic(), await self._call(name, "info"))
        info = self._info[name][1]
        if op not in info["ops"]:
            raise RequestError(404, "model", f"model {name!r} ({info['method']}) does not serve {route}; "
                                             f"its routes: {info['routes']}")
        return info

    async def _call(self, name: str, method: str, *args: Any) -> Any:
        """A call of model `name`'s deployment, retried once if its replica died (serve/deployments.py)."""
        return await call_model(self.models[name], method, *args, model=name, on_retry=self._retried(name))

    def _retried(self, name: str) -> Any:
        retries = self.m.retries
        return lambda e: retries.inc(tags={"model": name, "error": type(e).__name__})

    async def _timed(self, route: str, model: str, call: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await call
        except RequestError as e:
            self.m.errors.inc(tags={"route": route, "kind": f"{e.status}:{e.field}"})
            raise
        finally:  # an unknown name is one tag value: clients must not create unbounded series
            tag = model if model in self.models else "_unknown"
            self.m.latency.observe(time.perf_counter() - t0, tags={"route": route, "model": tag})

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": len(self.models)}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        infos = [await self._call(name, "info") for name in self.models]
        self._info.update({i["name"]: (time.monotonic(), i) for i in infos})
        return {"models": infos}

    # each route: the work in a private method (a closure here would lose this module's globals
    # once Serve's ingress wrapper rebuilds the class), timed and error-counted by _timed

    @api.post("/v1/rank/{model}", responses=MODEL_RESPONSES)
    async def rank(self, model: str, request: Request, response: Response) -> dict[str, Any]:
        return await self._timed("/v1/rank", model, self._rank(model, request, response))

    async def _rank(self, model: str, request: Request, response: Response) -> dict[str, Any]:
        await self._model(model, "rank", "/v1/rank")
        req = await read_request(request, self.limits)
        out = await self._call(model, "rank", need_images(req.images))
        response.headers.update(served_headers(out))
        return {"model": model, **out}

    @api.post("/v1/rank/{model}/compare", responses=MODEL_RESPONSES)
    async def compare(self, model: str, request: Request, response: Response) -> dict[str, Any]:
        return await self._timed("/v1/rank/compare", model, self._compare(model, request, response))

    async def _compare(self, model: str, request: Request, response: Response) -> dict[str, Any]:
        await self._model(model, "compare", "/v1/rank/compare")
        req = await read_request(request, self.limits)
        if not req.pairs:
            raise RequestError(422, "pairs", "send image pairs: JSON {\"pairs\": [[a, b], ...]} (base64) or "
                                             "multipart image_a / image_b files")
        out = await self._call(model, "compare", req.pairs)
        response.headers.update(served_headers(out))
        return {"model": model, "version": out["version"], "results": [{"p_first": p} for p in out["results"]]}

    @api.post("/v1/search/{model}", responses=MODEL_RESPONSES)
    async def search(self, model: str, request: Request, response: Response) -> dict[str, Any]:
        return await self._timed("/v1/search", model, self._search(model, request, response))

    async def _search(self, model: str, request: Request, response: Response) -> dict[str, Any]:
        info = await self._model_any(model, ("search", "latent"), "/v1/search")
        req = await read_request(request, self.limits)
        k = parse_int(req.fields.get("k"), "k", 1, self.limits.max_k, default=10)
        if "latent" in info["ops"]:
            out = await self._call(model, "latent", latent_queries(req, info, k))
        elif term_query(req.fields):
            out = await self._call(model, "term", *term_query(req.fields, req.images, info), k)
        else:
            sub = subspace_of(req.fields, info)
            out = await self._call(model, "search", need_images(req.images), k, sub)
        response.headers.update(served_headers(out))
        return {"model": model, "k": k, **out}

    async def _model_any(self, name: str, ops: tuple[str, ...], route: str) -> dict[str, Any]:
        for op in ops[:-1]:
            try:
                return await self._model(name, op, route)
            except RequestError as e:
                if e.field != "model" or name not in self.models:
                    raise
        return await self._model(name, ops[-1], route)

    @api.post("/v1/translate/{model}", response_model=None, responses=MODEL_RESPONSES)
    async def translate(self, model: str, request: Request) -> Union[Response, dict[str, Any]]:
        return await self._timed("/v1/translate", model, self._translate(model, request))

    async def _translate(self, model: str, request: Request) -> Union[Response, dict[str, Any]]:
        info = await self._model(model, "translate", "/v1/translate")
        req = await read_request(request, self.limits)
        images = need_images(req.images)
        v = parse_vector(req.fields.get("v"), "v", len(info["attributes"]), -1.0, 1.0)
        steps = parse_int(req.fields.get("steps"), "steps", 1, self.limits.max_steps, default=1)
        out = await self._call(model, "translate", images, v, steps)
        pngs, headers = out["results"], {"X-Model-Version": out["version"], **served_headers(out)}
        if len(pngs) == 1:
            return Response(content=pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"model": model, "version": out["version"], "steps": steps,
                             "images": [base64.b64encode(p).decode() for p in pngs]}, headers=headers)


def build_app(args: Mapping[str, Any]) -> Any:
    """serve.yaml `args`: models: {name: {run: DIR, index: DIR (optional)}}, limits: {...} (optional).
    Each model becomes the deployment `model-<name>` (name it under `deployments:` to set its
    replicas, autoscaling, CPUs / GPUs and batching), the ingress is `gateway`."""
    from serve.config import check_args

    models, limits = check_args(args)
    handles = {name: ModelServer.options(name=f"model-{name}").bind(name, spec["run"], spec.get("index"))
               for name, spec in models.items()}
    return Gateway.options(name="gateway").bind(handles, limits)
