"""Tests of the embedded datasets (attrworld, cluttered_digits, lfw_subset): fast, CPU, tiny counts."""
from __future__ import annotations

import io
import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from shards.datasets import EMBEDDED, BuildOptions, plan_embedded
from shards.datasets import attrworld as aw
from shards.datasets import attrworld_render as awr
from shards.format import ShardError, check_pair, check_sample

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
CLEAN = {"blur": "0", "jpeg": "0"}  # lossless and unblurred: pixel edits stay inside their regions


def aw_plan(seed=0, count=80, size=None, **opts):
    o = {"identities": "8"}
    o.update({k: str(v) for k, v in opts.items()})
    return plan_embedded("attrworld", BuildOptions(seed=seed, size=size, count=count, options=o))


def pixels(sample):
    return np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"), dtype=np.int16)


def all_specs(plan):
    return [s for v in plan.splits.values() for s in v]


def edited(spec, **attrs):
    s = dict(spec)
    s["attributes"] = dict(spec["attributes"], **attrs)
    return s


def changed_outside(a, b, box, margin=1):
    """Number of pixels that differ between a and b outside `box` (normalised) grown by margin px."""
    h, w = a.shape[:2]
    diff = np.abs(a - b).max(-1) > 0
    x0, y0, x1, y1 = box
    m = np.ones_like(diff)
    m[max(0, int(np.floor(y0 * h)) - margin):int(np.ceil(y1 * h)) + margin,
      max(0, int(np.floor(x0 * w)) - margin):int(np.ceil(x1 * w)) + margin] = False
    return int((diff & m).sum()), int(diff.sum())


# ---------------------------------------------------------------------------------------------- registry

def test_registry_modules_have_known_options_and_plan():
    import importlib

    for name, (mod, _) in EMBEDDED.items():
        m = importlib.import_module(mod)
        assert isinstance(m.KNOWN_OPTIONS, tuple) and callable(m.plan), name


@pytest.mark.parametrize("name,size", [("attrworld", 16), ("attrworld", 300), ("cluttered_digits", 20),
                                       ("lfw_subset", 8)])
def test_bad_size_names_size(name, size):
    with pytest.raises(ShardError, match="--size"):
        plan_embedded(name, BuildOptions(size=size, count=60))


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_unknown_opt_raises(name):
    with pytest.raises(ShardError, match="--opt nonsense"):
        plan_embedded(name, BuildOptions(options={"nonsense": "1"}))


@pytest.mark.parametrize("opt", ["subtlety=2", "face_scale=0.9,0.1", "jpeg=abc", "tau=0.1,0.2", "tau_sim=0.5",
                                 "images_per_identity=1", "unseen_fraction=0.99"])
def test_attrworld_bad_opt_values(opt):
    k, v = opt.split("=")
    with pytest.raises(ShardError, match=f"--opt {k}"):
        plan_embedded("attrworld", BuildOptions(count=80, options={k: v}))


def test_attrworld_too_few_images_per_identity():
    with pytest.raises(ShardError, match="--count"):
        plan_embedded("attrworld", BuildOptions(count=20, options={"identities": "10"}))


# ---------------------------------------------------------------------------------------------- attrworld

def test_attrworld_specs_schema_and_samples_valid():
    p = aw_plan(count=64)
    assert set(p.splits) == set(p.meta.splits) == {"train", "val", "test", "query", "gallery"}
    assert len(p.meta.categories) >= 8
    cont = [a for a in p.meta.attributes if a.kind == "continuous"]
    assert len(cont) >= 7 and sum(a.localised for a in cont) >= 6
    assert sum(a.kind == "binary" for a in p.meta.attributes) >= 2
    json.dumps(p.meta.to_json())
    pickle.dumps(p.load)
    keys = []
    for split, specs in p.splits.items():
        ks = [s["key"] for s in specs]
        assert ks == sorted(ks) and all(KEY_RE.match(k) for k in ks)
        keys += ks
        for s in specs:
            assert list(s) == sorted(s)
            json.dumps(s)
    assert len(keys) == len(set(keys)) == 64
    for spec in all_specs(p):
        smp = p.load(spec)
        check_sample(smp, p.meta)
        assert smp.key == spec["key"] and smp.split == spec["split"]
        for a in p.meta.attributes:
            v = smp.attributes[a.name]
            if a.kind == "continuous":
                assert 0.0 <= v <= 1.0
            if a.localised:
                x0, y0, x1, y1 = smp.boxes[a.name]
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, (a.name, smp.boxes[a.name])
        assert "face_width" not in smp.boxes
        assert Image.open(io.BytesIO(smp.image)).size == (64, 64)


