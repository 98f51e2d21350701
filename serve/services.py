"""The models behind the HTTP routes, free of Ray: each service loads a weights-only export
(a run directory or its export/, jobs.evaluate.load_model_dir) and answers a whole batch at once.

The Serve deployments (serve/deployments.py) batch requests with @serve.batch and call these;
the serving benchmark calls them in-process to measure what Serve adds. Images arrive as uint8
[H, W, 3] arrays (serve/schemas.py decodes and checks them) and are resized the way the eval
loader does (shards/augment.py: square resize, then the centre crop the model was trained on).

    RankService       stn_ranker: per-attribute strength + the STN box; pairs: P(first > second)
                      = sigmoid(s_a - s_b) (the RankNet probability the ranker is trained on).
                      trip: its ranker scores pairs only (R(x, y) is relative, Eq. 5a):
                      P(first > second) = clip((R(second, first) + 1) / 2, 0, 1).
    SearchService     coop_embed / deml: embed, normalise as the index was built, faiss top-k
    LatentService     latent_retrieval: encode (or take a latent), adjust, preference-weighted exact top-k
    TranslateService  trip: G(x, v) as PNG, or a strip of n steps from -v to v
"""
from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shards.format import ShardError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    method: str
    ops: list[str]  # rank, compare, search, latent, translate
    version: str  # the export's step and checkpoint directory: changes with every new deployment
    checkpoint: str
    attributes: list[str]
    index_size: int = 0
    routes: list[str] = field(default_factory=list)
    latent_dim: int = 0  # latent_retrieval: the length of a `latent` query
    terms: dict[str, Any] = field(default_factory=dict)  # coop_embed: {attributes: {name: [values]}, categories}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def to_batch(images: list[np.ndarray], resize: int, size: int) -> torch.Tensor:
    """uint8 [B, 3, size, size]: each image resized to resize x resize (antialiased bilinear),
    then centre-cropped to size, as the eval loader prepares them."""
    out = []
    for im in images:
        x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
        if x.shape[1:] != (resize, resize):
            x = F.interpolate(x[None].float(), size=(resize, resize), mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        o = (resize - size) // 2
        out.append(x[:, o:o + size, o:o + size])
    return torch.stack(out).contiguous()


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 [3, H, W] -> PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buf, format="PNG")
    return buf.getvalue()


ROUTE_OF_OP = {"rank": "/v1/rank/{name}", "compare": "/v1/rank/{name}/compare", "search": "/v1/search/{name}",
               "latent": "/v1/search/{name}", "translate": "/v1/translate/{name}"}


class Service:
    kind = ""
    methods: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()  # what the deployment answers: rank, compare, search, latent, translate

    def __init__(self, name: str, run: str | Path) -> None:
        from jobs.checkpoints import latest_export, read_state
        from jobs.evaluate import load_model_dir

        path = Path(run)
        if not path.is_dir():
            raise ShardError(f"models.{name}.run: {path} is not a run or export directory")
        self.name = name
        self.method, self.cfg, self.model, self.meta = load_model_dir(path)
        if self.method.name not in self.methods:
            raise ShardError(f"models.{name}: a {self.method.name} run cannot serve {self.kind}; "
                             f"{self.kind} serves {list(self.methods)}")
        export = path if (path / "model.safetensors").is_file() else latest_export(path)
        self.checkpoint = export.parent
        self.version = f"step-{read_state(self.checkpoint)['step']}-{self.checkpoint.name}"
        self.model.eval()

    def attributes(self) -> list[str]:
        return list(getattr(self.inner(), "attributes", ()))

    def inner(self) -> Any:
        return self.model

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.method.name, list(self.ops), self.version, str(self.checkpoint),
                         self.attributes(), self.index_size(), self.routes(), int(self.latent_dim), self.term_lists())

    latent_dim = 0  # LatentService: the length of a `latent` query

    def term_lists(self) -> dict[str, Any]:
        return {}  # SearchService: what a query term may name

    def index_size(self) -> int:
        index = getattr(self, "index", None)
        return int(index.ntotal) if index is not None else 0

    def routes(self) -> list[str]:
        return [ROUTE_OF_OP[op].format(name=self.name) for op in self.ops]


