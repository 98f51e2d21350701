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

from serve.deployments import ModelServer
from serve.queries import latent_queries, need_images, subspace_of, term_query
from serve.schemas import Limits, RequestError, install_handlers, parse_int, parse_vector, read_request

INFO_TTL_S = 5.0  # how long the ingress trusts a model's attributes / ops before asking again
api = FastAPI(title="attrlab", description="visual-attribute ranking, retrieval, face search and translation")
install_handlers(api)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Gateway:
    def __init__(self, models: dict[str, Any], limits: dict[str, Any] | None = None) -> None:
        from serve.metrics import metrics

        self.models = models  # name -> DeploymentHandle of its ModelServer
        self.limits = Limits.from_dict(limits or {})
        self.m = metrics()
        self._info: dict[str, tuple[float, dict[str, Any]]] = {}  # name -> (when, ModelServer.info())

    async def _model(self, name: str, op: str, route: str) -> tuple[Any, dict[str, Any]]:
        if name not in self.models:
            raise RequestError(404, "model", f"unknown model {name!r}; served: {sorted(self.models)}")
        cached = self._info.get(name)
        if cached is None or time.monotonic() - cached[0] > INFO_TTL_S:  # a rolling update may change it
            self._info[name] = (time.monotonic(), await self.models[name].info.remote())
        info = self._info[name][1]
        if op not in info["ops"]:
            raise RequestError(404, "model", f"model {name!r} ({info['method']}) does not serve {route}; "
                                             f"its routes: {info['routes']}")
        return self.models[name], info

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
        infos = [await h.info.remote() for h in self.models.values()]
        self._info.update({i["name"]: (time.monotonic(), i) for i in infos})
        return {"models": infos}

    # each route: the work in a private method (a closure here would lose this module's globals
    # once Serve's ingress wrapper rebuilds the class), timed and error-counted by _timed

    @api.post("/v1/rank/{model}")
    async def rank(self, model: str, request: Request) -> dict[str, Any]:
        return await self._timed("/v1/rank", model, self._rank(model, request))

    async def _rank(self, model: str, request: Request) -> dict[str, Any]:
        handle, _ = await self._model(model, "rank", "/v1/rank")
        req = await read_request(request, self.limits)
        return {"model": model, **await handle.rank.remote(need_images(req.images))}

    @api.post("/v1/rank/{model}/compare")
    async def compare(self, model: str, request: Request) -> dict[str, Any]:
        return await self._timed("/v1/rank/compare", model, self._compare(model, request))

    async def _compare(self, model: str, request: Request) -> dict[str, Any]:
        handle, _ = await self._model(model, "compare", "/v1/rank/compare")
        req = await read_request(request, self.limits)
        if not req.pairs:
            raise RequestError(422, "pairs", "send image pairs: JSON {\"pairs\": [[a, b], ...]} (base64) or "
                                             "multipart image_a / image_b files")
        out = await handle.compare.remote(req.pairs)
        return {"model": model, "version": out["version"], "results": [{"p_first": p} for p in out["results"]]}

    @api.post("/v1/search/{model}")
    async def search(self, model: str, request: Request) -> dict[str, Any]:
        return await self._timed("/v1/search", model, self._search(model, request))

    async def _search(self, model: str, request: Request) -> dict[str, Any]:
        handle, info = await self._model_any(model, ("search", "latent"), "/v1/search")
        req = await read_request(request, self.limits)
        k = parse_int(req.fields.get("k"), "k", 1, self.limits.max_k, default=10)
        if "latent" in info["ops"]:
            out = await handle.latent.remote(latent_queries(req, info, k))
        elif term_query(req.fields):
            out = await handle.term.remote(*term_query(req.fields, req.images, info), k)
        else:
            sub = subspace_of(req.fields, info)
            out = await handle.search.remote(need_images(req.images), k, sub)
        return {"model": model, "k": k, **out}

    async def _model_any(self, name: str, ops: tuple[str, ...], route: str) -> tuple[Any, dict[str, Any]]:
        for op in ops[:-1]:
            try:
                return await self._model(name, op, route)
            except RequestError as e:
                if e.field != "model" or name not in self.models:
                    raise
        return await self._model(name, ops[-1], route)

    @api.post("/v1/translate/{model}", response_model=None)
    async def translate(self, model: str, request: Request) -> Union[Response, dict[str, Any]]:
        return await self._timed("/v1/translate", model, self._translate(model, request))

    async def _translate(self, model: str, request: Request) -> Union[Response, dict[str, Any]]:
        handle, info = await self._model(model, "translate", "/v1/translate")
        req = await read_request(request, self.limits)
        images = need_images(req.images)
        v = parse_vector(req.fields.get("v"), "v", len(info["attributes"]), -1.0, 1.0)
        steps = parse_int(req.fields.get("steps"), "steps", 1, self.limits.max_steps, default=1)
        out = await handle.translate.remote(images, v, steps)
        pngs, headers = out["results"], {"X-Model-Version": out["version"]}
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
