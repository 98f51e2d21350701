"""Generic importer (a folder of images + a label table) and the helpers shared by the
metric-learning importers (cub200, cars196, sop, inshop, compcars).

Layout read by `attrlab shards import generic --src DIR`:

    DIR/labels.csv | .tsv | .jsonl  (or --opt labels=FILE, relative to DIR)
        path      image path relative to DIR (required; '..' or absolute paths are refused)
        split     split name, e.g. train / val / test (required)
        key       optional sample key (letters, digits, '_' and '-'); derived from path when empty
        instance  optional instance id (string)
        category  optional category name; the vocabulary is the sorted set of names
        <other>   attribute columns (all of them, or only --opt attributes=a,b,c)
    DIR/attributes.json             optional schema (or --opt schema=FILE): a list, or
                                    {"attributes": [...]}, of {"name", "kind", "values",
                                    "ordinal", "description", "column"}; declared attributes
                                    without a column are pair-only (relative) attributes
    DIR/pairs.csv | pairs.tsv       optional (or --opt pairs=FILE): header with key_i,key_j or
                                    path_i,path_j, then attribute, relation (more|less|similar)
                                    and an optional split column

Kinds are inferred when no schema declares them: all values in {0, 1} -> binary, numbers in
[0, 1] -> continuous, anything non-numeric -> categorical (sorted vocabulary). Other numbers
must be normalised or declared. Without a schema, attributes named only in the pairs file are
declared continuous with no per-image values. Every error names the file, line and column.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

from shards.format import KEY_RE, SPLIT_RE, AttributeSpec, DatasetMeta, Pair, ShardError, check_pair
from shards.importers import ImportOptions
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

SPLIT_ORDER = ("train", "val", "test", "query", "gallery")
Spec = dict[str, Any]


# ----------------------------------------------------------------- shared helpers

def find_file(src: Path, candidates: Sequence[str], what: str, hint: str = "") -> Path:
    """The first of `candidates` (relative to src) that exists, else a ShardError naming it."""
    p = optional_file(src, candidates)
    if p is None:
        also = f" (also looked for {', '.join(candidates[1:])})" if len(candidates) > 1 else ""
        raise ShardError(f"{Path(src) / candidates[0]}: {what} not found{also}; "
                         f"{hint or 'point --src at the root of the extracted dataset'}")
    return p


def optional_file(src: Path, candidates: Sequence[str]) -> Path | None:
    for rel in candidates:
        p = safe_join(src, rel, "annotation file")
        if p.is_file():
            return p
    return None


def read_text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ShardError(f"{path}: not UTF-8 text ({e}); re-download the file") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None


def read_rows(path: Path, fields: int, fmt: str, skip: int = 0, exact: bool = False
              ) -> Iterator[tuple[int, list[str]]]:
    """Stream whitespace-separated rows as (line number, fields); blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                parts = line.split()
                if n <= skip or not parts:
                    continue
                if len(parts) < fields or (exact and len(parts) != fields):
                    raise ShardError(f"{path}:{n}: expected {fields} fields '{fmt}', got {len(parts)} "
                                     f"({line.strip()[:80]!r}); fix the line or re-download the file")
                yield n, parts
    except UnicodeDecodeError as e:
        raise ShardError(f"{path}: not UTF-8 text ({e}); re-download the file") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None