class RankService(Service):
    kind, methods, ops = "rank", ("stn_ranker",), ("rank", "compare")

    def inner(self) -> Any:
        from models.registry import unwrap

        if self.method.name == "trip":
            from models.trip import Trip

            return unwrap(self.model, Trip)
        from models.stn_ranker import StnRanker

        return unwrap(self.model, StnRanker)

    def _images(self, images: list[np.ndarray]) -> torch.Tensor:
        aug = self.cfg.data.augment
        if self.method.name == "trip":
            return to_batch(images, self.cfg.model.image_size, self.cfg.model.image_size)
        return to_batch(images, aug.resize, aug.resize)  # stn_ranker.predict takes the full resized image

    @torch.no_grad()
    def rank(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        from models.stn_ranker import predict

        out = predict(self.model, self._images(images))
        names = self.attributes()
        return [{"scores": dict(zip(names, map(float, s))),
                 "boxes": {n: [round(float(v), 5) for v in b] for n, b in zip(names, box)}}
                for s, box in zip(out["score"].cpu(), out["box"].cpu())]

    @torch.no_grad()
    def compare(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, float]]:
        a = self._images([p[0] for p in pairs])
        b = self._images([p[1] for p in pairs])
        names = self.attributes()
        if self.method.name == "trip":
            m = self.inner()
            r = m.ranker.rank(m.to_unit(b.to(m.cols.device)), m.to_unit(a.to(m.cols.device)))
            prob = ((r.float() + 1) / 2).clamp(0, 1)
        else:
            from models.stn_ranker import predict

            both = predict(self.model, torch.cat([a, b]))["score"].float()
            prob = torch.sigmoid(both[:len(pairs)] - both[len(pairs):])
        return [dict(zip(names, map(float, p))) for p in prob.cpu()]


