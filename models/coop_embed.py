"""coop_embed — "Cooperative Embeddings for Instance, Attribute and Category Retrieval",
W. Thong, C. G. M. Snoek, A. W. M. Smeulders, 2019 (papers/coop_embed.txt; REFERENCE_NOTES.md).

f(x) = a backbone (torchvision ResNet-50, random init or a local weights file; or the small CPU
CNN) + a linear projection to the superspace U = A_1 (+) ... (+) A_K of N = K x n dimensions.
Attribute k owns the columns [k n, (k+1) n) (the disjoint binary masks M_k of Sec. 3.1, as
column blocks). Learned latent proxies: one per training instance p_i in U (Eq. 1), one per value
of each attribute a_{k,v} in A_k (Eq. 2, stored as [V_k, n]: M_k (.) a has no other columns), and
category proxies c_y = mean of the p_i of the category's instances (Eq. 5, derived each step).

Loss (Eq. 6-7):  L = l_ins L_ins + l_attr / K sum_k L_attr_k + l_cat L_cat + l_reg ||f(x)||^2
                     + l_order sum_{ordinal k} R_order(k)   (Eq. 3-4, `order: true`)
with L_* = -log softmax(-squared Euclidean distance) to the proxies; an image's missing attribute
(NaN) drops out of its L_attr_k. Attributes: categorical values as they are; binary = 2 values;
continuous attributes are quantised into `bins` ordered values (ordinal, so Eq. 3-4 applies).
Proxies start N(0, 1/n) (each subspace block has norm ~1; the paper says only "random").
Learning rates (Sec. 4.3): backbone x0.1, projection x1, proxies x10 (param groups).

Ablations as config (Tables 1-2): the lambdas (Table 1a), `subspace_width` (1b), `order` (1c),
`learn_instance_proxies` / `learn_attribute_proxies` (2a), `corrupt_mode` + `corrupt_level`
(2b: one attribute value of a `corrupt_level` fraction of the training instances made absent,
swapped to another value, or either, chosen per instance from a seeded hash), `lambda_reg` (2c).
Table 3 alternatives: `head: mtl` (a: K + 1 classification heads on the backbone features, which
are the embedding) and `head: csn` (c: K + 2 concatenated subspaces - instance, category, one per
attribute - each trained with a batch-all triplet loss).

Retrieval (Sec. 4.2, models/retrieval.py): per-subspace L2 normalisation; instance R@K query ->
gallery of unseen instances; attribute-value mAP (query term = mean training embedding with the
value, in its subspace); category mAP (mean training embedding of the category, superspace);
MAE / MRR for ordinal attributes (Table 1c).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import ImageNorm, feature_net
from models.losses import batch_all_triplet_loss, mean_rows, order_regulariser, proxy_softmax_loss
from models.registry import LoaderFactory, Method, ParamGroup, StepInfo, autocast, eval_mode, lazy_figures, unwrap
from shards.augment import stable_id
from shards.format import DatasetMeta, ShardError

VOCAB_KEY = "coop_embed_vocab"  # meta.extra entry: the training instances and their categories


@dataclass(frozen=True)
class CoopEmbedConfig:
    """The `model:` section of coop_embed."""

    backbone: Literal["resnet50", "small"] = "small"
    weights: str = ""  # local torchvision resnet50 state_dict (backbone resnet50); '' = random init
    head: Literal["cooperative", "mtl", "csn"] = "cooperative"  # mtl / csn = Table 3 a / c
    attributes: tuple[str, ...] = ()  # () = every attribute of the dataset
    subspace_width: int = 16  # n (the paper: 50)
    bins: int = 5  # ordered values per continuous attribute
    lambda_ins: float = 1.0
    lambda_attr: float = 1.0
    lambda_cat: float = 1.0
    lambda_reg: float = 0.5  # Eq. 7 (Table 2c: 0.5)
    order: bool = True  # Eq. 3-4 on ordinal attributes
    lambda_order: float = 1.0
    order_sigma: float = 1.0
    learn_instance_proxies: bool = True
    learn_attribute_proxies: bool = True
    corrupt_mode: Literal["none", "absence", "swap", "both"] = "none"
    corrupt_level: float = 0.0  # fraction of training instances with one corrupted attribute value
    corrupt_seed: int = 0
    triplet_margin: float = 0.2  # head csn
    query_split: str = "query"  # evaluation: queries of unseen instances ...
    gallery_split: str = "gallery"  # ... against this gallery (= data.test_split for `attrlab eval`)
    term_split: str = "train"  # attribute / category query terms = mean embeddings of this split

    def __post_init__(self) -> None:
        if self.subspace_width < 1 or self.bins < 2:
            raise ValueError("subspace_width must be >= 1 and bins >= 2")
        if not 0 <= self.corrupt_level <= 1:
            raise ValueError(f"corrupt_level must be in [0, 1], got {self.corrupt_level}")
        if (self.corrupt_mode == "none") != (self.corrupt_level == 0):
            raise ValueError("corrupt_mode and corrupt_level go together: both set, or 'none' and 0")
        if min(self.lambda_ins, self.lambda_attr, self.lambda_cat, self.lambda_reg, self.lambda_order) < 0:
            raise ValueError("the lambda_* weights must be >= 0")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes lists a name twice: {list(self.attributes)}")


@dataclass(frozen=True)
class AttrInfo:
    name: str
    column: int  # index in the dataset's attribute vector
    kind: str
    n_values: int
    ordinal: bool


def attribute_infos(cfg: CoopEmbedConfig, meta: DatasetMeta) -> list[AttrInfo]:
    names = cfg.attributes or meta.attribute_names
    out = []
    for name in names:
        if name not in meta.attribute_names:
            raise ShardError(f"model.attributes: {name!r} is not an attribute of dataset {meta.name!r}; "
                             f"it has {list(meta.attribute_names)}")
        a = meta.attribute(name)
        n = {"continuous": cfg.bins, "binary": 2}.get(a.kind, len(a.values))
        out.append(AttrInfo(name, meta.attribute_names.index(name), a.kind, n,
                            a.kind == "continuous" or (a.kind == "categorical" and a.ordinal)))
    if not out:
        raise ShardError(f"dataset {meta.name!r} has no attributes; coop_embed needs at least one")
    return out


def attribute_codes(values: torch.Tensor, infos: list[AttrInfo]) -> torch.Tensor:
    """Dataset attribute vectors [B, A] (NaN = missing) -> value indices [B, K] (-1 = missing);
    continuous values in [0, 1] fall into `n_values` equal bins."""
    cols = values[:, [a.column for a in infos]].float()
    missing = torch.isnan(cols)
    scale = torch.tensor([a.n_values if a.kind == "continuous" else 1 for a in infos], device=cols.device)
    top = torch.tensor([a.n_values - 1 for a in infos], device=cols.device)
    codes = torch.minimum(torch.floor(cols.nan_to_num(0) * scale).long(), top).clamp_min(0)
    return codes.masked_fill(missing, -1)


def corrupt_codes(codes: torch.Tensor, instances: list[str], infos: list[AttrInfo], mode: str, level: float,
                  seed: int) -> torch.Tensor:
    """Table 2b: for a `level` fraction of instances (decided per instance from a seeded hash, so
    every image of it agrees), one attribute (same choice) is made absent or swapped to another
    value (value + r mod V, r in 1..V-1 per instance); mode 'both' picks one of the two per instance."""
    if mode == "none" or level <= 0:
        return codes
    out = codes.clone()
    for b, inst in enumerate(instances):
        rng = np.random.default_rng([seed, stable_id(inst) & 0xFFFFFFFF])
        if rng.random() >= level:
            continue
        k = int(rng.integers(len(infos)))
        if infos[k].n_values < 2:  # nothing to swap to
            continue
        how = mode if mode != "both" else ("absence" if rng.random() < 0.5 else "swap")
        shift = int(rng.integers(1, infos[k].n_values))
        if how == "absence":
            out[b, k] = -1
        elif out[b, k] >= 0:
            out[b, k] = (out[b, k] + shift) % infos[k].n_values
    return out


class CoopEmbed(nn.Module):
    """Backbone + projection (+ proxies or heads). `forward(uint8 images)` -> embeddings [B, D]."""

    def __init__(self, cfg: CoopEmbedConfig, infos: list[AttrInfo], instances: list[str],
                 instance_category: list[int], n_categories: int) -> None:
        super().__init__()
        self.cfg, self.infos = cfg, infos
        self.instance_row = {s: i for i, s in enumerate(instances)}
        self.norm = ImageNorm()
        self.backbone, d = feature_net(cfg.backbone, cfg.weights)
        k, n = len(infos), cfg.subspace_width
        self.register_buffer("instance_category", torch.tensor(instance_category, dtype=torch.long), persistent=False)
        self.n_categories = n_categories
        self.proj: nn.Linear | None = None
        self.heads = nn.ModuleList()
        if cfg.head == "mtl":  # the backbone features are the embedding; K + 1 classifiers on them
            self.dim = d
            self.heads = nn.ModuleList([nn.Linear(d, a.n_values) for a in infos] + [nn.Linear(d, n_categories)])
        else:
            self.dim = (k + 2 if cfg.head == "csn" else k) * n
            self.proj = nn.Linear(d, self.dim)
        if cfg.head == "cooperative":
            self.instance_proxies = nn.Parameter(torch.randn(len(instances), self.dim) / n ** 0.5,
                                                 requires_grad=cfg.learn_instance_proxies)
            self.attribute_proxies = nn.ParameterList(
                [nn.Parameter(torch.randn(a.n_values, n) / n ** 0.5, requires_grad=cfg.learn_attribute_proxies)
                 for a in infos])

    # subspaces: column slices of the embedding for each notion (slice(None) = all of it)
    def attribute_slices(self) -> list[slice]:
        n = self.cfg.subspace_width
        if self.cfg.head == "mtl":
            return [slice(None)] * len(self.infos)
        return [slice(i * n, (i + 1) * n) for i in range(len(self.infos))]

    def notion_slice(self, notion: Literal["instance", "category"]) -> slice:
        if self.cfg.head != "csn":
            return slice(None)
        k, n = len(self.infos), self.cfg.subspace_width
        start = (k if notion == "instance" else k + 1) * n
        return slice(start, start + n)

    def normalise_blocks(self) -> list[slice]:
        """The blocks normalised separately at retrieval time (Sec. 4.3: L2 per subspace)."""
        if self.cfg.head == "mtl":
            return [slice(None)]
        extra = [self.notion_slice("instance"), self.notion_slice("category")] if self.cfg.head == "csn" else []
        return self.attribute_slices() + extra

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.norm(images)
        return self.backbone(x.to(next(self.backbone.parameters()).dtype)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.features(images)
        return h if self.proj is None else self.proj(h.to(self.proj.weight.dtype)).float()


def _unwrap(model: nn.Module) -> CoopEmbed:
    return unwrap(model, CoopEmbed)


def prepare_meta(meta: DatasetMeta, root: Path, split: str) -> DatasetMeta:
    """Adds the training split's instance list and each instance's category (the proxy rows) to
    meta.extra, so the export rebuilds the same proxy table without the data."""
    if VOCAB_KEY in meta.extra:
        return meta
    from shards.reader import iter_label_records

    cat: dict[str, int] = {}
    for label in iter_label_records(Path(root), split):
        inst = label.get("instance")
        if inst is not None and inst not in cat:
            c = label.get("category")
            cat[inst] = -1 if c is None else int(c)
    if not cat:
        raise ShardError(f"{root}: split {split!r} has no instance labels; coop_embed learns one proxy per "
                         "instance (set 'instance' in the samples' json)")
    names = sorted(cat)
    return replace(meta, extra={**meta.extra, VOCAB_KEY: {"instances": names, "category": [cat[n] for n in names]}})


def build(cfg: CoopEmbedConfig, meta: DatasetMeta) -> CoopEmbed:
    vocab = meta.extra.get(VOCAB_KEY)
    if vocab is None:
        raise ShardError(f"dataset meta of {meta.name!r} has no {VOCAB_KEY}: build coop_embed through "
                         "`attrlab train` (it reads the training instances first)")
    return CoopEmbed(cfg, attribute_infos(cfg, meta), list(vocab["instances"]), list(vocab["category"]),
                     max(1, len(meta.categories)))


def optim_groups(model: nn.Module, cfg: CoopEmbedConfig) -> dict[str, list[ParamGroup]]:
    """Sec. 4.3: backbone lr x0.1, projection / heads x1, latent proxies x10."""
    m = _unwrap(model)
    head = [*(m.proj.parameters() if m.proj is not None else []), *m.heads.parameters()]
    proxies = [m.instance_proxies, *m.attribute_proxies] if cfg.head == "cooperative" else []
    groups = [ParamGroup("backbone", list(m.backbone.parameters()), 0.1), ParamGroup("head", head, 1.0),
              ParamGroup("proxies", proxies, 10.0, weight_decay=0.0)]
    return {"main": [replace(g, params=[p for p in g.params if p.requires_grad]) for g in groups
                     if any(p.requires_grad for p in g.params)]}


def _instance_rows(m: CoopEmbed, instances: list[str], device: torch.device) -> torch.Tensor:
    return torch.tensor([m.instance_row.get(s, -1) for s in instances], dtype=torch.long, device=device)


def step(model: nn.Module, batch: dict[str, Any], cfg: CoopEmbedConfig, info: StepInfo) -> dict[str, torch.Tensor]:
    m, dev = _unwrap(model), info.device
    with autocast(info):
        emb = model(batch["image"].to(dev, non_blocking=True)).float()
    codes = attribute_codes(batch["attributes"].to(dev), m.infos)
    codes = corrupt_codes(codes, list(batch["instance"]), m.infos, cfg.corrupt_mode, cfg.corrupt_level, cfg.corrupt_seed)
    category = batch["category"].to(dev).long()
    terms: dict[str, torch.Tensor] = {}
    if cfg.head == "mtl":
        for k, a in enumerate(m.infos):
            terms[f"attr/{a.name}"] = _ce(m.heads[k](emb), codes[:, k])
        terms["category"] = _ce(m.heads[-1](emb), category)
        loss = (sum(v for key, v in terms.items() if key.startswith("attr/")) / len(m.infos) + terms["category"])
    elif cfg.head == "csn":
        inst = _instance_rows(m, list(batch["instance"]), dev)
        terms["ins"] = batch_all_triplet_loss(emb[:, m.notion_slice("instance")], inst, cfg.triplet_margin)
        terms["cat"] = batch_all_triplet_loss(emb[:, m.notion_slice("category")], category, cfg.triplet_margin)
        attr = [batch_all_triplet_loss(emb[:, s], codes[:, k], cfg.triplet_margin) for k, s in enumerate(m.attribute_slices())]
        terms["attr"] = torch.stack(attr).mean()
        terms["reg"] = emb.pow(2).sum(1).mean()
        loss = (cfg.lambda_ins * terms["ins"] + cfg.lambda_attr * terms["attr"] + cfg.lambda_cat * terms["cat"]
                + cfg.lambda_reg * terms["reg"])
    else:
        loss = cooperative_loss(m, emb, _instance_rows(m, list(batch["instance"]), dev), codes, category, cfg, terms)
    info.logs.update({f"train/{k}": float(v.detach()) for k, v in terms.items()})
    info.logs["train/emb_norm"] = float(emb.detach().norm(dim=1).mean())
    return {"main": loss}


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    keep = target >= 0
    return F.cross_entropy(logits[keep], target[keep]) if bool(keep.any()) else logits.sum() * 0.0


def cooperative_loss(m: CoopEmbed, emb: torch.Tensor, inst: torch.Tensor, codes: torch.Tensor,
                     category: torch.Tensor, cfg: CoopEmbedConfig, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 7 (Eq. 1, 2, 4, 5, 6); fills `terms` with the unweighted parts."""
    k = len(m.infos)
    terms["ins"] = proxy_softmax_loss(emb, m.instance_proxies, inst)
    slices = m.attribute_slices()
    terms["attr"] = torch.stack([proxy_softmax_loss(emb[:, slices[i]], m.attribute_proxies[i], codes[:, i])
                                 for i in range(k)]).sum() / k
    centres, present = mean_rows(m.instance_proxies, m.instance_category, m.n_categories)
    remap = torch.cumsum(present.long(), 0) - 1  # category id -> row among the present centres
    known = (category >= 0) & (category < m.n_categories)
    safe = category.clamp(0, m.n_categories - 1)  # index only; unknown categories are masked to -1
    target = torch.where(known & present[safe], remap[safe], -1)
    terms["cat"] = proxy_softmax_loss(emb, centres[present], target)
    terms["reg"] = emb.pow(2).sum(1).mean()
    loss = (cfg.lambda_ins * terms["ins"] + cfg.lambda_attr * terms["attr"] + cfg.lambda_cat * terms["cat"]
            + cfg.lambda_reg * terms["reg"])
    ordinal = [i for i, a in enumerate(m.infos) if a.ordinal]
    if cfg.order and ordinal and cfg.learn_attribute_proxies:
        ranks = [torch.arange(m.infos[i].n_values, device=emb.device) for i in ordinal]
        terms["order"] = torch.stack([order_regulariser(m.attribute_proxies[i], r, cfg.order_sigma)
                                      for i, r in zip(ordinal, ranks)]).mean()
        loss = loss + cfg.lambda_order * terms["order"]
    return loss


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def embed_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> embeddings [B, D] (float32, on the model's device, eval mode)."""
    with eval_mode(_unwrap(model)) as m:
        return m(images.to(m.instance_category.device)).float()


def _with_codes(m: CoopEmbed, d: dict[str, Any]) -> dict[str, Any]:
    """jobs.embed arrays (emb, key, instance, category, attributes) + value codes [n, K]."""
    return {**d, "codes": attribute_codes(torch.from_numpy(np.asarray(d["attributes"], np.float32)), m.infos).numpy()}


def retrieval_metrics(m: CoopEmbed, terms: dict[str, Any], gallery: dict[str, Any],
                      query: dict[str, Any] | None) -> dict[str, float]:
    from models.retrieval import (attribute_value_map, category_map, knn_recall_at_k, l2_normalize_subspaces,
                                  ordinal_mae_mrr, select_columns)

    blocks = m.normalise_blocks()
    out: dict[str, float] = {}
    g_ins = select_columns(l2_normalize_subspaces(gallery["emb"], blocks), m.notion_slice("instance"))
    if query is not None:
        q_ins = select_columns(l2_normalize_subspaces(query["emb"], blocks), m.notion_slice("instance"))
        ids = {s: i for i, s in enumerate(sorted(set(gallery["instance"]) | set(query["instance"])))}
        r = knn_recall_at_k(q_ins, np.array([ids[s] for s in query["instance"]]), g_ins,
                            np.array([ids[s] for s in gallery["instance"]]), ks=(1, 5, 10))
    else:  # leave-one-out inside the gallery (validation on one split)
        ids = {s: i for i, s in enumerate(sorted(set(gallery["instance"])))}
        lab = np.array([ids[s] for s in gallery["instance"]])
        r = knn_recall_at_k(g_ins, lab, g_ins, lab, ks=(1, 5, 10), exclude_self=np.arange(len(lab))[:, None])
    out.update({f"instance_r@{k.split('@')[-1]}" if "@" in k else f"instance_{k}": v for k, v in r.items()})
    names = [a.name for a in m.infos]
    out.update(attribute_value_map(terms["emb"], terms["codes"], gallery["emb"], gallery["codes"],
                                   m.attribute_slices(), names))
    cs = m.notion_slice("category")
    out.update(category_map(select_columns(terms["emb"], cs), terms["category"], select_columns(gallery["emb"], cs),
                            gallery["category"], subspace_slices=None if m.cfg.head != "cooperative" else blocks))
    ordinal = [i for i, a in enumerate(m.infos) if a.ordinal]
    if ordinal:
        out.update(ordinal_mae_mrr(terms["emb"], terms["codes"][:, ordinal], gallery["emb"],
                                   gallery["codes"][:, ordinal], [m.attribute_slices()[i] for i in ordinal],
                                   [names[i] for i in ordinal]))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loaders: LoaderFactory, cfg: CoopEmbedConfig, meta: DatasetMeta) -> dict[str, float]:
    """instance_r@{1,5,10}, attribute_map(/<attr>), category_map, ordinal_mae/mrr(/<attr>).

    On the gallery split (`attrlab eval`, data.test_split = gallery): queries from `query_split`
    against it (unseen instances). On any other split (validation during training): each image
    queries the rest of the split (leave-one-out). Query terms come from `term_split`."""
    m = _unwrap(model)
    gallery = _with_codes(m, loaders.embed("__eval__", m))  # in-process, or on Ray workers (jobs/embed.py)
    terms = _with_codes(m, loaders.embed(cfg.term_split, m))
    query = None
    if loaders.split == cfg.gallery_split and cfg.query_split:
        query = _with_codes(m, loaders.embed(cfg.query_split, m))
    return retrieval_metrics(m, terms, gallery, query)