def to_int(value: str, where: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ShardError(f"{where}: {what} {value!r} is not an integer") from None


def to_float(value: str, where: str, what: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise ShardError(f"{where}: {what} {value!r} is not a finite number")
    return v


def sanitise(name: str) -> str:
    """A name usable as a key or attribute name (^[A-Za-z0-9_-]+$)."""
    s = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_\-]+", "_", name)).strip("_")
    return s or "x"


def unique_names(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        base, n, cand = sanitise(name), 1, sanitise(name)
        while cand in seen:
            n += 1
            cand = f"{base}_{n}"
        seen.add(cand)
        out.append(cand)
    return out


def key_from_path(rel: str) -> str:
    parts = PurePosixPath(rel.replace("\\", "/")).with_suffix("").parts
    key = "-".join(sanitise(p) for p in parts if p not in ("", ".", "/"))
    if len(key) > 200:
        key = key[:183] + "-" + hashlib.sha1(rel.encode()).hexdigest()[:16]
    return key


def path_keys(rels: Iterable[str]) -> dict[str, str]:
    """rel path -> unique key, independent of the order the paths are given in."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for rel in sorted(set(rels)):
        base = cand = key_from_path(rel)
        n = 1
        while cand in used:
            n += 1
            cand = f"{base}-{n}"
        used.add(cand)
        out[rel] = cand
    return out


def image_file(src: Path, rel: str, where: str, base: str = "") -> Path:
    """src/base/rel, refusing paths that leave src/base (e.g. '../x.jpg'), and checking it exists."""
    p = safe_join(safe_join(src, base, "image folder") if base else src, rel, f"{where}: image path")
    if not p.is_file():
        raise ShardError(f"{where}: image {rel!r} not found at {p}; are the images extracted under --src?")
    return p


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as e:
        raise ShardError(f"{path}: not a readable image ({e})") from None


def box_fields(box: Sequence[float], size: tuple[int, int], where: str, crop: bool) -> tuple[list[float], list[int] | None]:
    """(normalised box in the stored image, pixel crop or None) from a continuous pixel box."""
    w, h = size
    x0, y0, x1, y1 = (max(0.0, min(float(v), float(m))) for v, m in zip(box, (w, h, w, h)))
    if not (x1 > x0 and y1 > y0):
        raise ShardError(f"{where}: empty or inverted bounding box {list(box)} for a {w}x{h} image")
    if crop:
        px = [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]
        return [0.0, 0.0, 1.0, 1.0], px
    return [round(x0 / w, 6), round(y0 / h, 6), round(x1 / w, 6), round(y1 / h, 6)], None


def carve(groups: Iterable[str], fraction: float, seed: int, salt: str) -> set[str]:
    """Deterministically pick round(fraction * n) (>= 1, < n) of the groups for validation."""
    if not 0.0 <= fraction < 1.0:
        raise ShardError(f"--val-fraction {fraction}: expected a number in [0, 1)")
    gs = sorted(set(groups))
    if fraction == 0 or len(gs) < 2:
        return set()
    n = min(len(gs) - 1, max(1, round(len(gs) * fraction)))
    return set(random.Random(f"{salt}/{seed}").sample(gs, n))


def make_spec(key: str, path: Path, split: str, opts: ImportOptions, **labels: Any) -> Spec:
    spec: Spec = {"key": key, "path": str(path), "split": split, "resize": opts.resize}
    spec.update({k: v for k, v in labels.items() if v is not None})
    return spec


def group_splits(specs: Iterable[Spec]) -> dict[str, list[Spec]]:
    """split -> specs sorted by key, in canonical split order; duplicate keys are an error."""
    by: dict[str, list[Spec]] = {}
    seen: dict[str, str] = {}
    for s in specs:
        if not KEY_RE.match(s["key"]):
            raise ShardError(f"{s.get('extra', {}).get('path', s['path'])}: derived key {s['key']!r} is not valid")
        if s["key"] in seen:
            raise ShardError(f"key {s['key']!r} occurs twice ({seen[s['key']]} and {s['path']}); "
                             "the source lists the same image twice")
        seen[s["key"]] = s["path"]
        by.setdefault(s["split"], []).append(s)
    order = sorted(by, key=lambda x: (SPLIT_ORDER.index(x) if x in SPLIT_ORDER else len(SPLIT_ORDER), x))
    return {k: sorted(by[k], key=lambda s: s["key"]) for k in order}


def make_plan(name: str, specs: Iterable[Spec], attributes: Sequence[AttributeSpec], categories: Sequence[str],
              opts: ImportOptions, description: str, source: str, extra: dict[str, Any],
              version: int = 1, pairs: list[Pair] | None = None) -> DatasetPlan:
    splits = group_splits(specs)
    if not splits:
        raise ShardError(f"{name}: no images selected; check the split files and options")
    meta = DatasetMeta(name=name, attributes=tuple(attributes), categories=tuple(categories),
                       splits=tuple(splits), description=description, source=source, extra=extra)
    fp = fingerprint_of(name, version, opts.resize, sorted(opts.options.items()))
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=pairs, fingerprint=fp)


# ----------------------------------------------------------------- generic importer

KNOWN_OPTIONS: tuple[str, ...] = ("labels", "schema", "pairs", "attributes")
RESERVED = ("path", "split", "key", "instance", "category")
Rows = list[tuple[int, dict[str, Any]]]


def _user_file(src: Path, value: str) -> Path:
    p = Path(value) if Path(value).is_absolute() else Path(src) / value
    if not p.is_file():
        raise ShardError(f"{p}: file not found (from --opt); give a path relative to --src or an absolute one")
    return p


def read_table(path: Path) -> tuple[list[str], Rows]:
    """(columns, [(line, row)]) of a .csv/.tsv (header row) or .jsonl (one object a line); '' -> None."""
    lines, rows = read_text_lines(path), []
    if path.suffix == ".jsonl":
        cols: dict[str, None] = {}
        for n, line in enumerate(lines, start=1):
            try:
                obj = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise ShardError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if obj is not None and not isinstance(obj, dict):
                raise ShardError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            if obj:
                cols.update(dict.fromkeys(obj))
                rows.append((n, {k: (None if v == "" else v) for k, v in obj.items()}))
        return list(cols), rows
    reader = csv.reader(lines, delimiter="\t" if path.suffix == ".tsv" else ",")
    header = [h.strip() for h in next(reader, [])]
    if not header:
        raise ShardError(f"{path}:1: missing header row (e.g. path,split,category,...)")
    for parts in reader:
        if any(p.strip() for p in parts):
            if len(parts) != len(header):
                raise ShardError(f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(parts)}")
            rows.append((reader.line_num, {h: (p.strip() or None) for h, p in zip(header, parts)}))
    return header, rows


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _infer(path: Path, col: str, rows: Rows) -> AttributeSpec:
    vals = [(n, r[col], _number(r[col])) for n, r in rows if r.get(col) is not None]
    if not KEY_RE.match(col) or not vals:
        raise ShardError(f"{path}: column {col!r} " + ("has no values; remove it or declare it in attributes.json"
                         if vals == [] else "is not a valid attribute name (letters, digits, '_', '-'); rename it"))
    if all(x is not None for _, _, x in vals):
        if all(x in (0.0, 1.0) for _, _, x in vals):
            return AttributeSpec(col, "binary")
        for n, v, x in vals:
            if not 0.0 <= x <= 1.0:  # type: ignore[operator]
                raise ShardError(f"{path}:{n}: column {col!r}: value {v!r} is outside [0, 1]; normalise "
                                 "the column or declare it (e.g. categorical) in attributes.json")
        return AttributeSpec(col, "continuous")
    values = sorted({str(v) for _, v, _ in vals})
    if len(values) < 2:
        raise ShardError(f"{path}: column {col!r} has the single value {values[0]!r}; drop it or declare it")
    return AttributeSpec(col, "categorical", values=tuple(values))


def _convert(spec: AttributeSpec, v: Any, where: str) -> float | int | None:
    if v is None:
        return None
    if spec.kind == "categorical" and str(v) in spec.values:
        return spec.values.index(str(v))
    x = _number(v)
    if spec.kind == "binary" and x in (0.0, 1.0):
        return int(x)  # type: ignore[arg-type]
    if spec.kind == "continuous" and x is not None and 0.0 <= x <= 1.0:
        return x
    want = {"binary": "0 or 1", "continuous": "a number in [0, 1]"}.get(spec.kind, f"one of {list(spec.values)}")
    raise ShardError(f"{where}: {v!r} is not a valid {spec.kind} value ({want})")


def _schema(path: Path) -> list[tuple[AttributeSpec, str]]:
    """[(attribute, source column)] from attributes.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    items = data.get("attributes") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ShardError(f"{path}: expected a list of attributes or {{\"attributes\": [...]}}")
    out = []
    for i, a in enumerate(items, start=1):
        if not isinstance(a, dict) or "name" not in a or "kind" not in a:
            raise ShardError(f"{path}: attribute #{i} needs at least 'name' and 'kind'")
        try:
            out.append((AttributeSpec(**{k: v for k, v in a.items() if k != "column"}), a.get("column", a["name"])))
        except (TypeError, ShardError) as e:
            raise ShardError(f"{path}: attribute #{i}: {e}") from None
    return out


def _pairs(path: Path, keys_by_path: dict[str, str], split_of: dict[str, str], declared: set[str],
           strict: bool) -> tuple[list[tuple[int, Pair]], list[str]]:
    """[(line, pair)] and the attributes first named by the pairs file (declared when not strict)."""
    cols, rows = read_table(path)
    side = "key" if {"key_i", "key_j"} <= set(cols) else "path" if {"path_i", "path_j"} <= set(cols) else None
    if side is None or not {"attribute", "relation"} <= set(cols):
        raise ShardError(f"{path}:1: header must have key_i,key_j (or path_i,path_j),attribute,relation[,split]; got {cols}")
    out, new = [], []
    for n, r in rows:
        ks = []
        for col in (f"{side}_i", f"{side}_j"):
            v = str(r.get(col))
            k = (v if v in split_of else None) if side == "key" else keys_by_path.get(str(PurePosixPath(v)))
            if k is None:
                raise ShardError(f"{path}:{n}: column {col}: image {r.get(col)!r} is not in the label file")
            ks.append(k)
        attr, rel, split = r.get("attribute") or "", r.get("relation") or "", r.get("split")
        if rel not in ("more", "less", "similar"):
            raise ShardError(f"{path}:{n}: column relation: {rel!r} is not one of more, less, similar")
        if attr not in declared:
            if strict or not KEY_RE.match(attr):
                raise ShardError(f"{path}:{n}: column attribute: {attr!r} is not a declared attribute")
            declared.add(attr)
            new.append(attr)
        if not split and split_of[ks[0]] != split_of[ks[1]]:
            raise ShardError(f"{path}:{n}: the images are in splits {split_of[ks[0]]!r} and {split_of[ks[1]]!r}; "
                             "add a split column")
        if split and split not in split_of.values():
            raise ShardError(f"{path}:{n}: column split: {split!r} is not a split of the label file")
        out.append((n, Pair(ks[0], ks[1], attr, rel, split or split_of[ks[0]])))
    return out, new


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    src, o = Path(src), opts.options
    labels = _user_file(src, o["labels"]) if "labels" in o else find_file(
        src, ("labels.csv", "labels.jsonl", "labels.tsv"), "label table", "add labels.csv (path,split,...) or pass --opt labels=FILE")
    cols, rows = read_table(labels)
    for need in ("path", "split"):
        if need not in cols:
            raise ShardError(f"{labels}:1: required column {need!r} missing; columns are {cols}")
    chosen = [c.strip() for c in o["attributes"].split(",") if c.strip()] if "attributes" in o else \
        [c for c in cols if c not in RESERVED]
    for c in chosen:
        if c not in cols:
            raise ShardError(f"--opt attributes: column {c!r} is not in {labels}; columns are {cols}")
    schema_file = _user_file(src, o["schema"]) if "schema" in o else optional_file(src, ("attributes.json",))
    if schema_file:
        attrs = _schema(schema_file)
        for c in set(chosen) - {col for _, col in attrs}:
            raise ShardError(f"{labels}: column {c!r} is not declared in {schema_file}; declare it or pick "
                             "attribute columns with --opt attributes=a,b")
    else:
        attrs = [(_infer(labels, c, rows), c) for c in chosen]

    cats = sorted({str(r["category"]) for _, r in rows if r.get("category") is not None})
    derived = path_keys(str(PurePosixPath(str(r["path"]))) for _, r in rows if r.get("path") and not r.get("key"))
    specs, keys_by_path, split_of = [], {}, {}
    for n, r in rows:
        where = f"{labels}:{n}"
        for col in ("path", "split"):
            if r.get(col) is None:
                raise ShardError(f"{where}: column {col}: empty value")
        rel, split = str(PurePosixPath(str(r["path"]))), str(r["split"])
        key = str(r["key"]) if r.get("key") else derived[rel]
        if not SPLIT_RE.match(split):
            raise ShardError(f"{where}: column split: {split!r} must match {SPLIT_RE.pattern}")
        if not KEY_RE.match(key):
            raise ShardError(f"{where}: column key: {key!r} may hold only letters, digits, '_' and '-'")
        if rel in keys_by_path or key in split_of:
            raise ShardError(f"{where}: duplicate {'path' if rel in keys_by_path else 'key'} ({rel!r} / {key!r})")
        path = image_file(src, rel, f"{where}: column path")
        keys_by_path[rel], split_of[key] = key, split
        cat = r.get("category")
        specs.append(make_spec(key, path, split, opts, instance=None if r.get("instance") is None else str(r["instance"]),
                               category=None if cat is None else cats.index(str(cat)), extra={"path": rel},
                               attributes={s.name: _convert(s, r.get(c), f"{where}: column {c}") for s, c in attrs if c in cols}))
    pairs_file = _user_file(src, o["pairs"]) if "pairs" in o else optional_file(src, ("pairs.csv", "pairs.tsv"))
    pairs, new = _pairs(pairs_file, keys_by_path, split_of, {s.name for s, _ in attrs}, bool(schema_file)) \
        if pairs_file else ([], [])
    declared = [s for s, _ in attrs] + [AttributeSpec(a, "continuous", description="relative (pairs only)") for a in new]
    result = make_plan(sanitise(src.resolve().name), specs, declared, cats, opts,
                       description=f"generic import of {labels.name}", source=str(src),
                       extra={"labels_file": labels.name, "pairs_file": pairs_file.name if pairs_file else None},
                       pairs=[p for _, p in pairs] if pairs_file else None)
    for n, p in pairs:
        check_pair(p, result.meta, f"{pairs_file}:{n}")
    return result