class SearchService(Service):
    kind, methods, ops = "search", ("coop_embed", "deml"), ("search",)

    def __init__(self, name: str, run: str | Path, index: str | Path | None = None) -> None:
        from jobs.index import default_split
        from models.knn import load_saved_index

        super().__init__(name, run)
        path = Path(index) if index else Path(run) / "index" / f"{default_split(self.cfg)}-flat"
        try:
            self.index, self.keys, self.index_meta = load_saved_index(path)
        except (FileNotFoundError, ValueError) as e:
            raise ShardError(f"models.{name}.index: {e}; build it with `attrlab index {run}`") from None
        if self.index_meta.get("method") not in (None, self.method.name):
            raise ShardError(f"models.{name}.index: {path} indexes a {self.index_meta['method']} run")
        # coop_embed: attribute-value / category query terms (jobs/index.py writes them), and the
        # gallery vectors for per-subspace search, read back from the flat index
        self.terms = dict(np.load(path / "terms.npz")) if (path / "terms.npz").is_file() else None
        self._vectors: np.ndarray | None = None

    @functools.cached_property
    def _term_lists(self) -> dict[str, Any]:
        if self.terms is None:
            return {}
        t = self.terms
        attrs = {str(a): [str(v) for v, k, b in zip(t["value"], t["kind"], t["attribute"]) if k == "attribute" and b == a]
                 for a in t["attributes"]}
        return {"attributes": attrs, "categories": [str(v) for v, k in zip(t["value"], t["kind"]) if k == "category"]}

    def term_lists(self) -> dict[str, Any]:
        """What a term query may name: {attributes: {name: [values]}, categories: [...]} ({} without terms)."""
        return self._term_lists

    def _subspace(self, attribute: str) -> slice:
        names = [str(a) for a in self.terms["attributes"]]
        a, b = self.terms["slices"][names.index(attribute)]
        return slice(int(a), int(b))

    def vectors(self) -> np.ndarray:
        if self._vectors is None:  # the index holds the gallery L2-normalised per subspace
            raw = getattr(self.index, "index", None)
            if raw is None or not hasattr(raw, "reconstruct_n"):
                raise ShardError(f"models.{self.name}: subspace search needs a faiss flat or hnsw index")
            self._vectors = raw.reconstruct_n(0, int(raw.ntotal))
        return self._vectors

    def _nearest(self, q: np.ndarray, gallery: np.ndarray, k: int) -> list[dict[str, Any]]:
        d = ((gallery - q[None]) ** 2).sum(1)  # squared L2, faiss's convention
        top = np.argsort(d, kind="stable")[:k]
        return [{"key": self.keys[i], "distance": float(d[i])} for i in top]

    def term_search(self, kind: str, attribute: str, value: str, k: int) -> list[dict[str, Any]]:
        """Sec. 4.2: an attribute value's term searched in that attribute's subspace (both L2-normalised),
        or a category's term in the whole space (normalised per subspace, as the gallery)."""
        t = self.terms
        row = next(i for i in range(len(t["kind"]))
                   if t["kind"][i] == kind and t["attribute"][i] == attribute and t["value"][i] == value)
        q = t["mean"][row]
        if kind == "category":
            return self.search_vectors(self._normalise(q[None]), k)[0]
        sl = self._subspace(attribute)
        qs = q[sl] / max(float(np.linalg.norm(q[sl])), 1e-12)
        return self._nearest(qs, self.vectors()[:, sl], k)

    def search_vectors(self, q: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        dist, ids = self.index.search(np.ascontiguousarray(q, np.float32), min(k, self.index_size()))
        return [[{"key": self.keys[i], "distance": float(d)} for d, i in zip(dr, ir) if i >= 0]
                for dr, ir in zip(dist, ids)]

    def _normalise(self, emb: np.ndarray) -> np.ndarray:
        from models.retrieval import l2_normalize_subspaces

        norm = self.index_meta.get("normalisation", {})
        if norm.get("kind") == "l2_per_subspace":  # queries normalised as the gallery was
            emb = l2_normalize_subspaces(emb, [slice(a, b) for a, b in norm["blocks"]])
        return np.ascontiguousarray(emb, np.float32)

    @torch.no_grad()
    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        aug = self.cfg.data.augment
        return self._normalise(self.method.embed(self.model, to_batch(images, aug.resize, aug.size)).cpu().numpy())

    def search(self, images: list[np.ndarray], k: int, subspace: str | None = None) -> list[list[dict[str, Any]]]:
        """Top-k of each image in the whole space, or in one attribute's subspace (coop_embed)."""
        emb = self.embed(images)
        if subspace is None:
            return self.search_vectors(emb, k)
        sl = self._subspace(subspace)
        return [self._nearest(e[sl], self.vectors()[:, sl], min(k, self.index_size())) for e in emb]


class LatentService(Service):
    kind, methods, ops = "latent", ("latent_retrieval",), ("latent",)

    def __init__(self, name: str, run: str | Path, index: str | Path | None = None) -> None:
        from jobs.latent import query_context
        from models.latent_index import PreferenceIndex

        super().__init__(name, run)
        names, self.a_min, self.a_max, index_dir = query_context(Path(run), Path(index) if index else None)
        if not (index_dir / "meta.json").is_file():
            raise ShardError(f"models.{name}.index: {index_dir} holds no preference index; build it with "
                             f"`attrlab index {run} --kind preference`")
        self.index = PreferenceIndex.load(index_dir)
        self.directions = torch.from_numpy(np.asarray(self.index.directions, np.float64))

    def attributes(self) -> list[str]:
        return list(self.inner().attributes)

    def inner(self) -> Any:
        from models.latent_retrieval import _unwrap

        return _unwrap(self.model)

    @property
    def latent_dim(self) -> int:
        return int(self.index.dim)

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        size = self.cfg.model.image_size
        return self.method.embed(self.model, to_batch(images, size, size)).double().cpu().numpy()

    @torch.no_grad()
    def search(self, latents: np.ndarray, adjust: np.ndarray, prefer: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """latents [B, D]; adjust [B, K] target intensities in [0, 1] (NaN = keep); prefer [B, K] >= 0."""
        from models import latent_directions as ld

        w = torch.from_numpy(np.asarray(latents, np.float64))
        c_t = ld.adjust_target(ld.projections(w, self.directions), torch.from_numpy(adjust),
                               self.a_min.double(), self.a_max.double()).numpy()
        out = []
        for i in range(len(w)):  # one exact search per query: p differs per request
            dist, ids = self.index.search(w[i:i + 1].numpy(), prefer[i], min(k, self.index_size()), c_target=c_t[i:i + 1])
            keys = self.index.keys or [str(j) for j in range(self.index_size())]
            out.append([{"key": keys[j], "distance": float(d)} for d, j in zip(dist[0], ids[0]) if j >= 0])
        return out


class TranslateService(Service):
    kind, methods, ops = "translate", ("trip",), ("translate",)

    def inner(self) -> Any:
        from models.registry import unwrap
        from models.trip import Trip

        return unwrap(self.model, Trip)

    @torch.no_grad()
    def translate(self, images: list[np.ndarray], v: np.ndarray, steps: int = 1) -> list[bytes]:
        """v [B, K] in [-1, 1]; steps > 1: a horizontal strip of G(x, t v), t from -1 to 1."""
        m = self.inner()
        size = self.cfg.model.image_size
        x = to_batch(images, size, size)
        vt = torch.from_numpy(np.asarray(v, np.float32))
        if steps <= 1:
            return [png_bytes(img) for img in m.translate(x, vt).cpu()]
        ts = torch.linspace(-1.0, 1.0, steps)
        frames = [m.translate(x, vt * t).cpu() for t in ts]  # each [B, 3, s, s]
        return [png_bytes(torch.cat([f[i] for f in frames], dim=2)) for i in range(len(images))]


class TripService(TranslateService, RankService):
    """trip: translation, and its ranker for pair scoring."""

    kind, methods, ops = "translate", ("trip",), ("translate", "compare")



SERVICE_OF_METHOD: dict[str, type[Service]] = {"stn_ranker": RankService, "coop_embed": SearchService,
                                               "deml": SearchService, "latent_retrieval": LatentService,
                                               "trip": TripService}


def method_of(run: str | Path) -> str:
    """The method of a run or export directory (its latest export's state.json), before loading it."""
    from jobs.checkpoints import latest_export, read_state

    path = Path(run)
    export = path if (path / "model.safetensors").is_file() else latest_export(path)
    return str(read_state(export.parent)["method"])


def load_service(name: str, run: str | Path, index: str | Path | None = None) -> Service:
    method = method_of(run)
    if method not in SERVICE_OF_METHOD:
        raise ShardError(f"models.{name}.run: a {method} run; attrlab serves {sorted(SERVICE_OF_METHOD)}")
    cls = SERVICE_OF_METHOD[method]
    if cls in (SearchService, LatentService):
        return cls(name, run, index)  # type: ignore[call-arg]
    if index:
        raise ShardError(f"models.{name}.index: a {method} model has no index; remove the key")
    return cls(name, run)
