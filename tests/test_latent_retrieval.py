"""latent_retrieval: the latent space (style autoencoder), the query protocol, external latents,
the preference index from a run, and a Ray Train run end to end. Algorithm 1/2, the distance and
the metrics themselves: tests/test_latent_directions.py; the faiss index: tests/test_latent_index.py."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models import latent_directions as ld
from models.latent_ae import ModulatedConv, StyleAutoencoder
from models.latent_eval import KS, Split, conditioned, query_plan, summarise, sweep
from models.latent_retrieval import LatentRetrievalConfig, build


def test_modulated_conv_equals_per_sample_modulated_weights() -> None:
    """The non-fused form (scale inputs, shared conv, demodulate outputs) equals StyleGAN2's
    per-sample weights w'_ijk = s_i w_ijk / sqrt(sum (s_i w_ijk)^2), computed naively here."""
    torch.manual_seed(0)
    conv = ModulatedConv(5, 4, code_dim=3)
    torch.nn.init.normal_(conv.affine.weight)
    x, w = torch.randn(2, 5, 6, 6), torch.randn(2, 3)
    s = conv.affine(w)
    for b in range(2):
        weight = conv.scale * conv.weight * s[b][None, :, None, None]
        weight = weight / torch.sqrt(weight.pow(2).sum((1, 2, 3), keepdim=True) + 1e-8)
        ref = torch.nn.functional.conv2d(x[b:b + 1], weight, padding=1)[0] + conv.bias[:, None, None]
        assert torch.allclose(conv(x, w)[b], ref, atol=1e-5)


def test_autoencoder_shapes_and_layer_codes() -> None:
    ae = StyleAutoencoder(32, code_dim=8, base=8)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    w = ae.encode(x)
    assert ae.n_layers == 8 and w.shape == (3, 64) == (3, ae.latent_dim)
    y = ae.decode(w)
    assert y.shape == x.shape and y.abs().max() <= 1


def test_labels_binary_as_given_continuous_thresholded(tiny_attrworld: Path) -> None:
    from shards.format import read_meta

    meta = read_meta(tiny_attrworld)
    m = build(LatentRetrievalConfig(attributes=("smile", "glasses"), threshold=0.6, code_dim=8, ae_base=8), meta)
    cols = [meta.attribute_names.index("smile"), meta.attribute_names.index("glasses")]
    attrs = torch.full((3, len(meta.attributes)), float("nan"))
    attrs[:, cols[0]] = torch.tensor([0.59, 0.6, float("nan")])
    attrs[:, cols[1]] = torch.tensor([1.0, 0.0, 1.0])
    y = m.labels(attrs)
    assert y[0].tolist() == [0.0, 1.0] and y[1].tolist() == [1.0, 0.0]
    assert math.isnan(y[2, 0]) and y[2, 1] == 1.0


def test_bad_config_is_one_clear_error(tiny_attrworld: Path) -> None:
    from shards.format import ShardError, read_meta

    meta = read_meta(tiny_attrworld)
    with pytest.raises(ShardError, match="'hair_style' is not a continuous or binary attribute"):
        build(LatentRetrievalConfig(attributes=("hair_style",)), meta)
    with pytest.raises(ShardError, match="must be a power of two"):
        build(LatentRetrievalConfig(image_size=48), meta)
    with pytest.raises(ShardError, match="include 1.0"):
        build(LatentRetrievalConfig(preferences=(0.0, 2.0)), meta)


def test_conditioned_baseline_is_sequential_projection() -> None:
    torch.manual_seed(1)
    F_ = torch.nn.functional.normalize(torch.randn(10, 3), dim=0)
    Q = conditioned(F_)
    assert ld.ortho_err(Q) < 1e-6
    assert torch.allclose(Q[:, 0], F_[:, 0], atol=1e-6)  # the first direction is kept as is
    # the second: f_2 minus its projection on f_1, normalised (InterFaceGAN's conditional edit)
    f2 = F_[:, 1] - (F_[:, 1] @ F_[:, 0]) * F_[:, 0]
    assert torch.allclose(Q[:, 1], f2 / f2.norm(), atol=1e-6)