def test_attrworld_determinism():
    p1, p2, p3 = aw_plan(seed=3), aw_plan(seed=3), aw_plan(seed=4)
    assert p1.splits == p2.splits and p1.pairs == p2.pairs and p1.fingerprint == p2.fingerprint
    assert p1.splits != p3.splits and p1.pairs != p3.pairs and p1.fingerprint != p3.fingerprint
    spec = p1.splits["train"][0]
    a, b = p1.load(spec), p1.load(json.loads(json.dumps(spec)))
    assert a.image == b.image and a.boxes == b.boxes
    assert p3.load(p3.splits["train"][0]).image != a.image
    assert aw_plan(seed=3, noise=0.05).fingerprint != p1.fingerprint
    assert aw_plan(seed=3, size=96).fingerprint != p1.fingerprint


def test_attrworld_sizes_and_png():
    for size in (32, 96):
        p = aw_plan(size=size, jpeg=0)
        s = p.load(p.splits["train"][0])
        assert s.ext == "png" and s.image[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(s.image)).size == (size, size)
    p = aw_plan()
    assert p.load(p.splits["train"][0]).ext == "jpg"


@pytest.mark.parametrize("attr", ["smile", "eye_open", "brow_thick", "nose_size", "beard", "hair_dark"])
def test_attrworld_edit_changes_only_its_region(attr):
    p = aw_plan(**CLEAN)
    specs = p.splits["train"][:6]
    for spec in specs:
        lo, hi = p.load(edited(spec, **{attr: 0.05})), p.load(edited(spec, **{attr: 0.95}))
        assert lo.boxes[attr] == hi.boxes[attr]  # boxes do not depend on the value
        outside, total = changed_outside(pixels(lo), pixels(hi), lo.boxes[attr])
        if attr == "hair_dark" and spec["attributes"]["hat"]:
            continue  # the hat may hide most of the hair
        assert total > 0, f"{attr} changed no pixel"
        assert outside == 0, f"{attr}: {outside} of {total} changed pixels outside its box"


@pytest.mark.parametrize("attr", ["glasses", "hat"])
def test_attrworld_binary_edit_inside_box(attr):
    p = aw_plan(**CLEAN)
    for spec in p.splits["train"][:4]:
        off, on = p.load(edited(spec, **{attr: 0})), p.load(edited(spec, **{attr: 1}))
        outside, total = changed_outside(pixels(off), pixels(on), off.boxes[attr])
        assert total > 0 and outside == 0


def test_attrworld_small_attribute_change_is_small():
    """Smooth rendering: a small value step changes the pixels less than a large one."""
    p = aw_plan(**CLEAN)
    spec = p.splits["train"][0]
    ref = pixels(p.load(edited(spec, smile=0.5)))
    d_small = np.abs(pixels(p.load(edited(spec, smile=0.53))) - ref).sum()
    d_big = np.abs(pixels(p.load(edited(spec, smile=0.9))) - ref).sum()
    assert 0 < d_small < d_big


def test_attrworld_hair_dark_monotone():
    p = aw_plan(noise=0, **CLEAN)
    n = 0
    for spec in p.splits["train"]:
        if spec["attributes"]["hat"]:
            continue
        means = box_means(p, spec, "hair_dark", (0.1, 0.5, 0.9))
        assert means[0] > means[1] > means[2]
        n += 1
        if n == 4:
            break
    assert n == 4


def box_means(p, spec, attr: str, values) -> list[float]:
    """Mean pixel value inside `attr`'s box of the same image rendered at each value of `attr`."""
    out = []
    for v in values:
        s = p.load(edited(spec, **{attr: v}))
        x0, y0, x1, y1 = (int(round(c * 64)) for c in s.boxes[attr])
        out.append(pixels(s)[y0:y1, x0:x1].mean())
    return out


