"""coop_embed's paper figures for `attrlab report` (Thong et al. 2019, papers/coop_embed.txt).

* Fig. 3: example queries and their top-4 retrieved gallery images (instance retrieval in the
  instance subspace after per-subspace L2 normalisation); green frame = same instance, red = other.
  As in `evaluate`: queries from `cfg.query_split` when the evaluated split is `cfg.gallery_split`
  (and the query split exists), else leave-one-out within the evaluated split.
* Fig. 4 (Sec. 5.3): visual transitions between two categories - Dijkstra's shortest path over a
  k = 5 nearest-neighbour graph of the gallery (models/style_graph.py), in the superspace and in one
  attribute subspace; the image reached by the largest L2 step is framed red.
* Fig. 5 (Sec. 5.3): per category, the gallery images nearest its empirical centre (typical,
  green) and farthest from it (atypical, red).

Embeddings are those of the evaluation crop, L2-normalised per subspace (Sec. 4.3), as in the
metrics; the figures show the uncropped images. At most MAX_IMAGES images are read per split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.plots import save_figure

MAX_IMAGES = 600
N_QUERIES, TOP_K, GRAPH_K, PAIRS, MAX_PATH, N_TYPICAL = 6, 4, 5, 2, 12, 5
GREEN, RED, GREY = "limegreen", "red", "0.6"


def match_colour(query_instance: str, retrieved_instance: str) -> str:
    """Fig. 3 frame: green for the same instance, red for another; grey when the query has no label."""
    if not query_instance:
        return GREY
    return GREEN if retrieved_instance == query_instance else RED


def nearest(query: np.ndarray, gallery: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> np.ndarray:
    """[m, k] gallery ids by increasing Euclidean distance (ties: lower id); `self_ids` [m] = each
    query's own gallery id, never retrieved (leave-one-out)."""
    d = ((query[:, None].astype(np.float64) - gallery[None]) ** 2).sum(-1)
    if self_ids is not None:
        d[np.arange(len(query)), self_ids] = np.inf
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def endpoints(emb: np.ndarray, labels: np.ndarray, n_pairs: int) -> list[tuple[int, int]]:
    """Source/target images for transitions between label groups (labels < 0 ignored): group pairs
    by decreasing distance between their centres (mean embeddings), each -> (image nearest the first
    centre, image nearest the second). Deterministic; [] with fewer than two groups."""
    from models.retrieval import query_terms

    values, centres = query_terms(emb, labels)
    labels = np.asarray(labels)
    if len(values) < 2:
        return []
    d = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    a, b = np.triu_indices(len(values), 1)
    order = np.lexsort((b, a, -d[a, b]))  # farthest first, ties by group index
    rep = {}  # group -> its image nearest the centre
    for i, v in enumerate(values):
        members = np.flatnonzero(labels == v)
        rep[i] = int(members[np.argmin(np.linalg.norm(emb[members] - centres[i], axis=1))])
    return [(rep[int(a[o])], rep[int(b[o])]) for o in order][:n_pairs]


def thin_path(length: int, keep: tuple[int, ...], cap: int) -> list[int]:
    """Positions of a path to draw: all when it fits in `cap`, else evenly spaced + `keep`."""
    if length <= cap:
        return list(range(length))
    spaced = np.linspace(0, length - 1, max(2, cap - len(keep))).round().astype(int)
    return sorted(set(spaced.tolist()) | {k for k in keep if 0 <= k < length})


@torch.no_grad()
def _collect(model: Any, loaders: Any, which: str) -> dict[str, np.ndarray]:
    """Up to MAX_IMAGES images (HWC uint8) with their normalised embeddings and labels."""
    from models.coop_embed import _unwrap, attribute_codes, embed_images
    from models.retrieval import l2_normalize_subspaces

    m = _unwrap(model)
    out: dict[str, list[Any]] = {k: [] for k in ("image", "emb", "codes", "category", "instance")}
    n = 0
    crops, full = loaders(which, kind="samples"), loaders(which, kind="samples", full_image=True)
    for crop, shown in zip(crops, full):
        same = list(crop["key"]) == list(shown["key"])  # eval loaders are ordered; guard anyway
        out["emb"].append(embed_images(m, (crop if same else shown)["image"]).cpu().numpy())
        out["image"].append(shown["image"].permute(0, 2, 3, 1).numpy())
        out["codes"].append(attribute_codes(shown["attributes"], m.infos).numpy())
        out["category"].append(shown["category"].long().numpy())
        out["instance"] += list(shown["instance"])
        n += len(shown["image"])
        if n >= MAX_IMAGES:
            break
    empty = {"image": np.zeros((0, 1, 1, 3), np.uint8), "emb": np.zeros((0, m.dim)),
             "codes": np.zeros((0, len(m.infos)), int), "category": np.zeros(0, int)}
    res = {k: np.concatenate(v)[:MAX_IMAGES] if v else empty[k] for k, v in out.items() if k != "instance"}
    res["instance"] = np.array(out["instance"][:MAX_IMAGES], dtype=str)
    res["emb"] = l2_normalize_subspaces(res["emb"], m.normalise_blocks())
    return res


