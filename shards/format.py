"""The attrlab shard format: records, metadata, pairs and their validation.

A dataset directory holds (see shards/FORMAT.md for the full description):

    meta.json              DatasetMeta: attributes (name, kind, vocabulary, ordinal, localised),
                           categories, splits
    pairs.tsv              optional relative-attribute comparisons (key_i, key_j, attribute,
                           more|less|similar, split)
    {split}-{n:06d}.tar    image shards: members {key}.{jpg|png} and {key}.json, sorted by key
    pairs-{split}-{n:06d}.tar  pair shards materialised from pairs.tsv (a.{ext}, b.{ext}, json)
    index/{split}.tsv      key -> shard, byte offset and size of its image (random access)
    manifest.json          sample counts and sha256 of every shard and sidecar file

Everything a user can get wrong raises `ShardError`, whose message names the file, key or field
and says what to do; the CLI prints it as one line.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

FORMAT_VERSION = "attrlab-shards/1"
ATTRIBUTE_KINDS = ("continuous", "binary", "categorical")
RELATIONS = ("more", "less", "similar")
IMAGE_EXTS = ("jpg", "png")
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")
SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
PAIRS_FILE = "pairs.tsv"
PAIRS_HEADER = ("key_i", "key_j", "attribute", "relation", "split")


class ShardError(ValueError):
    """A user-fixable problem with a dataset, shard, label or CLI argument (one clear line)."""


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute. continuous: float in [0, 1]; binary: 0/1; categorical: index into values."""

    name: str
    kind: str
    values: tuple[str, ...] = ()
    ordinal: bool = False
    localised: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not KEY_RE.match(self.name):
            raise ShardError(f"attribute name {self.name!r}: use letters, digits, '_' or '-'")
        if self.kind not in ATTRIBUTE_KINDS:
            raise ShardError(f"attribute {self.name!r}: kind {self.kind!r} is not one of {ATTRIBUTE_KINDS}")
        if self.kind == "categorical" and len(self.values) < 2:
            raise ShardError(f"attribute {self.name!r}: a categorical attribute needs >= 2 values")
        if self.kind != "categorical" and self.values:
            raise ShardError(f"attribute {self.name!r}: only categorical attributes take 'values'")
        object.__setattr__(self, "values", tuple(self.values))

    def check_value(self, value: Any) -> str | None:
        """Return why `value` is not valid for this attribute, or None when it is (None = missing)."""
        if value is None:
            return None
        if self.kind == "continuous":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                return f"expected a number in [0, 1], got {value!r}"
            return None if 0.0 <= value <= 1.0 else f"value {value!r} outside [0, 1]"
        if self.kind == "binary":
            return None if value in (0, 1) and not isinstance(value, float) else f"expected 0 or 1, got {value!r}"
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(self.values):
            return f"expected an index into {len(self.values)} values, got {value!r}"
        return None


@dataclass(frozen=True)
class DatasetMeta:
    """The sidecar metadata of a dataset (meta.json)."""

    name: str
    attributes: tuple[AttributeSpec, ...]
    categories: tuple[str, ...]
    splits: tuple[str, ...]
    description: str = ""
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "categories", tuple(self.categories))
        object.__setattr__(self, "splits", tuple(self.splits))
        names = [a.name for a in self.attributes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ShardError(f"dataset {self.name!r}: duplicate attribute names {sorted(dup)}")
        for s in self.splits:
            if not SPLIT_RE.match(s):
                raise ShardError(f"dataset {self.name!r}: split name {s!r} must match {SPLIT_RE.pattern}")

    def attribute(self, name: str) -> AttributeSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise ShardError(f"unknown attribute {name!r}; dataset {self.name!r} has {[a.name for a in self.attributes]}")

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = META_FILE) -> "DatasetMeta":
        d = dict(d)
        fmt = d.pop("format", FORMAT_VERSION)
        if fmt != FORMAT_VERSION:
            raise ShardError(f"{where}: format {fmt!r} is not {FORMAT_VERSION!r}; rebuild the shards")
        try:
            attrs = tuple(AttributeSpec(**a) for a in d.pop("attributes"))
            return cls(attributes=attrs, **d)
        except (TypeError, KeyError, ValueError) as e:
            raise ShardError(f"{where}: malformed metadata ({e}); rebuild or fix the file") from None