def test_attrworld_beard_darkens_jaw():
    p = aw_plan(noise=0, **CLEAN)
    spec = p.splits["train"][1]
    m = box_means(p, spec, "beard", (0.0, 0.5, 1.0))
    assert m[0] > m[1] > m[2]


def test_attrworld_template_matches_direct_geometry():
    rng = np.random.default_rng(0)
    for ident in range(4):
        items, C = awr._template(0, ident, 1.0)
        p = dict(awr.identity_params(0, ident), seed=0, ident=ident)
        for _ in range(3):
            v = dict(zip(awr.VARS, [0.7 + 0.26 * rng.random()] + list(rng.random(5))))
            direct = np.concatenate([q for _, q, _, _ in awr._geometry(p, v, 1.0)])
            via = C @ np.array([1.0] + [v[k] for k in awr.VARS])
            np.testing.assert_allclose(via, direct, atol=1e-9)


def test_attrworld_splits_and_identities():
    p = aw_plan(count=120, identities=12)
    ids = {s: {spec["id"] for spec in v} for s, v in p.splits.items()}
    seen = ids["train"] | ids["val"] | ids["test"]
    unseen = ids["query"] | ids["gallery"]
    assert seen and unseen and not seen & unseen
    assert ids["query"] == ids["gallery"]
    assert sorted(unseen) == p.meta.extra["identities"]["unseen_ids"]
    q = [spec["id"] for spec in p.splits["query"]]
    assert all(q.count(i) == aw.QUERIES_PER_IDENTITY for i in ids["query"])
    for i in seen:  # every seen identity has images in train, val and test
        assert all(i in ids[s] for s in ("train", "val", "test"))
    cat_of = {}
    for spec in all_specs(p):
        assert cat_of.setdefault(spec["id"], spec["category"]) == spec["category"]
        prm = awr.identity_params(0, spec["id"])
        assert spec["category"] == prm["shape"] * 2 + prm["ear"]
    assert sum(p.meta.extra["split_counts"].values()) == 120


def test_attrworld_pairs_follow_ground_truth():
    p = aw_plan(count=200, identities=10, pairs_per_attribute=90, tau=0.2, tau_sim=0.05)
    value = {spec["key"]: (spec["split"], spec["attributes"]) for spec in all_specs(p)}
    counts = {}
    for pr in p.pairs:
        check_pair(pr, p.meta, "pairs")
        si, ai = value[pr.key_i]
        sj, aj = value[pr.key_j]
        assert si == sj == pr.split and pr.split in ("train", "val", "test")
        d = ai[pr.attribute] - aj[pr.attribute]
        assert {"more": d >= 0.2, "less": -d >= 0.2, "similar": abs(d) < 0.05}[pr.relation]
        counts[(pr.attribute, pr.split)] = counts.get((pr.attribute, pr.split), 0) + 1
    assert {a for a, _ in counts} == set(awr.CONTINUOUS)
    assert max(counts.values()) <= 90
    assert all(counts[(a, "train")] == 90 for a in awr.CONTINUOUS)
    assert all(counts.get((a, "test"), 0) <= 30 for a in awr.CONTINUOUS)
    assert {pr.relation for pr in p.pairs} == {"more", "less", "similar"}


def test_attrworld_count_rules():
    p = plan_embedded("attrworld", BuildOptions(count=100))
    assert sum(len(v) for v in p.splits.values()) == 100 and p.meta.extra["identities"]["total"] == 5
    p = plan_embedded("attrworld", BuildOptions(options={"identities": "6", "images_per_identity": "5"}))
    assert sum(len(v) for v in p.splits.values()) == 30
    with pytest.raises(ShardError, match="disagrees"):
        plan_embedded("attrworld", BuildOptions(count=31, options={"identities": "6", "images_per_identity": "5"}))