Cell = tuple[np.ndarray, str, str | None]  # image HWC uint8, title, frame colour (None = no frame)


def framed(image: np.ndarray, colour: str | None, size: int, width: int) -> np.ndarray:
    """The image centred on a white size x size square inside a `width`-pixel border of `colour`."""
    from matplotlib.colors import to_rgb

    h, w = image.shape[:2]
    top, left = (size - h) // 2, (size - w) // 2
    sq = np.pad(image[:size, :size], ((top, size - h - top), (left, size - w - left), (0, 0)), constant_values=255)
    fill = [255, 255, 255] if colour is None else [round(255 * v) for v in to_rgb(colour)]
    return np.stack([np.pad(sq[..., i], width, constant_values=fill[i]) for i in range(3)], axis=-1)


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.axis("off")
    return fig, ax


def _mosaic(rows: list[list[Cell | None]], row_labels: list[str], title: str, out: Path, name: str) -> str:
    """All images of a figure on one canvas (one axes: far faster than an axes per image)."""
    cols = max(len(r) for r in rows)
    s = max(max(c[0].shape[:2]) for r in rows for c in r if c is not None)
    b, gap, band = max(2, s // 12), max(2, s // 10), max(6, s // 4)
    cw, ch = s + 2 * b + gap, s + 2 * b + gap + band
    canvas = np.full((ch * len(rows), cw * cols, 3), 255, np.uint8)
    fig, ax = _figure(1.05 * cols + 0.3, 1.2 * len(rows) + 0.3)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is not None:
                y, x = r * ch + band, c * cw
                canvas[y:y + s + 2 * b, x:x + s + 2 * b] = framed(cell[0], cell[2], s, b)
                ax.text(x + s / 2 + b, y - 1, cell[1], fontsize=5, ha="center", va="bottom")
        ax.text(-2, r * ch + band + s / 2 + b, row_labels[r], fontsize=5, rotation=90, ha="right", va="center")
    ax.imshow(canvas, interpolation="nearest")  # after the texts: the canvas is complete
    return _save(fig, title, out, name)


def _save(fig: Any, title: str, out: Path, name: str) -> str:
    return save_figure(fig, title, out, name, fontsize=7)


def _note(text: str, out: Path, name: str) -> str:
    fig, ax = _figure(6, 1.2)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True)
    return _save(fig, "", out, name)


def _cat_name(meta: Any, c: int) -> str:
    cats = tuple(getattr(meta, "categories", ()))
    return cats[c] if 0 <= c < len(cats) else ("-" if c < 0 else str(c))


def retrieval_figure(m: Any, gal: dict[str, np.ndarray], qry: dict[str, np.ndarray] | None, where: str,
                     out: Path, name: str = "coop_fig3_retrieval.png") -> tuple[str, str]:
    from models.retrieval import select_columns

    loo = qry is None
    q = gal if loo else qry
    n_top = min(TOP_K, len(gal["emb"]) - (1 if loo else 0))
    cap = f"Fig. 3 analog: queries ({where}) and their top-{TOP_K} gallery images; green = same instance, red = not"
    if len(q["emb"]) == 0 or n_top < 1:
        return cap, _note(f"Fig. 3: too few images ({len(q['emb'])} queries, {len(gal['emb'])} gallery)", out, name)
    if not any(q["instance"]):
        cap += " (no instance labels: grey frames)"
    picks = np.unique(np.linspace(0, len(q["emb"]) - 1, min(N_QUERIES, len(q["emb"]))).round().astype(int))
    s = m.notion_slice("instance")
    ranked = nearest(select_columns(q["emb"], s)[picks], select_columns(gal["emb"], s), n_top,
                     picks if loo else None)
    rows: list[list[Cell | None]] = []
    for qi, hits in zip(picks, ranked):
        qn = str(q["instance"][qi])
        rows.append([(q["image"][qi], "query", None)] + [
            (gal["image"][gi], f"{c}: {gal['instance'][gi]}", match_colour(qn, str(gal["instance"][gi])))
            for c, gi in enumerate(hits, start=1)])
    labels = [str(q["instance"][qi]) or "(no instance)" for qi in picks]
    return cap, _mosaic(rows, labels, "query -> top-4 (instance subspace)", out, name)