@dataclass(frozen=True)
class Sample:
    """One image and its labels, as written into a shard.

    `boxes` are attribute regions in normalised image coordinates (x0, y0, x1, y1) in [0, 1].
    `category` indexes DatasetMeta.categories; attribute values follow AttributeSpec.
    """

    key: str
    image: bytes
    ext: str
    split: str
    instance: str | None = None
    category: int | None = None
    attributes: Mapping[str, float | int | None] = field(default_factory=dict)
    boxes: Mapping[str, tuple[float, float, float, float]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def label_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "instance": self.instance,
            "category": self.category,
            "attributes": dict(self.attributes),
            "boxes": {k: [float(v) for v in b] for k, b in self.boxes.items()},
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class Pair:
    """A relative-attribute comparison: key_i has `relation` (more|less|similar) attribute than key_j."""

    key_i: str
    key_j: str
    attribute: str
    relation: str
    split: str

    def to_row(self) -> str:
        return "\t".join((self.key_i, self.key_j, self.attribute, self.relation, self.split))


def check_label(label: Mapping[str, Any], meta: DatasetMeta, where: str) -> None:
    """Raise ShardError naming `where` (file and key) if a label does not fit the metadata."""
    split = label.get("split")
    if split not in meta.splits:
        raise ShardError(f"{where}: split {split!r} is not one of {list(meta.splits)} in {META_FILE}")
    cat = label.get("category")
    if cat is not None and (not isinstance(cat, int) or isinstance(cat, bool) or not 0 <= cat < len(meta.categories)):
        raise ShardError(f"{where}: category {cat!r} is not an index into the {len(meta.categories)} categories of {META_FILE}")
    known = {a.name: a for a in meta.attributes}
    for name, value in (label.get("attributes") or {}).items():
        spec = known.get(name)
        if spec is None:
            raise ShardError(f"{where}: attribute {name!r} is not declared in {META_FILE}")
        why = spec.check_value(value)
        if why:
            raise ShardError(f"{where}: attribute {name!r}: {why}")
    for name, box in (label.get("boxes") or {}).items():
        if name not in known:
            raise ShardError(f"{where}: box for undeclared attribute {name!r}")
        ok = (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
              and 0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1)
        if not ok:
            raise ShardError(f"{where}: box {name!r} must be [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 1 (normalised)")


def check_sample(s: Sample, meta: DatasetMeta) -> None:
    where = f"sample {s.key!r}"
    if not KEY_RE.match(s.key):
        raise ShardError(f"{where}: keys may hold only letters, digits, '_' and '-' (no dots)")
    if s.ext not in IMAGE_EXTS:
        raise ShardError(f"{where}: image extension {s.ext!r} is not one of {IMAGE_EXTS}")
    if not s.image:
        raise ShardError(f"{where}: empty image bytes")
    check_label(s.label_json(), meta, where)


def check_pair(p: Pair, meta: DatasetMeta, where: str) -> None:
    if p.relation not in RELATIONS:
        raise ShardError(f"{where}: relation {p.relation!r} is not one of {RELATIONS}")
    if p.split not in meta.splits:
        raise ShardError(f"{where}: split {p.split!r} is not one of {list(meta.splits)}")
    if p.attribute not in meta.attribute_names:
        raise ShardError(f"{where}: attribute {p.attribute!r} is not declared in {META_FILE}")
    if p.key_i == p.key_j:
        raise ShardError(f"{where}: a pair compares {p.key_i!r} with itself")


def pairs_from_values(keys: list[str], values: list[float | None], attribute: str, split: str,
                      tau: float, tau_sim: float, max_pairs: int, seed: int) -> list[Pair]:
    """Sample up to `max_pairs` ground-truth comparisons among `keys`.

    Ordered ('more'/'less') when |v_i - v_j| >= tau, 'similar' when |v_i - v_j| < tau_sim, and
    nothing in between (ambiguous comparisons are not labelled, as in crowd-sourced pair sets).
    Deterministic for a given seed.
    """
    import random

    if not 0 <= tau_sim <= tau:
        raise ShardError(f"pairs for {attribute!r}: need 0 <= tau_sim ({tau_sim}) <= tau ({tau})")
    idx = [i for i, v in enumerate(values) if v is not None]
    if len(idx) < 2:
        return []
    rng = random.Random(f"{seed}/{attribute}/{split}")
    out: list[Pair] = []
    seen: set[tuple[int, int]] = set()
    tries = 0
    while len(out) < max_pairs and tries < 20 * max_pairs:
        tries += 1
        i, j = rng.sample(idx, 2)
        if (i, j) in seen or (j, i) in seen:
            continue
        d = values[i] - values[j]  # type: ignore[operator]
        if abs(d) >= tau:
            rel = "more" if d > 0 else "less"
        elif abs(d) < tau_sim:
            rel = "similar"
        else:
            continue
        seen.add((i, j))
        out.append(Pair(keys[i], keys[j], attribute, rel, split))
    return out


def read_json_file(path: Path, fix: str, kind: type = dict) -> Any:
    """A JSON file attrlab wrote (a manifest, a run's state, metrics): its content, or one ShardError
    naming the file and `fix` (what to do) when it is unreadable, not JSON or not a `kind`."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable or not valid JSON ({e}); {fix}") from None
    if not isinstance(value, kind):
        raise ShardError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                         f"found {type(value).__name__}; {fix}")
    return value


def read_meta(root: Path) -> DatasetMeta:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise ShardError(f"{path}: missing; is {root} a shard directory? build one with 'attrlab shards build' or 'import'")
    return DatasetMeta.from_json(read_json_file(path, "rebuild the shards"), where=str(path))


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise ShardError(f"{path}: missing; the shard set is incomplete, re-run the build to finish it")
    m = read_json_file(path, "re-run the build to rewrite it")
    if m.get("format") != FORMAT_VERSION:
        raise ShardError(f"{path}: format {m.get('format')!r} is not {FORMAT_VERSION!r}; rebuild the shards")
    return m


def iter_pairs(path: Path) -> Iterator[Pair]:
    """Stream pairs.tsv, raising ShardError with the line number on a malformed row."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if tuple(header) != PAIRS_HEADER:
            raise ShardError(f"{path}:1: header must be {' '.join(PAIRS_HEADER)} (tab-separated)")
        for n, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5:
                raise ShardError(f"{path}:{n}: expected 5 tab-separated fields, got {len(parts)}")
            yield Pair(*parts)


def write_pairs(path: Path, pairs: Iterable[Pair]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(PAIRS_HEADER) + "\n")
        for p in pairs:
            f.write(p.to_row() + "\n")
            n += 1
    return n