def test_attrworld_default_plan_is_fast_and_balanced():
    p = plan_embedded("attrworld", BuildOptions())
    n = {s: len(v) for s, v in p.splits.items()}
    assert sum(n.values()) == aw.DEFAULT_COUNT
    assert n["train"] > 6 * n["val"] and n["query"] > 0 and n["gallery"] > 5 * n["query"]
    vals = np.array([[s["attributes"][a] for a in awr.CONTINUOUS] for s in p.splits["train"]])
    assert (vals.std(0) > 0.15).all()  # every continuous attribute varies broadly
    assert ((vals == 0) | (vals == 1)).mean() < 0.05  # and is not saturated at the ends
    assert len({s["category"] for s in p.splits["train"]}) == 8


# ---------------------------------------------------------------------------------------------- cluttered_digits

def cd_plan(seed=0, count=120, **opts):
    return plan_embedded("cluttered_digits",
                         BuildOptions(seed=seed, count=count, options={k: str(v) for k, v in opts.items()}))


def test_cluttered_digits_valid_and_deterministic():
    p = cd_plan()
    n = 0
    for split, specs in p.splits.items():
        ks = [s["key"] for s in specs]
        assert ks == sorted(ks) and all(KEY_RE.match(k) for k in ks)
        for spec in specs[:8]:
            s = p.load(spec)
            check_sample(s, p.meta)
            assert s.image == p.load(json.loads(json.dumps(spec))).image
            assert Image.open(io.BytesIO(s.image)).size == (64, 64)
            n += 1
    assert n > 0
    assert cd_plan().splits == p.splits and cd_plan().fingerprint == p.fingerprint
    q = cd_plan(seed=1)
    assert q.splits != p.splits and q.fingerprint != p.fingerprint


def test_cluttered_digits_zero_shot_split():
    p = cd_plan(count=2000)
    cats = {s: {spec["category"] for spec in v} for s, v in p.splits.items()}
    assert cats["train"] == {0, 1, 2, 3, 4} and cats["test"] == {5, 6, 7, 8, 9} and cats["val"] <= cats["train"]
    inst = {s: {spec["idx"] for spec in v} for s, v in p.splits.items()}
    assert not inst["train"] & inst["val"] and not inst["train"] & inst["test"]
    assert sum(len(v) for v in p.splits.values()) == 2000


def test_cluttered_digits_colour_mode_compositional():
    p = cd_plan(count=1797, mode="colour")
    assert len(p.meta.categories) == 40
    seen = {spec["category"] for s in ("train", "val") for spec in p.splits[s]}
    test = {spec["category"] for spec in p.splits["test"]}
    assert not seen & test and len(seen) == len(test) == 20
    assert {c // 4 for c in seen} == {c // 4 for c in test} == set(range(10))  # every digit on both sides
    assert {c % 4 for c in seen} == {c % 4 for c in test} == set(range(4))  # every colour on both sides
    s = p.load(p.splits["test"][0])
    check_sample(s, p.meta)


def test_cluttered_digits_digit_inside_box():
    p = cd_plan(clutter=0, noise=0)
    for spec in p.splits["train"][:5]:
        s = p.load(spec)
        a = pixels(s).astype(float).mean(-1)
        x0, y0, x1, y1 = (int(round(c * 64)) for c in s.boxes["ink"])
        inside = a[y0:y1, x0:x1]
        out = a.copy()
        out[y0:y1, x0:x1] = np.nan
        assert inside.max() > np.nanmax(out) + 60  # the bright ink is inside the box


# ---------------------------------------------------------------------------------------------- lfw_subset

def test_lfw_subset():
    p = plan_embedded("lfw_subset", BuildOptions(seed=0))
    assert {s: len(v) for s, v in p.splits.items()} == {"train": 150, "test": 50}
    for split in p.splits:
        faces = sum(spec["idx"] < 100 for spec in p.splits[split])
        assert faces == len(p.splits[split]) // 2
    s = p.load(p.splits["test"][0])
    check_sample(s, p.meta)
    assert s.attributes["face"] == s.category and s.ext == "png"
    assert Image.open(io.BytesIO(s.image)).size == (64, 64)
    assert p.load(p.splits["test"][0]).image == s.image
    q = plan_embedded("lfw_subset", BuildOptions(seed=1))
    assert q.splits != p.splits
    assert plan_embedded("lfw_subset", BuildOptions(seed=0)).splits == p.splits
    with pytest.raises(ShardError, match="--count"):
        plan_embedded("lfw_subset", BuildOptions(count=10))