def transitions_figure(m: Any, gal: dict[str, np.ndarray], meta: Any, attr: int, out: Path,
                       name: str = "coop_fig4_transitions.png") -> tuple[str, str]:
    from models.style_graph import knn_graph, largest_step, shortest_path

    n, notes = len(gal["emb"]), []
    cap = (f"Fig. 4 analog: shortest paths over a k={GRAPH_K} NN graph of the gallery; "
           "red = image after the largest step")
    if n < 3:
        return cap, _note(f"Fig. 4: {n} gallery images, too few for a transition graph", out, name)
    k = min(GRAPH_K, n - 1)
    a_name, a_slice = m.infos[attr].name, m.attribute_slices()[attr]
    specs = [("superspace", None, gal["category"], PAIRS), (f"attribute {a_name}", a_slice, gal["codes"][:, attr], 1)]
    cat_names = [_cat_name(meta, int(c)) for c in gal["category"]]
    val_names = [f"{a_name}={v}" if v >= 0 else "?" for v in gal["codes"][:, attr]]
    rows: list[tuple[str, list[int], list[float], list[str]]] = []
    for label, sub, groups, want in specs:
        emb = gal["emb"] if sub is None else gal["emb"][:, sub]
        cands = endpoints(emb, groups, n_pairs=n)
        if not cands:
            notes.append(f"{label}: fewer than two {'categories' if sub is None else 'values'}")
            continue
        graph, found = knn_graph(emb, k=k), 0
        for src, dst in cands:
            try:
                path, cost = shortest_path(graph, src, dst)
            except ValueError:  # disconnected graph: try the next pair
                continue
            rows.append((label, path, cost, cat_names if sub is None else val_names))
            found += 1
            if found == want:
                break
        if found < want:
            notes.append(f"{label}: {want - found} pair(s) unreachable")
    if notes:
        cap += " (" + "; ".join(notes) + ")"
    if not rows:
        return cap, _note("Fig. 4: no transition to show - " + "; ".join(notes), out, name)
    cols = min(MAX_PATH, max(len(p) for _, p, _, _ in rows))
    cells: list[list[Cell | None]] = []
    for label, path, cost, groups in rows:
        j = largest_step(path, cost)
        cells.append([(gal["image"][path[pos]], groups[path[pos]], RED if pos == j + 1 else None)
                      for pos in thin_path(len(path), (0, j, j + 1, len(path) - 1), cols)])
    return cap, _mosaic(cells, [r[0] for r in rows], "visual transitions (source left, target right)", out, name)


def typicality_figure(gal: dict[str, np.ndarray], meta: Any, out: Path,
                      name: str = "coop_fig5_typical.png") -> tuple[str, str]:
    from models.style_graph import rank_typical

    cap = "Fig. 5 analog: per category, most typical gallery images (green, nearest the centre) and least typical (red)"
    keep = gal["category"] >= 0
    emb, cats = gal["emb"][keep], gal["category"][keep]
    idx = np.flatnonzero(keep)
    values, counts = np.unique(cats, return_counts=True)
    chosen = values[np.lexsort((values, -counts))][:3]  # the 3 largest categories
    if len(chosen) == 0:
        return cap, _note("Fig. 5: no gallery image has a category", out, name)
    if len(chosen) == 1:
        cap += " (only one category in the gallery)"
    rows: list[list[Cell | None]] = []
    for c in chosen:
        size = int((cats == c).sum())
        n_typ = min(N_TYPICAL, (size + 1) // 2)
        typ, atyp = rank_typical(emb, cats, c, N_TYPICAL)
        atyp = atyp[:min(N_TYPICAL, size - n_typ)][::-1]  # farthest at the right end
        row: list[Cell | None] = [None] * (2 * N_TYPICAL + 1)
        row[:n_typ] = [(gal["image"][idx[i]], f"typical {k + 1}", GREEN) for k, i in enumerate(typ[:n_typ])]
        row[len(row) - len(atyp):] = [(gal["image"][idx[i]], f"atypical {len(atyp) - k}", RED)
                                      for k, i in enumerate(atyp)]
        rows.append(row)
    labels = [_cat_name(meta, int(c)) for c in chosen]
    return cap, _mosaic(rows, labels, "typical (left) / atypical (right) images per category", out, name)


@torch.no_grad()
def figures(model: Any, loaders: Any, cfg: Any, meta: Any, run_dir: Path, out: Path,
            attribute: str | None = None) -> list[tuple[str, str]]:
    """The three PNGs in `out` -> [(caption, file name)]; `attribute` picks Fig. 4's subspace row."""
    from models.coop_embed import _unwrap
    from shards.format import ShardError

    m = _unwrap(model)
    names = [a.name for a in m.infos]
    if attribute is not None and attribute not in names:
        raise ValueError(f"attribute {attribute!r} is not one of the model's attributes {names}")
    attr = names.index(attribute) if attribute is not None else 0
    gal = _collect(m, loaders, "__eval__")
    split = getattr(loaders, "split", None)
    qry, where = None, f"leave-one-out within {split or 'the evaluated split'!r}"
    if split not in (None, cfg.gallery_split):  # as evaluate(): query split only against the gallery
        where += f"; queries from {cfg.query_split!r} are for {cfg.gallery_split!r}"
    elif cfg.query_split and cfg.query_split != split:
        try:
            qry, where = _collect(m, loaders, cfg.query_split), f"split {cfg.query_split!r}"
        except ShardError:  # no such split in this dataset
            where += f"; no split {cfg.query_split!r}"
    out = Path(out)
    return [retrieval_figure(m, gal, qry, where, out), transitions_figure(m, gal, meta, attr, out),
            typicality_figure(gal, meta, out)]