def query_terms(model: nn.Module, terms: dict[str, Any]) -> dict[str, np.ndarray]:
    """The query terms of Sec. 4.2 for serving: per attribute value seen in the term split, the mean
    embedding of its images (searched in that attribute's subspace); per category, the mean
    embedding (searched in the whole space). One row each: kind, attribute, value, mean [D]."""
    m = _unwrap(model)
    d = _with_codes(m, terms)
    emb, codes = np.asarray(d["emb"], np.float32), np.asarray(d["codes"])
    rows: list[tuple[str, str, str, np.ndarray]] = []
    for k, info in enumerate(m.infos):
        for v in sorted(set(codes[:, k].tolist()) - {-1}):
            rows.append(("attribute", info.name, str(v), emb[codes[:, k] == v].mean(0)))
    cats = np.asarray(d["category"]).astype(str)
    for c in sorted(set(cats.tolist())):
        rows.append(("category", "", c, emb[cats == c].mean(0)))
    slices = m.attribute_slices()
    dim = emb.shape[1]
    return {"kind": np.array([r[0] for r in rows]), "attribute": np.array([r[1] for r in rows]),
            "value": np.array([r[2] for r in rows]), "mean": np.stack([r[3] for r in rows]).astype(np.float32),
            "attributes": np.array([i.name for i in m.infos]),
            "slices": np.array([s.indices(dim)[:2] for s in slices], dtype=np.int64)}


METHOD = Method(
    name="coop_embed",
    config_cls=CoopEmbedConfig,
    data_kind="class_balanced",
    build=build,
    optim_groups=optim_groups,
    step=step,
    evaluate=evaluate,
    val_metric="instance_r@1",
    describe="cooperative proxy embedding for instance, attribute and category retrieval (Thong et al. 2019)",
    figures=lazy_figures("models.coop_embed_figures"),
    prepare_meta=prepare_meta,
    embed=embed_images,
    query_terms=query_terms,
    path_fields=("weights",),
)