def test_query_plan_flips_exactly_one_labelled_attribute() -> None:
    Y = torch.tensor([[0.0, 1.0, float("nan")], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    rows, target, desired = query_plan(Y, 10, seed=3)
    assert list(rows) == [0, 1, 2]
    for r, t, d in zip(rows, target, desired):
        assert not math.isnan(Y[r, t])
        diff = [j for j in range(3) if not (math.isnan(Y[r, j]) and math.isnan(d[j])) and Y[r, j] != d[j]]
        assert diff == [t]


def _planted(n: int = 300, d: int = 16, m: int = 3, ids: int = 30, seed: int = 0) -> tuple[Split, torch.Tensor]:
    """Latents = identity code + 3 * sum_m y_m g_m + noise, with orthonormal g (the true directions)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))[0].float()
    ident = torch.randn(ids, d, generator=g)
    who = torch.arange(n) % ids
    Y = (torch.rand(n, m, generator=g) < 0.5).float()
    W = ident[who] + 3 * Y @ G.T + 0.1 * torch.randn(n, d, generator=g)
    return Split(W, Y, Y, [f"id{i}" for i in who.tolist()]), G


def test_protocol_adjustment_and_preference_beat_the_query_as_is() -> None:
    """With the true directions, adjusting the flipped attribute retrieves images that have it
    (nDCG above plain L2 of the unadjusted query); emphasising it (larger p_m) retrieves more
    images with the desired value of that attribute, p_m = 0 fewer; `best` is at least `none`;
    `constrained` keeps identity at or above its floor."""
    split, G = _planted()
    cfg = SimpleNamespace(queries=100, preferences=(0.0, 1.0, 4.0, 16.0), seed=0)
    a_min, a_max = ld.adjust_range(ld.projections(split.W, G))
    s = sweep(split, G, a_min, a_max, cfg)
    floor = {k: s["same"][(1.0, k)] - 0.5 for k in KS}
    out = summarise(s, floor)
    assert out["none/ndcg@5"] > s["l2"][5] + 0.02, (out["none/ndcg@5"], s["l2"][5])
    rows, target = s["rows"], s["target"]
    want = 1 - split.Y[rows, target].numpy()

    def hit(v: float) -> float:  # share of the top 5 with the desired value of the flipped attribute
        return float((split.Y.numpy()[s["ids"][v][:, :5], target[:, None]] == want[:, None]).mean())

    assert hit(0.0) < hit(1.0) <= hit(16.0), (hit(0.0), hit(1.0), hit(16.0))
    assert hit(16.0) > 0.9
    for k in KS:
        assert out[f"best/ndcg@{k}"] >= out[f"none/ndcg@{k}"] - 1e-12
        assert out[f"best/ndcg@{k}"] >= out[f"constrained/ndcg@{k}"] - 1e-12
        assert 0.0 <= out[f"none/ndcg@{k}"] <= 1.0
    # constrained picks, per query, only preferences whose identity measure meets the floor
    ps = cfg.preferences
    idm = np.stack([s["same"][(v, 5)] for v in ps])
    nd = np.stack([s["ndcg"][(v, 5)] for v in ps])
    ok = idm >= floor[5][None] - 1e-9
    expect = np.where(ok.any(0), np.where(ok, nd, -np.inf).max(0), nd[ps.index(1.0)])
    assert out["constrained/ndcg@5"] == pytest.approx(float(expect.mean()))


def _write_external(tmp: Path, n: int = 400, ids: int = 40) -> tuple[Path, Path, Path, Path, torch.Tensor]:
    split, G = _planted(n=n, d=24, m=3, ids=ids, seed=2)
    names = ["Smiling", "Eyeglasses", "Bangs"]
    files = [f"{i:06d}.jpg" for i in range(n)]
    lat = tmp / "w.npy"
    np.save(lat, split.W.numpy().reshape(n, 2, 12))  # layer-wise codes: flattened on load
    attr = tmp / "list_attr_celeba.txt"
    rows = [" ".join([f, *("1" if v else "-1" for v in y.tolist())]) for f, y in zip(files, split.Y.bool())]
    attr.write_text(f"{n}\n{' '.join(names)}\n" + "\n".join(rows) + "\n")
    part = tmp / "list_eval_partition.txt"
    part.write_text("\n".join(f"{f} {0 if i < n * 0.6 else 1 if i < n * 0.7 else 2}" for i, f in enumerate(files)) + "\n")
    ident = tmp / "identity_CelebA.txt"
    ident.write_text("\n".join(f"{f} {i % ids}" for i, f in enumerate(files)) + "\n")
    return lat, attr, part, ident, G


def test_external_latents_fit_evaluate_index_and_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.cli import main
    from models.latent_index import PreferenceIndex

    lat, attr, part, ident, G = _write_external(tmp_path)
    out = tmp_path / "fit"
    assert main(["latent", "fit", "--latents", str(lat), "--attributes", str(attr), "--partition", str(part),
                 "--identities", str(ident), "--lams", "0,0.005", "--queries", "60", "--index", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("ndcg@5", "ndcg@10", "ndcg@20", "ortho_err", "same_identity@5", "ifg/ndcg@5", "lam_0/ndcg@5",
                "lam_0.005/entries95", "l2/ndcg@5"):
        assert key in m and math.isfinite(m[key]), key
    assert m["ortho_err"] < 1e-5
    assert m["none/ndcg@5"] > m["l2/ndcg@5"]  # the adjustment moves results towards the desired attributes
    assert (out / "latent_energy.png").stat().st_size > 0 and (out / "latent_preference.png").is_file()

    from safetensors.torch import load_file

    F_ = load_file(str(out / "directions.safetensors"))["directions"]
    cos = (F_.T @ G).abs()  # [fitted, planted]: each planted direction found by its own attribute
    assert (cos.argmax(0) == torch.arange(3)).all() and cos.diagonal().min() > 0.7, cos
    # the index of the test split: exact against the weighted distance of Eq. 3
    idx = PreferenceIndex.load(out / "index")
    W = torch.from_numpy(np.load(lat).reshape(400, -1))[280:]
    p = np.array([0.0, 1.0, 8.0])
    dist, ids = idx.search(W[:2].numpy(), p, 5)
    ref = ld.weighted_distance(W[:2].double(), W.double(), F_.double(), torch.from_numpy(p))
    assert (ids == torch.topk(ref, 5, largest=False).indices.numpy()).all()
    assert np.allclose(dist, torch.topk(ref, 5, largest=False).values.numpy(), rtol=1e-6, atol=1e-6)

    # `attrlab latent search`: by key, with an adjustment (Eq. 4, T(a) from the training range) and preferences
    capsys.readouterr()
    assert main(["latent", "search", str(out), "--key", "000281.jpg", "--adjust", "Eyeglasses=1",
                 "--prefer", "Eyeglasses=4", "--prefer", "Smiling=0", "-k", "4"]) == 0
    got = json.loads(capsys.readouterr().out)
    d = load_file(str(out / "directions.safetensors"))
    c_t = ld.projections(W[1:2].double(), F_.double())
    c_t[0, 1] = d["a_max"][1].double()
    ref = ld.weighted_distance(W[1:2].double(), W.double(), F_.double(), torch.tensor([0.0, 4.0, 1.0]), c_t)[0]
    ref[1] = torch.inf  # the query is not its own result
    keys = [f"{i:06d}.jpg" for i in range(280, 400)]
    assert [r["key"] for r in got["results"]] == [keys[i] for i in torch.topk(ref, 4, largest=False).indices]
    assert main(["latent", "search", str(out), "--key", "000281.jpg", "--adjust", "Beard=1"]) == 2
    assert "--adjust 'Beard=1'" in capsys.readouterr().err


def test_external_latents_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.cli import main

    lat, attr, part, _, _ = _write_external(tmp_path)
    short = tmp_path / "short.npy"
    np.save(short, np.load(lat)[:10])
    out = tmp_path / "fit"
    assert main(["latent", "fit", "--latents", str(short), "--attributes", str(attr), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--keys" in err and "10 rows" in err
    assert not out.exists() and not list(tmp_path.glob(".fit.tmp-*"))
    assert main(["latent", "fit", "--latents", str(lat), "--attributes", str(attr), "--use", "Nope", "--out", str(out)]) == 2
    assert "--use 'Nope'" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["latent", "fit", "--latents", str(lat), "--attributes", str(attr), "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine"


def _tiny_sets(extra: list[str] = ()) -> list[str]:
    sets = ["data.loader.num_workers=0", "data.loader.batch_size=8", "model.code_dim=8", "model.ae_base=8",
            "model.lams=[0.0,0.005]", "model.fit_iters=100", "model.queries=40", "data.test_split=train",
            "data.val_split=train", *extra]
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.slow
def test_ray_train_learns_the_latent_space_then_indexes_and_reports(ray_session: object, tiny_attrworld: Path,
                                                                     tmp_path: Path) -> None:
    """2 Ray Train workers (DeepSpeed, gloo) train the autoencoder: the reconstruction error falls
    from the initial weights; validation fits orthonormal directions into the export; the run's
    preference index and report are built from it."""
    from jobs.checkpoints import latest_export
    from jobs.cli import main
    from jobs.evaluate import load_export
    from jobs.train import EvalData

    run = tmp_path / "run"
    assert main(["train", "latent_retrieval", "--data", str(tiny_attrworld), "--out", str(run), "--workers", "2",
                 "--max-steps", "100", *_tiny_sets(["eval.every_steps=100", "checkpoint.every_steps=100",
                                                   "scaling.cpus_per_worker=0.5", "optim.lr=0.01",
                                                   "schedule.warmup_steps=5"])]) == 0
    method, cfg, model, meta = load_export(latest_export(run))
    assert bool(model.fitted) and ld.ortho_err(model.directions) < 1e-5
    loaders = EvalData(cfg, str(tiny_attrworld), "train", method="latent_retrieval", meta=meta)
    images = torch.cat([b["image"] for b in loaders("train")])

    def recon_l1(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((m.to_unit(m.decode_latents(m.encode_images(images))) - m.to_unit(images)).abs().mean())

    torch.manual_seed(cfg.seed)  # rank 0's initial weights (jobs/train.py seeds seed + rank)
    start, end = recon_l1(method.build(cfg.model, meta).eval()), recon_l1(model)
    assert end < 0.85 * start, (start, end)
    logged = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    for key in ("ndcg@5", "ndcg@10", "ndcg@20", "ortho_err", "same_identity@5", "ifg/ndcg@5"):
        assert math.isfinite(logged[f"val/{key}"]), key

    assert main(["index", str(run), "--kind", "preference", "--split", "train"]) == 0
    from models.latent_index import PreferenceIndex

    idx = PreferenceIndex.load(run / "index" / "train-preference")
    assert idx.ntotal == len(loaders.embed("train", model)["emb"])
    assert main(["report", str(run)]) == 0
    for name in ("latent_edits.png", "latent_retrieval.png", "latent_preference.png", "latent_energy.png"):
        assert (run / "report" / name).stat().st_size > 0, name


def test_evaluate_fits_orthonormal_directions_into_the_model(tiny_attrworld: Path) -> None:
    """In process, untrained latent space: validation fills the model's buffers (what the export
    carries to index and serving) and reports every metric of the issue."""
    from jobs.cli_train import load_run_config
    from jobs.train import EvalData
    from models import registry
    from shards.format import read_meta

    cfg = load_run_config("latent_retrieval", Path("jobs/configs/latent_retrieval.yaml"),
                          [s for s in _tiny_sets() if s != "--set"])
    meta = read_meta(tiny_attrworld)
    method = registry.get("latent_retrieval")
    torch.manual_seed(0)
    model = method.build(cfg.model, meta).eval()
    assert not bool(model.fitted)
    with torch.no_grad():  # as the loop's validation and `attrlab eval` call it
        out = method.evaluate(model, EvalData(cfg, str(tiny_attrworld), "train", method="latent_retrieval", meta=meta),
                              cfg.model, meta)
    assert bool(model.fitted) and ld.ortho_err(model.directions) < 1e-5
    assert torch.allclose(model.directions.norm(dim=0), torch.ones(len(model.attributes)), atol=1e-5)
    assert (model.a_min < model.a_max).all() and float(model.lam) in (0.0, 0.005)
    for key in ("ndcg@5", "ndcg@10", "ndcg@20", "ortho_err", "same_identity@5", "l2/ndcg@5", "ifg/ndcg@5",
                "lam_0/ndcg@5", "fixed_16/ndcg@5", "best/ndcg@5", "recon_l1", "entries95"):
        assert key in out and math.isfinite(out[key]), key
    assert 0.0 <= out["ndcg@5"] <= 1.0 and out["queries"] == 40
