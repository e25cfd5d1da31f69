"""retrieve.py tests: FAISS indexes on seeded vectors, then CPU runs of main() on demo data.

Fast settings throughout: resnet18 with random (seeded) weights at 64 px, no worker processes.
"""

import json
import re
import urllib.error

import faiss
import numpy as np
import pytest
from PIL import Image

import data
import retrieve

FAST = ["--weights", "none", "--backbone", "resnet18", "--img-size", "64", "--workers", "0"]


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, d, seed, spread=2.0):
    """Unit vectors around 100 fixed centres; spread 2.0 makes neighbours hard to tell apart."""
    centres = np.random.default_rng(0).standard_normal((100, d))
    rng = np.random.default_rng(seed)
    return unit(centres[rng.integers(0, 100, n)] + spread * rng.standard_normal((n, d)))


def index_args(*flags):
    return retrieve.build_parser().parse_args(["--build", *flags])


def recall_at_5(index, xb, xq):
    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    _, It = exact.search(xq, 5)
    _, I = index.search(xq, 5)
    return np.mean([len(set(a) & set(b)) / 5 for a, b in zip(I, It, strict=True)])


def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        retrieve.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("retrieve.py: error: ") and "\n" not in msg, msg
    return msg


@pytest.fixture
def one_faiss_thread():
    """Deterministic and fast k-means: OpenMP threads spin badly on a busy 2-core runner."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieve") / "demo"
    data.main(["demo", "--out", str(out), "--n", "120"])
    return out


@pytest.fixture(scope="module")
def built(demo):
    index = demo / "index"
    retrieve.main(["--build", "--images", str(demo / "images"), "--manifest",
                   str(demo / "gallery.csv"), "--index", str(index), *FAST, "--no-amp"])
    return index


# ----------------------------------------------------------------------------- faiss layer

def test_retrieve_flat_equals_numpy_bruteforce():
    rng = np.random.default_rng(0)
    xb, xq = unit(rng.standard_normal((1000, 32))), unit(rng.standard_normal((20, 32)))
    icfg, index = retrieve.index_from_vectors(xb, index_args())
    assert icfg["index_type"] == "flat" and index.ntotal == 1000
    D, I = index.search(xq, 10)
    S = xq @ xb.T
    order = np.argsort(-S, axis=1)[:, :10]
    assert (I == order).all()
    np.testing.assert_allclose(D, np.take_along_axis(S, order, 1), atol=1e-5)


@pytest.mark.parametrize("kind, floor", [("hnsw", 0.95), ("ivfpq", 0.70)])
def test_retrieve_approximate_recall_floor(kind, floor, one_faiss_thread):
    """5000 x 128 clustered vectors, defaults sized from n. Measured: hnsw (M 32, efSearch 128)
    0.999, ivfpq (nlist 128, m 64, nbits 7, nprobe 16) 0.80; floors leave margin."""
    xb, xq = clustered(5000, 128, 1), clustered(500, 128, 2)
    icfg, index = retrieve.index_from_vectors(xb, index_args("--index-type", kind))
    assert recall_at_5(index, xb, xq) >= floor, icfg


def test_retrieve_pca_whitening_renormalises():
    xb = clustered(2000, 64, 1)
    icfg, index = retrieve.index_from_vectors(xb, index_args("--pca", "16"))
    assert icfg["index_dim"] == 16 and index.ntotal == 2000
    z = xb[:100]
    for i in range(index.chain.size()):  # PCA-whitening, then L2-normalisation, inside the index
        z = index.chain.at(i).apply(z)
    assert z.shape == (100, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-4)
    _, I = index.search(xb[:50], 1)
    assert (I[:, 0] == np.arange(50)).mean() > 0.9
    with pytest.raises(data.UserError, match="--pca"):
        retrieve.index_from_vectors(xb[:10], index_args("--pca", "16"))


def test_retrieve_ivfpq_refuses_tiny_collection():
    with pytest.raises(data.UserError, match="ivfpq cannot train"):
        retrieve.index_from_vectors(clustered(300, 32, 1), index_args("--index-type", "ivfpq"))


# ----------------------------------------------------------------------------- main() runs

def test_retrieve_build_save_load_roundtrip(built, demo, capsys):
    cfg, meta, xb, index = retrieve.open_index(str(built))
    assert cfg["version"] == retrieve.VERSION and cfg["pool"] == "grid" and cfg["n"] == 120
    assert xb.shape == (120, cfg["dim"]) == (120, 512 * 4) and xb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, atol=1e-4)
    gallery = data.read_csv(str(demo / "gallery.csv"))
    assert [r["path"] for r in meta] == [r["path"] for r in gallery]
    assert meta[7]["title"] == gallery[7]["title"]
    D, I = index.search(np.ascontiguousarray(xb[:10]), 3)
    assert (I[:, 0] == np.arange(10)).all()
    # a query rebuilds the same (seeded) model from config.json: the image finds itself
    img = demo / "images" / meta[7]["path"]
    D, I = retrieve.main(["--query", str(img), "--index", str(built), "-k", "3", "--workers", "0"])
    assert I[0, 0] == 7 and D[0, 0] > 0.99


def test_retrieve_query_prints_k_rows_and_sheet(built, demo, tmp_path, capsys):
    meta = data.read_csv(str(built / "meta.csv"))
    imgs = [str(demo / "images" / meta[i]["path"]) for i in (3, 40)]
    sheet = tmp_path / "sheet.png"
    retrieve.main(["--query", *imgs, "--index", str(built), "-k", "4", "--sheet", str(sheet)])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if re.match(r" +\d+  -?[01]\.\d{3}  \S", ln)]
    assert len(rows) == 8 and out.count("query: ") == 2
    assert "Synthetic" in rows[0]  # title and attribution from gallery.csv
    with Image.open(sheet) as im:
        assert im.width > 5 * retrieve.THUMB and 2 * retrieve.THUMB < im.height < 3 * im.width


def test_retrieve_query_id_excludes_itself(built):
    meta = data.read_csv(str(built / "meta.csv"))
    D, I = retrieve.main(["--query-id", meta[5]["path"], meta[6]["path"], "--index", str(built),
                          "-k", "5", "--sheet", str(built / "qid.png")])
    assert I.shape == (2, 5) and 5 not in I[0] and 6 not in I[1]
    assert (np.diff(D, axis=1) <= 1e-6).all()  # ranked best first


def test_retrieve_eval_copy_detection_above_chance(built):
    """Random resnet18 + grid pooling at 64 px: measured copy-detection Top-1 0.65, chance
    1/120 = 0.008. The self-retrieval sanity check is exactly 1."""
    res = retrieve.main(["--eval", "--index", str(built), "--workers", "0"])
    assert res["self"]["top1"] == 1.0
    assert res["copy"]["queries"] == 120 and res["copy"]["top1"] >= 0.4
    assert res["copy"]["recall@5"] >= res["copy"]["top1"]
    assert set(res["labels"]) == {"style", "genre", "attribution"}  # gallery has no artist
    for r in res["labels"].values():
        assert 0 < r["random_map@10"] < 1 and 0 < r["random_p@5"] < 1
    saved = json.loads((built / "eval.json").read_text())
    assert saved["copy"] == res["copy"]


def test_retrieve_add_equals_build_at_once(built, demo, tmp_path):
    """Build on the first 80 gallery rows, --add the rest: the same as `built` (all 120 at
    once); fp32 (--no-amp) so that batch composition cannot change a vector."""
    rows = data.read_csv(str(demo / "gallery.csv"))
    head = tmp_path / "first80.csv"
    data.write_csv(str(head), list(rows[0]), [list(r.values()) for r in rows[:80]])
    part = str(tmp_path / "part")
    retrieve.main(["--build", "--images", str(demo / "images"), "--manifest", str(head),
                   "--index", part, *FAST, "--no-amp"])
    assert retrieve.open_index(part)[0]["n"] == 80
    retrieve.main(["--add", "--manifest", str(demo / "gallery.csv"), "--index", part,
                   "--workers", "0", "--no-amp"])
    a, b = retrieve.open_index(part), retrieve.open_index(str(built))
    assert a[1] == b[1]  # meta rows
    np.testing.assert_allclose(a[2], b[2], atol=1e-5)
    xq = np.ascontiguousarray(b[2][::7])
    (Da, Ia), (Db, Ib) = a[3].search(xq, 10), b[3].search(xq, 10)
    assert (Ia == Ib).all()
    np.testing.assert_allclose(Da, Db, atol=1e-5)
    retrieve.main(["--add", "--index", part, "--workers", "0"])  # nothing new: a no-op
    assert retrieve.open_index(part)[0]["n"] == 120


def test_retrieve_hnsw_pca_build_then_query(demo, tmp_path):
    index = str(tmp_path / "hnsw")
    retrieve.main(["--build", "--images", str(demo / "images"), "--index", index, "--pool", "gem",
                   "--index-type", "hnsw", "--pca", "32", *FAST])
    cfg = json.loads((tmp_path / "hnsw" / "config.json").read_text())
    assert cfg["index_params"]["ef_search"] == 128 and cfg["index_dim"] == 32
    assert cfg["manifest"] is None and cfg["n"] == 120  # no manifest: the folder was scanned
    meta = data.read_csv(str(tmp_path / "hnsw" / "meta.csv"))
    D, I = retrieve.main(["--query-id", meta[0]["path"], "--index", index, "--ef-search", "16"])
    assert I.shape == (1, 5) and 0 not in I[0]


def test_retrieve_skips_bad_files_and_uses_local_weights(demo, tmp_path, capsys):
    """A folder with a corrupt JPEG and a text file, embedded with a local state_dict."""
    import torch
    import torchvision
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((demo / "images" / "Cubism").iterdir())[:3]):
        (root / "sub" / f"ok{i}.jpg").write_bytes(src.read_bytes())
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("hello")
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)  # any fc size
    index = tmp_path / "idx"
    flags = ["--backbone", "resnet18", "--img-size", "64", "--workers", "0"]
    retrieve.main(["--build", "--images", str(root), "--index", str(index), "--weights",
                   str(weights), *flags])
    out = capsys.readouterr().out
    assert "skipped 1 non-image files" in out
    assert [r["path"] for r in data.read_csv(str(index / "skipped.csv"))] == ["broken.jpg"]
    assert [r["path"] for r in data.read_csv(str(index / "meta.csv"))] == \
        ["sub/ok0.jpg", "sub/ok1.jpg", "sub/ok2.jpg"]
    assert np.load(index / "embeddings.npy").shape[0] == 3
    D, I = retrieve.main(["--query", str(root / "sub" / "ok1.jpg"), "--index", str(index),
                          "-k", "1"])
    assert I[0, 0] == 1 and D[0, 0] > 0.99  # the model came back from the weights file
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # other random weights
    assert "changed since" in one_line_error(["--query", str(root / "sub" / "ok1.jpg"),
                                              "--index", str(index)])


def test_retrieve_bad_input_is_one_line(built, demo, tmp_path):
    bad = tmp_path / "fake.jpg"
    bad.write_text("this is not an image")
    img = str(next((demo / "images" / "Cubism").iterdir()))
    idx = ["--index", str(built)]
    assert "not a readable image" in one_line_error(["--query", str(bad), *idx])
    assert "not found" in one_line_error(["--query", str(tmp_path / "nope.jpg"), *idx])
    assert "built with --backbone resnet18" in one_line_error(
        ["--query", img, *idx, "--backbone", "resnet50"])
    assert "built with --img-size 64" in one_line_error(["--query", img, *idx, "--img-size", "96"])
    assert "-k 500" in one_line_error(["--query", img, *idx, "-k", "500"])
    assert "no index" in one_line_error(["--eval", "--index", str(tmp_path / "none")])
    (tmp_path / "empty").mkdir()
    assert "no images" in one_line_error(["--build", "--images", str(tmp_path / "empty"),
                                          "--index", str(tmp_path / "i"), *FAST])
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": retrieve.FORMAT, "version": 0}))
    assert "version" in one_line_error(["--eval", "--index", str(old)])


def test_retrieve_offline_imagenet_is_one_line(demo, tmp_path, monkeypatch):
    import torchvision

    def offline(name, weights=None, **kw):
        if weights is not None:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return real(name, weights=None, **kw)

    real = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    msg = one_line_error(["--build", "--images", str(demo / "images"), "--index",
                          str(tmp_path / "i"), "--backbone", "resnet18", "--weights", "imagenet"])
    assert "--weights none" in msg and "ImageNet" in msg


def test_retrieve_ckpt_embeds_with_crnn_model(demo, tmp_path):
    """--ckpt: a (untrained) crnn.py checkpoint; dim = 2 * hidden, img size from its args."""
    import torch

    import crnn
    a = {"backbone": "resnet18", "hidden": 16, "rnn": "gru", "dropout": 0.0, "img_size": 64}
    classes = {"style": ["A", "B"]}
    ckpt = tmp_path / "best.pt"
    torch.save({"arch": crnn.ARCH, "args": a, "classes": classes,
                "model": crnn.build_model(a, classes).state_dict()}, ckpt)
    rows = data.read_csv(str(demo / "gallery.csv"))[:20]
    data.write_csv(str(tmp_path / "m.csv"), list(rows[0]), [list(r.values()) for r in rows])
    index = str(tmp_path / "idx")
    cfg = retrieve.main(["--build", "--ckpt", str(ckpt), "--images", str(demo / "images"),
                         "--manifest", str(tmp_path / "m.csv"), "--index", index, "--workers", "0"])
    assert cfg["dim"] == 32 and cfg["img_size"] == 64 and cfg["pool"] is None
    img = str(demo / "images" / rows[4]["path"])
    D, I = retrieve.main(["--query", img, "--index", index, "-k", "2"])
    assert I[0, 0] == 4 and D[0, 0] > 0.99
    assert "--pool" in one_line_error(["--query", img, "--index", index, "--pool", "avg"])
