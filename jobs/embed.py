"""Embed every image of a split with a trained model: in this process, or across a Ray cluster.

    embed_split(method, model, cfg, data_root, split, workers=0) -> {"emb", "key", "instance",
                                                                      "category", "attributes"}

workers=0 streams the split through the eval loader (shards.reader.make_loader, mode="eval")
and calls `method.embed` batch by batch, with a progress bar. workers>0 runs the same decoding
on the Ray cluster with Ray Data, for galleries too large for one machine: one item per shard
file, each read with the repo's tar reader and decoded by `SampleDecoder` in eval mode (the
eval loader's resize + centre crop, corrupt samples skipped with a warning), then
`map_batches` on `workers` actors that each build the model once from (method name, config,
dataset meta) and take the weights from the object store (one `ray.put` of the state_dict).
The shard directory must be readable at the same path on every node (shared storage).

Both paths return numpy arrays sorted by sample key, so their results compare row by row.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from shards.format import ShardError

log = logging.getLogger(__name__)

FIELDS = ("emb", "key", "instance", "category", "attributes")
READ_CPUS = 0.25  # per shard-reading Ray task


def _method_embed(method: Any) -> Any:
    if method.embed is None:
        raise ShardError(f"method {method.name} has no embedding (Method.embed is None); "
                         "use a run of an embedding method such as coop_embed")
    return method.embed


def ensure_ray(workers: int, address: str | None = None) -> None:
    """For the CLI: workers > 0 needs Ray; connect to `address` / RAY_ADDRESS, or start a local Ray."""
    if workers <= 0:
        return
    from cluster.connect import connect

    connect(address)


def _sorted(out: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    if not out["key"]:
        raise ShardError("the embedded split yielded no readable samples; "
                         "check the shards with `attrlab shards validate`")
    arrays = {"emb": np.concatenate(out["emb"]).astype(np.float32, copy=False),
              "key": np.concatenate(out["key"]).astype(str),
              "instance": np.concatenate(out["instance"]).astype(str),
              "category": np.concatenate(out["category"]).astype(np.int64),
              "attributes": np.concatenate(out["attributes"]).astype(np.float32, copy=False)}
    order = np.argsort(arrays["key"], kind="stable")
    return {k: v[order] for k, v in arrays.items()}


def embed_split(method: Any, model: Any, cfg: Any, data_root: str | Path, split: str, workers: int = 0,
                batch_size: int | None = None, *, meta: Any = None, cpus_per_worker: float = 0.5,
                gpus_per_worker: float = 0.0) -> dict[str, np.ndarray]:
    """Embeddings and labels of every sample of `split`, sorted by key: emb float32 [n, D], key
    str [n], instance str [n], category int64 [n] (-1 none), attributes float32 [n, A] (NaN missing).

    `cfg` is the run config (data.augment and data.loader are used); `meta` is the DatasetMeta
    the model was built with (load_export returns it): workers > 0 rebuilds the model from it.
    """
    embed = _method_embed(method)
    batch_size = int(batch_size or cfg.data.loader.batch_size)
    if batch_size < 1:
        raise ShardError(f"batch size must be >= 1, got {batch_size}")
    if workers > 0:
        return _embed_ray(method, model, cfg, Path(data_root), split, workers, batch_size, meta,
                          cpus_per_worker, gpus_per_worker)
    return _embed_local(embed, model, cfg, Path(data_root), split, batch_size)


def _embed_local(embed: Any, model: Any, cfg: Any, root: Path, split: str, batch_size: int) -> dict[str, np.ndarray]:
    import dataclasses

    import torch
    from tqdm import tqdm

    from shards.reader import make_loader, shard_paths

    _, count = shard_paths(root, split)
    loader = make_loader(root, split, mode="eval", cfg=dataclasses.replace(cfg.data.loader, batch_size=batch_size),
                         augment=cfg.data.augment, kind="samples", rank=0, world_size=1)
    out: dict[str, list[Any]] = {k: [] for k in FIELDS}
    was = model.training
    model.eval()
    try:
        bar = tqdm(total=count, unit="img", desc=f"embed {split}", disable=not sys.stderr.isatty())
        with torch.no_grad(), bar:
            for batch in loader:
                out["emb"].append(embed(model, batch["image"]).float().cpu().numpy())
                out["key"].append(np.asarray(batch["key"], dtype=str))
                out["instance"].append(np.asarray(batch["instance"], dtype=str))
                out["category"].append(batch["category"].numpy())
                out["attributes"].append(batch["attributes"].float().numpy())
                bar.update(len(batch["key"]))
    finally:
        model.train(was)
    return _sorted(out)


# -- Ray Data -----------------------------------------------------------------------------------

def read_shard(item: dict[str, Any], meta_json: dict[str, Any], augment: dict[str, Any]) -> Any:
    """One shard file -> its decoded samples (eval mode), as rows for Ray Data."""
    from shards.augment import AugmentConfig, SampleDecoder
    from shards.format import DatasetMeta
    from shards.tario import TarCorrupt, iter_tar_groups

    decoder = SampleDecoder(DatasetMeta.from_json(meta_json), AugmentConfig(**augment), train=False)
    path = Path(item["path"])
    try:
        for key, files in iter_tar_groups(path):
            try:
                s = decoder.decode(files, "samples")
            except Exception as e:  # noqa: BLE001 — as the eval loader: skip one corrupt sample, never fatal
                log.warning("skipping corrupt sample %s in %s: %s", key, path.name, e)
                continue
            yield {"key": key, "image": s["image"].numpy(), "attributes": s["attributes"].numpy(),
                   "category": int(s["category"]), "instance": s["instance"]}
    except TarCorrupt as e:
        log.warning("corrupt shard %s after key %r: %s; skipping the rest of it", path, e.last_key, e.cause)


class ShardEmbedder:
    """A Ray Data actor: the model is built once per actor, its weights come from the object store."""

    def __init__(self, method_name: str, cfg_dict: dict[str, Any], meta_json: dict[str, Any],
                 weights: list[Any], use_gpu: bool) -> None:
        import ray
        import torch

        from jobs import config as configlib
        from jobs.cli_train import resolve_config_class
        from models import registry
        from shards.format import DatasetMeta

        self.method = registry.get(method_name)
        cfg = configlib.build(resolve_config_class(method_name), cfg_dict)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = self.method.build(cfg.model, DatasetMeta.from_json(meta_json))
        model.load_state_dict(ray.get(weights[0]))  # a list, so Ray Data hands over the ref itself
        self.model = model.to(self.device).eval()
        self.torch = torch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
            emb = self.method.embed(self.model, images).float().cpu().numpy()
        return {"emb": emb, "key": batch["key"], "instance": batch["instance"],
                "category": np.asarray(batch["category"], np.int64), "attributes": batch["attributes"]}


def _embed_ray(method: Any, model: Any, cfg: Any, root: Path, split: str, workers: int, batch_size: int,
               meta: Any, cpus_per_worker: float, gpus_per_worker: float) -> dict[str, np.ndarray]:
    import dataclasses

    import ray

    from jobs import config as configlib
    from shards.reader import shard_paths

    if not ray.is_initialized():
        raise ShardError(f"embedding with {workers} workers needs a Ray cluster: start one with ray.init() "
                         "(or pass --address / set RAY_ADDRESS on the command line), or use workers=0")
    if meta is None:
        raise ShardError("embed_split(workers > 0) needs the model's dataset meta (meta=...; load_export returns it)")
    import ray.data

    paths, _ = shard_paths(root, split)
    meta_json = meta.to_json()
    augment = dataclasses.asdict(cfg.data.augment)  # the eval loader's: resize + centre crop
    weights = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
    ds = ray.data.from_items([{"path": str(p.resolve())} for p in paths], override_num_blocks=len(paths))
    # fractional read tasks: many shards decode at once beside the embedding actors
    ds = ds.flat_map(read_shard, fn_kwargs={"meta_json": meta_json, "augment": augment}, num_cpus=READ_CPUS)
    ds = ds.map_batches(ShardEmbedder, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
                        fn_constructor_args=(method.name, configlib.to_dict(cfg), meta_json, [weights],
                                             gpus_per_worker > 0))
    out: dict[str, list[Any]] = {k: [] for k in FIELDS}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in FIELDS:
            out[k].append(np.asarray(batch[k]))
    return _sorted(out)
