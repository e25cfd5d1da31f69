"""ArtExtract's tests: CPU only, no network, no downloaded weights, nothing outside tmp_path.

Three layers (STYLE.md): hand-computed metric cases and scikit-learn cross-checks; seeded
synthetic data for indexes and models; CPU smoke runs of each script's main([...]) on small
demo data. Shared helpers and fixtures come first, then one section per script, in the order
the scripts import each other. Run: python -m pytest -q test_all.py
"""

import argparse
import builtins
import contextlib
import csv
import errno
import html
import importlib
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.error
import zipfile
import zlib
from collections import Counter
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import faiss
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw, ImageOps

import aspects
import bench
import by
import crnn
import crnn_data
import crnn_model
import crnn_train
import data
import embed
import fetch
import files
import filters
import index as faiss_index  # index.py (`index` names a FAISS index here)
import layout
import metrics
import nets
import pages
import painter
import poses
import retrieve
import retrieve_eval
import wikiart

HERE = os.path.dirname(os.path.abspath(__file__))



# ============================================================================
# shared helpers and fixtures


# -------------------------------------------------------------------------- torch and faiss threads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box two processes each spinning 2 OpenMP threads
    ran 10x slower (244 s vs 24 s measured); with 64 px images one thread is also the faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_faiss_thread():
    """Deterministic and fast k-means: OpenMP threads spin badly on a busy 2-core runner."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture
def one_blas_thread():
    """numpy's OpenBLAS threads spin on a busy 2-core runner: an SVD of 300 x 512 took 0.3-2.8 s
    with them, 0.05 s with one (threadpoolctl comes with scikit-learn)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------- data the tests write


def jpeg_bytes(size=(64, 48), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


MOJI = "Art_Nouveau_Modern/eugã¨ne-grasset_la-belle\u00adjardini\u00a0re.jpg"


def write_lists(d):
    """Small ArtGAN-format lists with the real quirks."""
    os.makedirs(d, exist_ok=True)
    styles = ["Art_Nouveau", "Baroque", "Cubism", "Tiny"]
    with open(os.path.join(d, "style_class.txt"), "w", newline="") as f:
        f.write("".join(f"{i} {n}\n" for i, n in enumerate(styles)))
    with open(os.path.join(d, "genre_class"), "w", newline="") as f:
        f.write("0 landscape\n1 portrait\n2 still_life\n3 cityscape\n4 religious_painting\n")
    with open(os.path.join(d, "artist_class"), "w", newline="") as f:
        f.write("0 Rembrandt\n1 Eugene_Grasset\n")
    train, val = [], []
    for c, name in enumerate(styles[:3]):
        folder = "Art_Nouveau_Modern" if name == "Art_Nouveau" else name
        for i in range(20):
            (val if i % 4 == 0 else train).append((f"{folder}/artist-{c}_work-{i}(1).jpg", c))
    train.append((MOJI, 0))
    train += [("Tiny/a_b.jpg", 3), ("Tiny/a_c.jpg", 3)]
    escaping = [("../../etc/passwd", 1), ("/abs.jpg", 1)]  # listed, never joined to a root
    for name, rows in (("style_train.csv", train + escaping), ("style_val.csv", val)):
        with open(os.path.join(d, name), "wb") as f:  # CRLF, no header, UTF-8 bytes
            f.write("".join(f"{p},{y}\r\n" for p, y in rows).encode("utf-8"))
    # genre: a conflicting duplicate in val; a cross-task split conflict (style val, genre train)
    g_train = [("Baroque/artist-1_work-0(1).jpg", 1), ("Baroque/artist-1_work-1(1).jpg", 4)]
    g_val = [("Cubism/artist-2_work-3(1).jpg", 1), ("Cubism/artist-2_work-3(1).jpg", 4),
             (MOJI, 0)]
    for name, rows in (("genre_train.csv", g_train), ("genre_val.csv", g_val)):
        with open(os.path.join(d, name), "wb") as f:
            f.write("".join(f"{p},{y}\r\n" for p, y in rows).encode("utf-8"))
    with open(os.path.join(d, "artist_train"), "w", newline="") as f:
        f.write("(Path to image),, (Groundtruth class) \n\n")
        f.write("Baroque/artist-1_work-2(1).jpg,,0\n" + f"{MOJI},,1\n")
    with open(os.path.join(d, "artist_val"), "w", newline="") as f:
        f.write("(Path to image),, (Groundtruth class)\n\nBaroque/artist-1_work-5(1).jpg,,0\n")
    return train + val


OBJECTS = (
    # header drift: a leading uuid column, columns in another order than the 2025 exports
    "uuid,objectid,accessionnum,title,displaydate,medium,dimensions,attributioninverted,"
    "attribution,classification\r\n"
    'u1,101,1949.6.1,Self-Portrait,c. 1630,oil on canvas,"overall: 74.6 × 65.1 cm\r\n'
    'framed: 99.7 × 91.1 cm","Leyster, Judith",Judith Leyster,Painting\n'
    'u2,102,1963.10.1,"The Boating Party, with ""quotes""",1893/1894,oil,"a\nb",'
    '"Cassatt, Mary",Mary Cassatt,Painting\n'
    "u3,103,1.1,No Image Yet,1900,oil,,,,Painting\n"
    "u4,104,1.2,A Drawing,1900,chalk,,,,Drawing\n"
    "u5,105,1.3,Portrait of a Man,1650,oil,,,,Painting\n"
)


IMAGES = (
    "uuid,iiifurl,iiifthumburl,viewtype,sequence,width,height,maxpixels,openaccess,created,"
    "modified,depictstmsobjectid,assistivetext\n"
    "a1,https://api.nga.gov/iiif/a1,t,alternate,0,10,10,,1,,,101,\n"
    "p1,https://api.nga.gov/iiif/p1,t,primary,1,10,10,,1,,,101,\n"
    "p0,https://api.nga.gov/iiif/p0,t,primary,0,10,10,,1,,,101,\"multi\nline\"\n"
    "p2,https://api.nga.gov/iiif/p2,t,primary,0,10,10,,1,,,102,\n"
    "p4,https://api.nga.gov/iiif/p4,t,primary,0,10,10,,1,,,104,\n"
    "p5,https://api.nga.gov/iiif/p5,t,primary,0,10,10,,0,,,105,\n"
)


def write_nga(d):
    os.makedirs(d, exist_ok=True)
    (d / "objects.csv").write_bytes(OBJECTS.encode())
    (d / "published_images.csv").write_bytes(IMAGES.encode())


def png_bomb(path, w, h):
    """A valid grey PNG of w x h px that is all zeros: a few hundred KB on disk, w*h bytes
    decoded. zlib takes the rows one at a time, so the test itself never holds them all."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    z, row, idat = zlib.compressobj(1), b"\0" * (w + 1), []  # filter byte 0 + w zero pixels
    for _ in range(h):
        idat.append(z.compress(row))
    idat.append(z.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))


def write_odd_images(root):
    os.makedirs(root, exist_ok=True)
    Image.new("CMYK", (300, 200), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red
    Image.fromarray(np.full((200, 300), 32896, np.uint16)).save(root / "gray16.png")
    p = Image.new("P", (200, 200), 0)
    p.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    p.paste(1, (50, 50, 150, 150))
    p.save(root / "palette.png", transparency=0)  # blue is transparent
    im = Image.new("RGB", (400, 200), (0, 128, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display: 200 wide, 400 high
    im.save(root / "rotated.jpg", exif=exif)
    (root / "trunc.jpg").write_bytes(jpeg_bytes((300, 300))[:300])
    Image.new("L", (256, 512), 90).save(root / "gray.jpg")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """120 synthetic demo images (data.py demo), shared by the crnn and retrieve tests."""
    out = tmp_path_factory.mktemp("shared") / "demo"
    data.main(["demo", "--out", str(out), "--n", "120"])
    return out


@pytest.fixture(scope="module")
def demo_tail(tmp_path_factory):
    """120 synthetic images with a 100:1 long tail of styles (72, 29, 11, 4, 2, 2 painted)."""
    out = tmp_path_factory.mktemp("shared") / "demo-tail"
    data.main(["demo", "--out", str(out), "--n", "120", "--tail", "100"])
    return out


@pytest.fixture(scope="module")
def demo_zip(demo):
    """demo/images as a zip under one top folder (as wikiart.zip holds wikiart/<Style>/...)."""
    path = demo.parent / "demo_images.zip"
    if not path.exists():
        root = demo / "images"
        files = sorted(p for p in root.rglob("*") if p.is_file())
        write_zip(path, {p.relative_to(root).as_posix(): p.read_bytes() for p in files},
                  prefix="images/")
    return path


def noise_jpeg(seed, size=(48, 32)):
    """A small noisy JPEG: its bytes are mostly entropy-coded data, so a flipped byte in the
    middle still decodes (to wrong pixels) and only the zip's CRC-32 can tell."""
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_zip(path, members, prefix="", corrupt=None):
    """A stored (uncompressed) zip of {name: bytes} under `prefix`; member `corrupt` gets one
    byte in the middle of its data flipped after writing, so its CRC-32 no longer matches."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, body in members.items():
            zf.writestr(prefix + name, body)
    if corrupt is not None:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(prefix + corrupt)
        with open(path, "r+b") as f:
            f.seek(info.header_offset + 26)  # local header: name and extra-field lengths
            n_name, n_extra = struct.unpack("<HH", f.read(4))
            at = info.header_offset + 30 + n_name + n_extra + info.compress_size // 2
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0x10]))
    return path


class HandleProbe:
    """Item i of an ImageDataset read, then (pid that opened the zip handle, pid reading)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        assert self.ds[i] is not None
        return torch.tensor([self.ds.source._pid, os.getpid()])


HF_NAMES = {"style": ["Baroque", "Cubism", "Impressionism"],
            "artist": ["Unknown Artist", "claude-monet", "pablo-picasso", "rembrandt", "paul-klee"],
            "genre": ["landscape", "portrait", "Unknown Genre"]}


def hf_shard(i, n=12, columns=("image", "artist", "genre", "style"), metadata=True):
    """Parquet bytes in the huggan/wikiart layout: image {bytes, path}, integer labels, the
    ClassLabel names in the schema's `huggingface` metadata; 3-row row groups (streamed). Row
    j = i * n + k has style j % 3, artist j % 5, genre j % 3; row k = 5 is not an image."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    js = range(i * n, i * n + n)
    cols = {"image": pa.array([{"bytes": b"junk" if j % n == 5 else noise_jpeg(j), "path":
                                f"painter-{j % 7}_work-{j}.jpg"} for j in js]),
            "artist": pa.array([j % 5 for j in js], pa.int64()),
            "genre": pa.array([j % 3 for j in js], pa.int64()),
            "style": pa.array([j % 3 for j in js], pa.int64())}
    table = pa.table({c: cols[c] for c in columns})
    if metadata:
        feats = {"image": {"_type": "Image"}, **{t: {"names": names, "_type": "ClassLabel"}
                                                 for t, names in HF_NAMES.items()}}
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": feats}})})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ a full disk


def enospc(*a, **kw):
    """Stands in for a write, fallocate or faiss call on a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs mounted at tmp_path/disk, to fill up: needs root and a kernel that lets
    this process mount one (a container may not); skipped, with the reason, elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    except OSError as e:
        pytest.skip(f"no mount command: {e}")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()[:120]}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_disk(disk, leave):
    """Fills the file system of `disk` with one file, but `leave` bytes."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(bytes(max(0, st.f_bavail * st.f_frsize - leave)))


# --------------------------------------------------------------------------- a loopback HTTP server


class Server:
    """127.0.0.1 image server: 503-then-200, 429 with Retry-After, truncated JPEG, 404; and the
    bytes of `files` ({url path: bytes}, e.g. parquet shards), 404 for other /hf/ paths."""

    def __init__(self):
        self.hits, self.times, self.agents, self.files = {}, {}, set(), {}
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                with server.lock:
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    n = server.hits[self.path] = server.hits.get(self.path, 0) + 1
                    server.times.setdefault(self.path, []).append(time.time())
                    server.agents.add(self.headers.get("User-Agent"))
                try:
                    time.sleep(0.05)  # let requests overlap, to observe concurrency
                    self.respond(n)
                finally:
                    with server.lock:
                        server.inflight -= 1

            def respond(self, n):
                body = server.files.get(self.path, jpeg_bytes())
                if self.path.startswith("/hf/") and self.path not in server.files:
                    return self.send_error(404)
                if self.path.startswith("/lag"):
                    time.sleep(0.4)
                if self.path.startswith("/flaky") and n == 1:
                    return self.send_error(503)
                if self.path.startswith("/slow") and n == 1:
                    self.send_response(429)
                    self.send_header("Retry-After", "1")
                    self.end_headers()
                    return
                if self.path.startswith("/missing"):
                    return self.send_error(404)
                if self.path.startswith("/to-ftp"):  # a redirect off http(s)
                    self.send_response(302)
                    self.send_header("Location", "ftp://127.0.0.1/x.jpg")
                    self.end_headers()
                    return
                if self.path.startswith("/huge"):  # 2 MB, length not announced
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"\xff" * (2 << 20))
                    return
                if self.path.startswith("/trunc"):
                    body = body[: len(body) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


# --------------------------------------------------------------------------- crnn and retrieve runs


# --no-amp: fp32 on any machine, so that figures compared across code paths (training's val
# against --eval, --predict against --eval) cannot differ by a CPU's bf16 rounding
CRNN_FAST = ["--backbone", "resnet18", "--weights", "none", "--img-size", "64", "--workers", "0",
             "--no-amp"]


# Measured on the 2-core dev box: 12 epochs of batch 16 reach val style accuracy 0.60-0.67 at
# the best epoch for seeds 0-3 (chance 1/6), mean macro-F1 0.50-0.57 (chance ~0.2).
LEARN = ["--epochs", "12", "--batch-size", "16", "--lr", "1e-3", "--seed", "0"]


@pytest.fixture(scope="module")
def trained(demo):
    out = demo.parent / "run"
    crnn.main(["--train", "--data", str(demo / "manifest.csv"), "--out", str(out), *CRNN_FAST,
               *LEARN])
    return out


def kill_in_epoch(monkeypatch, epoch):
    """Ctrl-C in crnn.py's epoch `epoch` (of this process), at its start: the epochs before it
    finished and wrote last.pt. Undone by monkeypatch."""
    real, calls = crnn_train.train_one_epoch, []

    def killed(*a, **kw):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(crnn_train, "train_one_epoch", killed)


def crnn_error(capsys, argv):
    """Run crnn.main(argv), expect exit with a single `crnn.py: error:` line; return it."""
    with pytest.raises(SystemExit) as e:
        crnn.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("crnn.py: error: ") and "\n" not in msg, msg
    assert "Traceback" not in capsys.readouterr().err
    return msg


RETRIEVE_FAST = ["--weights", "none", "--backbone", "resnet18", "--img-size", "64",
                 "--workers", "0", "--no-amp"]


@pytest.fixture(scope="module")
def built(demo):
    index = demo / "index"
    retrieve.main(["--build", "--images", str(demo / "images"), "--manifest",
                   str(demo / "gallery.csv"), "--index", str(index), *RETRIEVE_FAST])
    return index


def found(argv):
    """D, I of retrieve.main(argv), a --query/--query-id: a files.Result, a dict with a one-line
    repr (a notebook cell shows that line, not the arrays)."""
    res = retrieve.main(argv)
    assert isinstance(res, files.Result) and "\n" not in repr(res) and len(repr(res)) < 200
    return res["D"], res["I"]


def retrieve_error(argv):
    with pytest.raises(SystemExit) as e:
        retrieve.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("retrieve.py: error: ") and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------- html pages


class PageParser(HTMLParser):
    """html.parser over a page: elements must close in order; counts classes and tags; keeps
    the text of <script type="application/json"> blocks."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open, self.errors, self.json, self.in_json = [], [], [], False
        self.classes, self.tags = Counter(), Counter()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        self.classes.update((a.get("class") or "").split())
        self.in_json = tag == "script" and a.get("type") == "application/json"
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:]}")
        else:
            self.open.pop()
        self.in_json = False

    def handle_data(self, text):
        if self.in_json:
            self.json.append(json.loads(text))


def check_page(path):
    """Parse a page written by pages.py; it must load nothing from outside. Returns the parser."""
    text = open(path, encoding="utf-8").read()
    p = PageParser()
    p.feed(text)
    p.close()
    assert not p.errors and p.open == [], (p.errors, p.open)
    assert not re.search(r"""\bsrc\s*=\s*["']?\s*(https?:)?//""", text, re.I)  # no src="http
    assert "url(" not in text and "<link" not in text and "@import" not in text
    assert p.tags["html"] == p.tags["body"] == 1
    return p


def torchrun(script, *argv, env=None):
    """`torchrun --standalone --nproc-per-node 2 script argv` on the CPU (gloo): (exit status,
    stdout + stderr). `python -m torch.distributed.run` is torchrun under this interpreter.
    A script outside the repository (a test's wrapper) imports ours from HERE."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(script), *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": HERE, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    with subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as p:
        try:
            out = p.communicate(timeout=180)[0]
        except subprocess.TimeoutExpired:  # a hung collective: stop torchrun and its workers
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("torchrun hung:\n" + p.communicate()[0][-3000:])
    return p.returncode, out


# ------------------------------------------------------------------------------------------ vectors


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
    return metrics.neighbours_kept(I, It)


# ============================================================================
# metrics: hand-computed cases, sklearn cross-checks, random-baseline checks


# ----------------------------------------------------------------------------------- classification


# 5 classes a..e, n = 6:
#   y_true = 0 0 0 1 1 2     -> support   [3, 2, 1, 0, 0]  (d, e never true)
#   y_pred = 0 1 1 1 3 0     -> predicted [2, 3, 0, 1, 0]  (c, e never predicted)
#   hits at samples 0 and 3  -> tp        [1, 1, 0, 0, 0]
CLS_TRUE = [0, 0, 0, 1, 1, 2]


CLS_PRED = [0, 1, 1, 1, 3, 0]


CLS_NAMES = ["a", "b", "c", "d", "e"]


def test_metrics_confusion_matrix_hand():
    cm = metrics.confusion_matrix(CLS_TRUE, CLS_PRED, 5)
    expected = [
        [1, 2, 0, 0, 0],  # true a: predicted a once, b twice
        [0, 1, 0, 1, 0],  # true b: b once, d once
        [1, 0, 0, 0, 0],  # true c: predicted a
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    np.testing.assert_array_equal(cm, expected)


def test_metrics_classification_report_hand():
    rep = metrics.classification_report(CLS_TRUE, CLS_PRED, 5, names=CLS_NAMES)
    got = [(c["precision"], c["recall"], c["f1"]) for c in rep["per_class"]]
    expected = [
        (1 / 2, 1 / 3, 2 / 5),  # a: tp 1 / pred 2, tp 1 / support 3, 2*1 / (2+3)
        (1 / 3, 1 / 2, 2 / 5),  # b: 1/3, 1/2, 2*1 / (3+2)
        (None, 0.0, 0.0),  # c: never predicted; recall 0/1; f1 0 / (0+1)
        (0.0, None, 0.0),  # d: never true; precision 0/1; f1 0 / (1+0)
        (None, None, None),  # e: in neither y_true nor y_pred
    ]
    for g, e in zip(got, expected, strict=True):
        assert _metrics_close(g, e), (g, e)
    assert [c["support"] for c in rep["per_class"]] == [3, 2, 1, 0, 0]
    assert [c["predicted"] for c in rep["per_class"]] == [2, 3, 0, 1, 0]
    assert rep["accuracy"] == pytest.approx(2 / 6)
    # macro over the 4 classes in y_true or y_pred (e is in neither: left out, as sklearn
    # without labels), undefined as 0: p (1/2 + 1/3) / 4 = 5/24, r same, f1 (2/5 + 2/5) / 4
    assert rep["macro"] == pytest.approx({"precision": 5 / 24, "recall": 5 / 24, "f1": 1 / 5})
    assert rep["absent"] == ["e"]
    # weighted by support 3,2,1,0,0 over 6: p (3/2 + 2/3 + 0) / 6 = 13/36,
    # r (1 + 1 + 0) / 6 = 1/3, f1 (6/5 + 4/5 + 0) / 6 = 1/3
    assert rep["weighted"] == pytest.approx({"precision": 13 / 36, "recall": 1 / 3, "f1": 1 / 3})
    # micro: tp 2, predicted 6, support 6 -> 1/3 each
    assert rep["micro"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert rep["undefined_precision"] == ["c", "e"]
    assert rep["undefined_recall"] == ["d", "e"]
    assert rep["n"] == 6


def _metrics_close(got, expected):
    return all(
        (g is None and e is None) or (g is not None and e is not None and abs(g - e) < 1e-12)
        for g, e in zip(got, expected, strict=True)
    )


def test_metrics_classification_report_default_names():
    rep = metrics.classification_report([0, 1], [0, 0], 3)
    assert [c["name"] for c in rep["per_class"]] == ["0", "1", "2"]
    assert rep["undefined_precision"] == ["1", "2"] and rep["undefined_recall"] == ["2"]


def test_metrics_format_report_hand():
    rep = metrics.classification_report(CLS_TRUE, CLS_PRED, 5, names=CLS_NAMES)
    text = metrics.format_report(rep)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["a"] == ["0.500", "0.333", "0.400", "3"]
    assert rows["c"] == ["n/a", "0.000", "0.000", "1"]
    assert rows["d"] == ["0.000", "n/a", "0.000", "0"]
    assert rows["e"] == ["n/a", "n/a", "n/a", "0"]
    assert rows["accuracy"] == ["0.333", "6"]
    assert rows["macro"] == ["avg", "0.208", "0.208", "0.200", "6"]
    assert rows["weighted"] == ["avg", "0.361", "0.333", "0.333", "6"]  # 13/36 = 0.3611
    assert "micro" not in rows  # single-label: micro avg = accuracy, a row saying it twice
    assert "left out of macro avg (no image here, never predicted): e; it averages the 4 of 5 " \
        "classes in the truth or the predictions" in text
    assert text.splitlines()[-1] == ("n/a = undefined: precision of a class never predicted, "
                                     "recall of a class with no true samples; counted as 0 in "
                                     "macro and weighted avg (sklearn zero_division=0).")
    assert "n/a = undefined" not in metrics.format_report(rep, note=False)
    # fixed width: header, class rows and average rows all end in the same column
    table = [line for line in text.splitlines()[:-3] if line.strip()]
    assert len({len(line) for line in table}) == 1
    assert "0.50 " in metrics.format_report(rep, digits=2)


def _metrics_sklearn_case(seed, n=300, n_classes=7):
    """Labels where class 4 is never predicted, 5 never true, 6 in neither."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 2, 3, 4], size=n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.choice([0, 1, 2, 3, 5], size=n))
    y_pred[y_pred == 4] = 0
    return y_true, y_pred, n_classes


@pytest.mark.parametrize("seed", range(5))
def test_metrics_classification_matches_sklearn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    y_true, y_pred, n_classes = _metrics_sklearn_case(seed)
    labels = list(range(n_classes))
    rep = metrics.classification_report(y_true, y_pred, n_classes)
    assert rep["undefined_precision"] == ["4", "6"] and rep["undefined_recall"] == ["5", "6"]

    p, r, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for c, row in enumerate(rep["per_class"]):
        for key, ref in (("precision", p), ("recall", r), ("f1", f1)):
            assert (row[key] or 0.0) == pytest.approx(ref[c], abs=1e-12, rel=0)
        assert row["support"] == support[c]
    for avg in ("macro", "weighted", "micro"):  # macro: sklearn's labels, those seen (not 6)
        ref = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=None if avg == "macro" else labels, average=avg,
            zero_division=0
        )[:3]
        got = (rep[avg]["precision"], rep[avg]["recall"], rep[avg]["f1"])
        assert got == pytest.approx(ref, abs=1e-12, rel=0)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(y_true, y_pred, n_classes),
        skm.confusion_matrix(y_true, y_pred, labels=labels),
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.confusion_matrix([0, 3], [0, 1], 3), r"outside \[0, 3\)"),
        (lambda: metrics.confusion_matrix([0, -1], [0, 1], 3), r"outside \[0, 3\)"),
        (lambda: metrics.confusion_matrix([0, 1], [0, 1, 1], 3), "lengths differ"),
        (lambda: metrics.confusion_matrix([0.0, 1.0], [0, 1], 3), "1-D int array"),
        (lambda: metrics.confusion_matrix([[0, 1]], [[0, 1]], 3), "1-D int array"),
        (lambda: metrics.confusion_matrix([0], [0], 0), "n_classes must be a positive int"),
        (lambda: metrics.classification_report([], [], 3), "at least one sample"),
        (lambda: metrics.classification_report([0], [0], 2, names=["a"]), "1 names for 2"),
    ],
)
def test_metrics_classification_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------- classification baselines


def test_metrics_classification_baselines_hand():
    # y = 0 0 1 over K = 2, majority class 0 (from train). Calling all 0: accuracy 2/3,
    # F1_0 = 2*2 / (3 + 2) = 0.8, F1_1 = 0 -> macro 0.4, weighted (2*0.8 + 0) / 3 = 8/15.
    # Uniform: m ~ Bin(3, 1/2) rows called c, E[F1_c] = sum P(m) 2 m s / (3 (m + s)):
    # s = 2: (3/8)(4/9) + (3/8)(2/3) + (1/8)(4/5) = 31/60; s = 1: (3/8)(1/3) + (3/8)(4/9) +
    # (1/8)(1/2) = 17/48 -> macro (31/60 + 17/48) / 2 = 209/480, weighted (2 31/60 + 17/48) / 3
    b = metrics.baselines([0, 0, 1], 2, metrics.majority_class([1, 0, 0, 1, 0], 2))
    assert b["majority"] == pytest.approx({"class": 0, "accuracy": 2 / 3, "macro_f1": 0.4,
                                           "weighted_f1": 8 / 15})
    assert b["uniform"] == pytest.approx({"accuracy": 1 / 2, "macro_f1": 209 / 480,
                                          "weighted_f1": (2 * 31 / 60 + 17 / 48) / 3})
    # the majority of train, not of the evaluated split: class 1 is never right here
    assert metrics.majority_scores([0, 0, 2], 3, 1) == pytest.approx(
        {"class": 1, "accuracy": 0.0, "macro_f1": 0.0, "weighted_f1": 0.0})
    assert metrics.majority_class([2, 1, 1, 2], 3) == 1  # a tie: the lower index
    assert metrics.majority_class(np.zeros(0, np.int64), 3) is None
    assert metrics.baselines([0, 1], 2, None)["majority"] is None  # no train label
    assert metrics.uniform_scores([0, 0], 1) == {"accuracy": 1.0, "macro_f1": 1.0,
                                                 "weighted_f1": 1.0}


@pytest.mark.parametrize("y,k", [([0, 0, 1, 2, 2, 2], 4), ([1, 1, 1], 3), ([0, 1, 2, 3, 0], 5)])
def test_metrics_uniform_baseline_exact_by_enumeration(y, k):
    # every one of the k^n ways of calling the n rows is equally likely
    reps = [metrics.classification_report(y, np.array(p), k)
            for p in itertools.product(range(k), repeat=len(y))]
    u = metrics.uniform_scores(y, k)
    assert u["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in reps]), abs=1e-12)
    there = [c for c in range(k) if c in y]  # uniform's macro: the classes in y_true
    assert u["macro_f1"] == pytest.approx(np.mean([np.mean([r["per_class"][c]["f1"] or 0.0
                                                            for c in there]) for r in reps]),
                                          abs=1e-12)
    assert u["weighted_f1"] == pytest.approx(np.mean([r["weighted"]["f1"] for r in reps]),
                                             abs=1e-12)


def test_metrics_uniform_baseline_large_split():
    # 25k rows over 20 classes: no overflow in the binomial, and about 1/K everywhere
    y = np.random.default_rng(0).integers(0, 20, 25_000)
    u = metrics.uniform_scores(y, 20)
    assert u["accuracy"] == 0.05 and u["macro_f1"] == pytest.approx(0.05, abs=1e-3)


# -------------------------------------------------------------------------------------------- top-k


def test_metrics_topk_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.2], [0.2, 0.1, 0.7]])
    y_true = [1, 1, 1]
    # true class 1 ranks: row 0 first; row 1 second (tie with class 0, lower index first);
    # row 2 third
    assert metrics.topk_accuracy(y_true, scores, 1) == pytest.approx(1 / 3)
    assert metrics.topk_accuracy(y_true, scores, 2) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(y_true, scores, 3) == 1.0
    assert metrics.topk_accuracy(y_true, scores, 10) == 1.0  # clamped to 3 classes


def test_metrics_topk_matches_brute_force():
    rng = np.random.default_rng(1)
    n, n_classes = 300, 6
    scores = rng.integers(0, 4, size=(n, n_classes)).astype(float)  # many ties
    y_true = rng.integers(0, n_classes, size=n)
    for k in range(1, n_classes + 2):
        hits = 0
        for s, t in zip(scores, y_true, strict=True):
            ranked = sorted(range(n_classes), key=lambda c, s=s: -s[c])  # stable: low index first
            hits += t in ranked[:k]
        assert metrics.topk_accuracy(y_true, scores, k) == pytest.approx(hits / n)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.topk_accuracy([0, 1], np.zeros((3, 4)), 1), "matching scores"),
        (lambda: metrics.topk_accuracy([0, 4], np.zeros((2, 4)), 1), r"outside \[0, 4\)"),
        (lambda: metrics.topk_accuracy([0], np.zeros(4), 1), "scores must be"),  # 1-D
        (lambda: metrics.topk_accuracy([0], np.zeros((1, 4), int), 1), "scores must be"),
        (lambda: metrics.topk_accuracy([0], np.full((1, 4), np.nan), 1), "scores must be"),
        (lambda: metrics.topk_accuracy([0], np.zeros((1, 4)), 0), "k must be a positive"),
    ],
)
def test_metrics_topk_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------- retrieval


def test_metrics_retrieval_hand():
    I = np.array([[5, 7, 9], [3, 1, -1], [2, -1, -1], [8, 8, 4]])
    gt = np.array([9, 3, 6, 8])
    # query 0: id 9 at rank 3 -> rr 1/3; query 1: rank 1 -> 1;
    # query 2: absent (only -1 after rank 1) -> 0; query 3: rank 1 (first of a duplicate) -> 1
    out = metrics.retrieval_metrics(I, gt, ks=(1, 2, 3))
    assert list(out) == ["top1", "recall@2", "recall@3", "mrr"]
    assert out["top1"] == pytest.approx(2 / 4)  # queries 1, 3
    assert out["recall@2"] == pytest.approx(2 / 4)  # query 0 needs rank 3
    assert out["recall@3"] == pytest.approx(3 / 4)  # all but query 2
    assert out["mrr"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)  # = 7/12


def test_metrics_retrieval_default_keys_and_missing():
    I = np.array([[-1, -1, -1, -1, -1], [4, 3, 2, 1, 0]])
    out = metrics.retrieval_metrics(I, np.array([0, 0]))  # ks=(1, 5)
    # query 0 returned nothing; query 1 finds id 0 at rank 5 -> rr 1/5
    assert out == pytest.approx({"top1": 0.0, "recall@5": 0.5, "mrr": (0 + 1 / 5) / 2})


I_ZEROS = np.zeros((2, 3), int)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.retrieval_metrics(I_ZEROS, np.array([1, -1]), ks=(1,)), "gt must be"),
        (lambda: metrics.retrieval_metrics(I_ZEROS, np.array([1, 2, 3]), ks=(1,)), "gt must be"),
        (lambda: metrics.retrieval_metrics(I_ZEROS, np.array([1, 2]), ks=(1, 5)), "k=5 exceeds"),
        (lambda: metrics.retrieval_metrics(I_ZEROS * 1.0, np.array([1, 2])), "I must be"),
        (lambda: metrics.retrieval_metrics(I_ZEROS[0], np.array([1])), "I must be"),
    ],
)
def test_metrics_retrieval_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_metrics_average_precision_hand():
    rel = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    # hits at ranks 1, 3, 6: precision 1/1, 2/3, 3/6, sum 13/6
    assert metrics.average_precision(rel) == pytest.approx(13 / 6 / 3)  # = 13/18
    assert metrics.average_precision(rel, n_relevant=4) == pytest.approx(13 / 6 / 4)  # one missed
    assert metrics.average_precision(np.zeros(4, bool)) == 0.0
    assert metrics.average_precision(np.zeros(4, bool), n_relevant=2) == 0.0
    assert metrics.average_precision(np.array([0, 1], bool)) == pytest.approx(1 / 2)


RANKED = np.array(
    [
        [1, 0, 1, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
    ],
    dtype=bool,
)


def test_metrics_map_at_k_hand():
    # k=3: query 0: (P@1 + P@3) / min(2, 3) = (1 + 2/3) / 2 = 5/6
    #      query 1: P@2 / min(5, 3) = (1/2) / 3 = 1/6; query 2: n_relevant 0, excluded
    assert metrics.map_at_k(RANKED, [2, 5, 0], 3) == pytest.approx((5 / 6 + 1 / 6) / 2)
    # same, but query 2 has one relevant item it never found: AP 0 joins the mean
    assert metrics.map_at_k(RANKED, [2, 5, 1], 3) == pytest.approx((5 / 6 + 1 / 6 + 0) / 3)
    # k=2: query 0: 1 / min(2, 2) = 1/2; query 1: (1/2) / min(5, 2) = 1/4
    assert metrics.map_at_k(RANKED, [2, 5, 0], 2) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert metrics.map_at_k(RANKED[2:], 0, 4) == 0.0  # no query with a relevant item


def test_metrics_map_at_k_equals_ap_when_k_covers_all():
    rng = np.random.default_rng(2)
    rel = rng.random((50, 12)) < 0.3
    n_rel = rel.sum(1) + rng.integers(0, 3, 50)  # some relevant items never retrieved
    n_rel = np.minimum(n_rel, 12)  # so min(n_rel, k) == n_rel
    keep = n_rel > 0
    aps = [metrics.average_precision(r, n) for r, n in zip(rel[keep], n_rel[keep], strict=True)]
    assert metrics.map_at_k(rel, n_rel, 12) == pytest.approx(np.mean(aps), abs=1e-12)


def test_metrics_neighbours_kept_hand():
    a = np.array([[1, 2, 3], [0, 2, 3], [4, 1, 0]])
    b = np.array([[3, 2, 1], [2, 4, 5], [-1, -1, 0]])
    # row 0: all 3 kept (order ignored); row 1: 1 of 3; row 2: only 0 (-1 never matches)
    assert metrics.neighbours_kept(a, b) == pytest.approx((3 + 1 + 1) / 9)
    assert metrics.neighbours_kept(a, a) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        metrics.neighbours_kept(a, b[:, :2])


def test_metrics_precision_at_k_hand():
    assert metrics.precision_at_k(RANKED, 1) == pytest.approx((1 + 0 + 0) / 3)
    assert metrics.precision_at_k(RANKED, 3) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert metrics.precision_at_k(RANKED, 4) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.average_precision(np.array([1, 0, 1])), "1-D bool"),  # int, not bool
        (lambda: metrics.average_precision(RANKED), "1-D bool"),
        (lambda: metrics.average_precision(np.ones(2, bool), n_relevant=1), "below the 2 hits"),
        (lambda: metrics.map_at_k(RANKED, [2, 5, 0], 5), "k=5 exceeds"),  # RANKED has 4 columns
        (lambda: metrics.map_at_k(RANKED, [2, 5], 3), "n_relevant must be"),  # 3 queries
        (lambda: metrics.map_at_k(RANKED, [1, 5, 0], 3), "more hits"),  # query 0 has 2 hits
        (lambda: metrics.map_at_k(RANKED[0], 2, 3), "2-D bool"),
        (lambda: metrics.map_at_k(np.zeros((0, 4), bool), 1, 1), "2-D bool"),  # no queries
        (lambda: metrics.precision_at_k(RANKED, 0), "k must be a positive int"),
        (lambda: metrics.precision_at_k(RANKED.astype(int), 1), "2-D bool"),
        (lambda: metrics.precision_at_k(np.zeros((0, 4), bool), 1), "2-D bool"),
        (lambda: metrics.random_map_at_k(5, 4, 2), "n_relevant <= n_candidates"),
        (lambda: metrics.random_map_at_k(1, 4, 5), "k=5 exceeds"),
        (lambda: metrics.random_precision_at_k([1, 2], [4, 4, 4], 2), "n_relevant must be"),
        (lambda: metrics.random_precision_at_k(-1, 4, 2), "n_relevant must be"),
    ],
)
def test_metrics_ranking_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------- random baselines


def test_metrics_random_baselines_hand():
    # 1 relevant of 2: rank 1 (AP 1) or rank 2 (AP 1/2), each with probability 1/2 -> 3/4
    assert metrics.random_map_at_k(1, 2, 2) == pytest.approx(3 / 4)
    # 2 relevant of 4, k=2, the 6 equally likely placements:
    # {1,2}: 1; {1,3},{1,4}: 1/2 each; {2,3},{2,4}: (1/2)/2 each; {3,4}: 0 -> 2.5/6 = 5/12
    assert metrics.random_map_at_k(2, 4, 2) == pytest.approx(5 / 12)
    assert metrics.random_map_at_k([1, 0], [2, 2], 2) == pytest.approx(3 / 4)  # 0 excluded
    assert metrics.random_precision_at_k([2, 5], [10, 20], 3) == pytest.approx((0.2 + 0.25) / 2)


@pytest.mark.parametrize("n_rel,n_cand,k", [(3, 6, 4), (1, 5, 3), (4, 7, 2), (5, 5, 5)])
def test_metrics_random_map_exact_by_enumeration(n_rel, n_cand, k):
    # every placement of n_rel relevant items among n_cand ranks is equally likely
    rows = []
    for pos in itertools.combinations(range(n_cand), n_rel):
        row = np.zeros(n_cand, bool)
        row[list(pos)] = True
        rows.append(row)
    exact = metrics.map_at_k(np.array(rows), n_rel, k)
    assert metrics.random_map_at_k(n_rel, n_cand, k) == pytest.approx(exact, abs=1e-12)


def test_metrics_random_baselines_monte_carlo():
    rng = np.random.default_rng(0)
    nq, n_cand, k = 40_000, 30, 10
    n_rel = rng.integers(0, 8, size=nq)
    ranks = rng.permuted(np.tile(np.arange(n_cand), (nq, 1)), axis=1)
    rel = ranks < n_rel[:, None]  # item at each rank is relevant if its id < n_rel
    # AP@10 per query has std <= 0.5, so the standard error of the mean over ~35k queries
    # is below 0.003; precision@10 is tighter still. Tolerance 0.01 is > 3 standard errors.
    assert metrics.map_at_k(rel, n_rel, k) == pytest.approx(
        metrics.random_map_at_k(n_rel, n_cand, k), abs=0.01
    )
    assert metrics.precision_at_k(rel, k) == pytest.approx(
        metrics.random_precision_at_k(n_rel, n_cand, k), abs=0.01
    )


# ============================================================================
# data: the real list formats, NGA CSVs, downloads, the resize cache, demo data; with the rooms
# data.py builds on (files.py, fetch.py, wikiart.py, painter.py, poses.py), each subsection named
# by its room


# ----------------------------------------------------------------------------- wikiart (wikiart.py)


def test_data_wikiart_real_list_formats(tmp_path, capsys):
    write_lists(tmp_path / "lists")
    out = tmp_path / "out"
    assert data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
                      "--per-class", "12", "--min-per-class", "5", "--seed", "3",
                      "--split", "random"]) == 0
    log = capsys.readouterr().out
    rows = files.read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "style", "artist", "genre", "split"]
    counts = {}
    for r in rows:
        counts[r["style"]] = counts.get(r["style"], 0) + 1
    assert counts == {"Art_Nouveau": 12, "Baroque": 12, "Cubism": 12}  # Tiny (2) dropped
    assert "dropped class Tiny" in log
    assert "conflicting labels" in log
    assert "2 paths outside the image root skipped" in log
    assert not any(".." in r["path"] or r["path"].startswith("/") for r in rows)
    assert all(r["split"] in ("train", "val") for r in rows)
    for c in counts:  # stratified: every class has val images, ~20%
        n_val = sum(1 for r in rows if r["style"] == c and r["split"] == "val")
        assert 1 <= n_val <= 4
    classes = json.loads((out / "classes.json").read_text())
    assert classes["style"] == ["Art_Nouveau", "Baroque", "Cubism"]


def test_data_wikiart_small_classes_dropped_or_kept_by_name(tmp_path, capsys):
    """Tiny has 2 images, under the floor of 5: left out by default, named; kept when
    --min-per-class asks for it, named in a warning."""
    write_lists(tmp_path / "lists")
    base = ["wikiart", "--lists", str(tmp_path / "lists"), "--per-class", "0", "--split", "random"]
    data.main([*base, "--out", str(tmp_path / "a")])
    log = capsys.readouterr().out
    # its 2 images: 1 to val (--val-frac 0.1, at least 1), 1 left to train
    assert "dropped class Tiny: 1 usable train images < --min-per-class 5 (too few to" in log
    assert "Tiny" not in {r["style"] for r in files.read_csv(tmp_path / "a" / "manifest.csv")}
    data.main([*base, "--out", str(tmp_path / "b"), "--min-per-class", "2"])
    log = capsys.readouterr().out
    assert "Tiny" in log  # 2 images, 1 to train: dropped below 2 as well
    data.main([*base, "--out", str(tmp_path / "b"), "--min-per-class", "1"])
    log = capsys.readouterr().out
    assert "warning: 1 class kept with fewer than 5 usable train images" in log and \
        "Tiny (1)" in log
    assert "Tiny" in {r["style"] for r in files.read_csv(tmp_path / "b" / "manifest.csv")}


def test_data_wikiart_labels_bytes_and_conflicts(tmp_path):
    write_lists(tmp_path / "lists")
    out = tmp_path / "out"
    data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
               "--per-class", "0", "--min-per-class", "1"])
    rows = {r["path"]: r for r in files.read_csv(out / "manifest.csv")}
    assert MOJI in rows  # soft hyphen, no-break space and mojibake kept byte for byte
    assert rows[MOJI]["artist"] == "Eugene_Grasset" and rows[MOJI]["genre"] == "landscape"
    assert rows["Baroque/artist-1_work-1(1).jpg"]["genre"] == "religious_painting"
    assert rows["Cubism/artist-2_work-3(1).jpg"]["genre"] == ""  # listed as 1 and 4: dropped
    assert rows["Baroque/artist-1_work-5(1).jpg"]["artist"] == "Rembrandt"
    assert rows["Baroque/artist-1_work-3(1).jpg"]["artist"] == ""
    assert len(rows) == 63  # one split column: a path cannot be in both splits


def test_data_wikiart_deterministic_for_seed(tmp_path):
    write_lists(tmp_path / "lists")
    outs = []
    for i, seed in enumerate([1, 1, 2]):
        out = tmp_path / f"o{i}"
        data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
                   "--per-class", "10", "--seed", str(seed)])
        outs.append((out / "manifest.csv").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_data_wikiart_images_filter(tmp_path, capsys):
    items = write_lists(tmp_path / "lists")
    root = tmp_path / "img"
    for p, _ in items:
        if "work-7" in p:
            continue  # missing on disk
        os.makedirs(os.path.dirname(root / p), exist_ok=True)
        body = jpeg_bytes()
        (root / p).write_bytes(body[: len(body) // 3] if "work-9" in p else body)
    out = tmp_path / "out"
    data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(out),
               "--per-class", "0", "--images", str(root)])
    rows = files.read_csv(out / "manifest.csv")
    assert not any("work-7" in r["path"] or "work-9" in r["path"] for r in rows)
    bad = files.read_csv(out / "unusable.csv")
    assert sorted({b["reason"] for b in bad}) == ["corrupt", "missing"]
    assert len(bad) == 6
    assert "3 missing and 3 corrupt" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["--lists", "NOPE"], "list folder not found"),
    (["--tasks", "style,colour"], "unknown task 'colour'"),
    (["--min-per-class", "1000"], "nothing left after filtering"),
])
def test_data_wikiart_bad_input(tmp_path, argv, msg):
    write_lists(tmp_path / "lists")
    base = ["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=msg) as e:
        data.main(base + argv)
    assert "\n" not in str(e.value)


def test_data_wikiart_missing_list_file(tmp_path):
    write_lists(tmp_path / "lists")
    os.remove(tmp_path / "lists" / "artist_val")
    with pytest.raises(SystemExit, match="no artist val list"):
        data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------------- nga


def test_data_nga_one_primary_image_per_painting(tmp_path):
    write_nga(tmp_path)
    data.main(["nga", "--objects", str(tmp_path / "objects.csv"), "--published-images",
               str(tmp_path / "published_images.csv"), "--out", str(tmp_path / "o")])
    rows = files.read_csv(tmp_path / "o" / "manifest.csv")
    assert [r["objectid"] for r in rows] == ["101", "102", "105"]
    assert rows[0]["url"] == "https://api.nga.gov/iiif/p0/full/!512,512/0/default.jpg"
    assert rows[0]["attribution"] == "Judith Leyster" and rows[0]["path"] == "101.jpg"
    assert rows[1]["title"] == 'The Boating Party, with "quotes"'
    for col in ("path", "objectid", "title", "attribution", "displaydate", "url"):
        assert col in rows[0]


def test_data_nga_filters(tmp_path):
    write_nga(tmp_path)
    base = ["nga", "--objects", str(tmp_path / "objects.csv"), "--published-images",
            str(tmp_path / "published_images.csv"), "--out", str(tmp_path / "o")]
    data.main(base + ["--open-access", "--title-contains", "portrait", "--size", "256"])
    rows = files.read_csv(tmp_path / "o" / "manifest.csv")
    assert [r["objectid"] for r in rows] == ["101"]  # 105 is not open access
    assert rows[0]["url"].endswith("/full/!256,256/0/default.jpg")
    data.main(base + ["--limit", "1"])
    assert len(files.read_csv(tmp_path / "o" / "manifest.csv")) == 1
    no_column = IMAGES.replace(",openaccess,", ",access,")
    (tmp_path / "old_export.csv").write_text(no_column)  # and objects.csv has none
    # an old export beside a current one: its rows say nothing of access, so they stay out
    both = [str(tmp_path / "published_images.csv"), str(tmp_path / "old_export.csv")]
    data.main([*base[:3], "--published-images", *both, *base[5:], "--open-access",
               "--title-contains", "portrait"])
    assert [r["objectid"] for r in files.read_csv(tmp_path / "o" / "manifest.csv")] == ["101"]
    (tmp_path / "published_images.csv").write_text(no_column)
    with pytest.raises(SystemExit, match="--open-access: neither the objects CSV"):
        data.main(base + ["--open-access"])


def test_data_nga_missing_column(tmp_path):
    write_nga(tmp_path)
    (tmp_path / "bad.csv").write_text("uuid,url,objectid\nx,y,101\n")
    with pytest.raises(SystemExit, match="no column iiifurl, depictstmsobjectid"):
        data.main(["nga", "--objects", str(tmp_path / "objects.csv"), "--published-images",
                   str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------ download (fetch.py)


def test_data_download_retries_failures_and_resume(tmp_path, server, capsys):
    names = [f"ok{i}" for i in range(6)] + ["flaky", "slow", "trunc", "missing"]
    rows = [[f"sub/{n}.jpg", f"{server.url}/{n}.jpg"] for n in names]
    files.write_csv(tmp_path / "m.csv", ["path", "url"], rows)
    root = tmp_path / "img"
    os.makedirs(root / "sub")
    (root / "sub" / "ok0.jpg").write_bytes(jpeg_bytes()[:100])  # a partial file from a crash
    argv = ["download", "--manifest", str(tmp_path / "m.csv"), "--root", str(root),
            "--workers", "2", "--backoff", "0.01", "--retries", "2", "--size", "0"]
    with pytest.raises(SystemExit) as e:  # two failed: exit status 1, listed in the CSV
        data.main(argv)
    assert e.value.code == 1
    for n in names[:8]:
        assert files.image_problem(root / "sub" / f"{n}.jpg") is None, n
    assert not (root / "sub" / "trunc.jpg").exists() and not (root / "sub" / "missing.jpg").exists()
    assert not [f for f in os.listdir(root / "sub") if f.endswith(".part")]
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/missing.jpg"] == 1
    assert server.hits["/trunc.jpg"] == 3  # retried: a bad body may be a transfer glitch
    t = server.times["/slow.jpg"]
    assert t[1] - t[0] >= 0.95  # Retry-After: 1 honoured
    assert server.max_inflight <= 2
    assert all(a and a.startswith("ArtExtract/") for a in server.agents)
    fails = files.read_csv(root / "download_failures.csv")
    assert sorted(f["path"] for f in fails) == ["sub/missing.jpg", "sub/trunc.jpg"]
    capsys.readouterr()
    before = dict(server.hits)
    with pytest.raises(SystemExit):  # resumed: finished files are not fetched again
        data.main(argv)
    assert server.hits["/ok1.jpg"] == before["/ok1.jpg"]
    assert server.hits["/flaky.jpg"] == before["/flaky.jpg"]
    assert server.hits["/missing.jpg"] == before["/missing.jpg"] + 1
    assert "8 already here, 2 to fetch" in capsys.readouterr().out


def test_data_download_ctrl_c_keeps_finished_files(tmp_path, server):
    rows = [[f"{i}.jpg", f"{server.url}/lag{i}.jpg"] for i in range(12)]
    files.write_csv(tmp_path / "m.csv", ["path", "url"], rows)
    root = tmp_path / "img"
    cmd = [sys.executable, os.path.join(HERE, "data.py"), "download", "--manifest",
           str(tmp_path / "m.csv"), "--root", str(root), "--workers", "2", "--size", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and (not root.exists() or len(
            [f for f in os.listdir(root) if f.endswith(".jpg")]) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 130, out
    assert "run the same command to continue" in out
    done = sorted(os.listdir(root))
    assert 3 <= len(done) < 12 and not [f for f in done if f.endswith(".part")]
    assert all(files.image_problem(root / f) is None for f in done)
    before = dict(server.hits)
    assert subprocess.run(cmd, capture_output=True).returncode == 0  # continues
    assert len(os.listdir(root)) == 12
    assert all(server.hits[f"/lag{f[:-4]}.jpg"] == before[f"/lag{f[:-4]}.jpg"] for f in done)


def test_data_download_http_only_and_size_cap(tmp_path, server, capsys):
    """Refused URLs (not http) are failures but never jobs: the count of what was downloaded
    leaves them out (it said 'downloaded 0' with ok.jpg written)."""
    rows = [["ftp.jpg", f"{server.url}/to-ftp.jpg"], ["huge.jpg", f"{server.url}/huge.jpg"],
            ["local.jpg", (tmp_path / "m.csv").as_uri()], ["ok.jpg", f"{server.url}/ok.jpg"],
            ["js.jpg", "javascript:alert(1)"], ["ftp2.jpg", "ftp://127.0.0.1/x.jpg"]]
    files.write_csv(tmp_path / "m.csv", ["path", "url"], rows)
    with pytest.raises(SystemExit):
        data.main(["download", "--manifest", str(tmp_path / "m.csv"), "--root",
                   str(tmp_path / "img"), "--size", "0", "--max-bytes", "100000"])
    fails = {r["path"]: r["error"]
             for r in files.read_csv(tmp_path / "img" / "download_failures.csv")}
    assert sorted(fails) == ["ftp.jpg", "ftp2.jpg", "huge.jpg", "js.jpg", "local.jpg"]
    assert "downloaded 1, failed 5 (listed in " in capsys.readouterr().out
    assert "redirect to ftp://" in fails["ftp.jpg"] and "over --max-bytes" in fails["huge.jpg"]
    assert "not an http(s) URL" in fails["local.jpg"]
    assert server.hits["/huge.jpg"] == 1 and "/local.jpg" not in server.hits  # never retried
    assert sorted(os.listdir(tmp_path / "img")) == ["download_failures.csv", "ok.jpg"]


def test_data_download_offline_stops_early(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [[f"{i}.jpg", f"http://127.0.0.1:{port}/{i}.jpg"] for i in range(30)]
    files.write_csv(tmp_path / "m.csv", ["path", "url"], rows)
    t0 = time.time()
    with pytest.raises(SystemExit, match="no server answered the first 3 requests") as e:
        data.main(["download", "--manifest", str(tmp_path / "m.csv"), "--root",
                   str(tmp_path / "img"), "--size", "0", "--workers", "2"])
    assert time.time() - t0 < 10 and "\n" not in str(e.value)  # 5 retries each: minutes


def test_data_download_rejects_escaping_paths(tmp_path):
    files.write_csv(tmp_path / "m.csv", ["path", "url"], [["../evil.jpg", "http://127.0.0.1:9/x"]])
    with pytest.raises(SystemExit, match="escapes the image root"):
        data.main(["download", "--manifest", str(tmp_path / "m.csv"), "--root", str(tmp_path)])


def test_data_download_empty_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,url\n")
    with pytest.raises(SystemExit, match="manifest is empty"):
        data.main(["download", "--manifest", str(tmp_path / "m.csv"), "--root", str(tmp_path)])


def test_data_undecodable_path_bytes_print_on_a_strict_stdout():
    """Mojibake paths keep their bytes as surrogates; a strict UTF-8 stdout must not kill the
    run that prints them."""
    code = "import files; files.tolerant_stdout(); print('Baroque/mir\\udce3-vell.jpg')"
    child = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                           env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert child.returncode == 0 and b"mir\\udce3-vell" in child.stdout, child.stderr[-300:]


def test_data_retry_after_and_iiif_size():
    assert fetch.retry_after("7") == 7.0
    assert fetch.retry_after(None) is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= fetch.retry_after(later) <= 31
    url = "https://api.nga.gov/iiif/x/full/!512,512/0/default.jpg"
    assert data.resize_iiif(url, 256) == "https://api.nga.gov/iiif/x/full/!256,256/0/default.jpg"


# ----------------------------------------------------------- resize and loading (files.py, data.py)


def test_data_resize_odd_images(tmp_path, capsys):
    src, cache = tmp_path / "src", tmp_path / "cache"
    write_odd_images(src)
    names = ["cmyk.jpg", "gray16.png", "palette.png", "rotated.jpg", "trunc.jpg", "gray.jpg"]
    files.write_csv(tmp_path / "m.csv", ["path"], [[n] for n in names])
    argv = ["resize", "--manifest", str(tmp_path / "m.csv"), "--root", str(src),
            "--out", str(cache), "--size", "64", "--workers", "2"]
    assert data.main(argv) == 0
    ims = {n: Image.open(cache / n) for n in names if n != "trunc.jpg"}
    assert all(im.mode == "RGB" and min(im.size) == 64 for im in ims.values())
    r, g, b = ims["cmyk.jpg"].getpixel((32, 32))
    assert r > 200 and g < 60 and b < 60
    assert abs(ims["gray16.png"].getpixel((10, 10))[0] - 128) <= 2  # scaled, not clipped to 255
    assert ims["palette.png"].getpixel((2, 2)) == (255, 255, 255)  # transparent -> white
    assert ims["palette.png"].getpixel((32, 32)) == (255, 0, 0)
    assert ims["rotated.jpg"].size == (64, 128)  # EXIF orientation applied
    assert ims["gray.jpg"].size == (64, 128)
    assert not (cache / "trunc.jpg").exists()
    assert [r["path"] for r in files.read_csv(cache / "unreadable.csv")] == ["trunc.jpg"]
    capsys.readouterr()
    mtimes = {n: os.path.getmtime(cache / n) for n in ims}
    data.main(argv)  # second run: nothing to do but the unreadable one
    assert "5 already cached, 1 to resize" in capsys.readouterr().out
    assert mtimes == {n: os.path.getmtime(cache / n) for n in ims}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_data_decompression_bombs_bounded(tmp_path):
    """A 20000^2 PNG (PIL refuses it at open) and a 12000^2 one (144 MP: under PIL's own limit,
    over ours) are refused from their headers; a child process measures the memory it took."""
    png_bomb(tmp_path / "huge.png", 20000, 20000)
    png_bomb(tmp_path / "big.png", 12000, 12000)
    for name in ("huge.png", "big.png"):
        with pytest.raises(files.DECODE_ERRORS):
            files.load_image(tmp_path / name, 224)
        assert files.image_problem(tmp_path / name).startswith("too large to decode")
    code = ("import files, re\n"  # VmHWM: ru_maxrss would start from this process's peak
            f"for p in {[str(tmp_path / 'huge.png'), str(tmp_path / 'big.png')]!r}:\n"
            "    try:\n        files.load_image(p, 224)\n    except files.DECODE_ERRORS:\n"
            "        pass\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])")
    child = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert int(child.stdout.split()[-1]) < 200 << 10  # kB; decoding big.png alone takes 432 MB
    assert "DecompressionBombWarning" not in child.stderr  # PIL's raw warning beside our line


def test_data_load_image_draft_decodes_smaller(tmp_path):
    Image.new("RGB", (2000, 1500), (10, 20, 30)).save(tmp_path / "big.jpg", quality=90)
    full = files.load_image(tmp_path / "big.jpg")
    small = files.load_image(tmp_path / "big.jpg", 224)
    assert full.size == (2000, 1500)
    assert small.size == (500, 375)  # DCT scaling 1/4, shorter side still >= 224


def test_data_image_dataset_skips_unreadable(tmp_path, monkeypatch):
    write_odd_images(tmp_path)
    ds = files.ImageDataset(["cmyk.jpg", "trunc.jpg"], tmp_path, size=32)
    assert ds[0][0].mode == "RGB" and ds[0][1] == 0
    assert ds[1][0] is None and ds[1][1] == 1 and ds[1][2].startswith("cannot decode")
    x, idx, failed = files.collate_skip([(np.zeros(2), 0), ds[1], (np.ones(2), 2)])
    assert idx.tolist() == [0, 2] and x.shape == (2, 2) and failed == [(1, ds[1][2])]
    assert files.collate_skip([ds[1]]) == (None, None, [(1, ds[1][2])])
    (tmp_path / "empty.jpg").write_bytes(b"")  # no one decodes it, root included
    assert files.ImageDataset(["empty.jpg"], tmp_path)[0][2].startswith("cannot decode")
    assert files.ImageDataset(["nope.jpg"], tmp_path)[0][2] == "missing"

    def denied(*a, **kw):  # a mode bit stops no root (CI runs as root): the error itself
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "gray.jpg"))
    monkeypatch.setattr(files, "load_image", denied)
    assert files.ImageDataset(["gray.jpg"], tmp_path)[0][2] == "permission denied"
    monkeypatch.undo()
    with pytest.raises(files.UserError, match="escapes"):
        files.ImageDataset(["../x.jpg"], tmp_path)


# ---------------------------------------------------------------------------- full disks (files.py)


def test_files_replaced_gives_the_old_file_or_the_new(tmp_path):
    """files.replaced, under every safe write: an error inside the block leaves the old file
    and no temp; the end of the block puts the new one in place; a folder there is refused."""
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(KeyError), files.replaced(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with files.replaced(path, durable=True) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not os.path.samefile(tmp, path)
        with open(tmp, "w") as f:
            f.write("new")
        assert path.read_text() == "old"  # readers see the old file until the end
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]
    assert oct(path.stat().st_mode & 0o777) == oct(files.file_mode())  # not mkstemp's 0600
    (tmp_path / "d").mkdir()
    with pytest.raises(files.UserError, match="not a regular file"), \
            files.replaced(tmp_path / "d"):
        pass


def test_data_memmaps_are_reserved_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """files.open_memmap allocates its file's data before anything is written through the map
    (a sparse file's page written through a map onto a full disk is a SIGBUS: no message, no
    cleanup): posix_fallocate, else zeros written. ENOSPC there is an OSError naming the file,
    which is gone; a write that fails in atomic_write names its target too."""
    calls = []
    real = getattr(os, "posix_fallocate", None)
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: calls.append(a[1:]) or (
        real(*a) if real else None), raising=False)
    a = files.open_memmap(tmp_path / "a.npy", np.float32, (300, 256))
    assert calls == [(a.offset, 300 * 256 * 4)]  # the whole data part, header excluded
    del a
    monkeypatch.delattr(os, "posix_fallocate")  # macOS, Windows: zeros written instead
    wrote, real_write = [], os.write
    monkeypatch.setattr(os, "write", lambda fd, b: wrote.append(len(b)) or real_write(fd, b))
    b = files.open_memmap(tmp_path / "b.npy", np.float16, (300, 256))
    monkeypatch.setattr(os, "write", real_write)
    assert sum(wrote) == 300 * 256 * 2 and b.shape == (300, 256) and not b.any()
    del b
    assert np.load(tmp_path / "b.npy").shape == (300, 256)  # the header was left alone
    monkeypatch.setattr(os, "posix_fallocate", enospc, raising=False)
    with pytest.raises(OSError) as e:
        files.open_memmap(tmp_path / "c.npy", np.float32, (300, 256))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "c.npy")
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "b.npy"]
    assert files.os_error_line(e.value) == (f"no space left on {files.mount_point(tmp_path)} "
                                           f"while writing {tmp_path / 'c.npy'}")
    if os.path.exists("/dev/full"):  # a real ENOSPC from the kernel, on every write
        monkeypatch.setattr(files, "open", lambda f, mode="r", **kw: builtins.open(
            "/dev/full" if "w" in mode else f, mode, **kw), raising=False)  # writes: a full disk
        with pytest.raises(OSError) as e:
            files.atomic_write(tmp_path / "d.txt", "x" * 10000)
        assert files.disk_full(e.value) and e.value.filename == str(tmp_path / "d.txt")


def test_data_resize_and_download_stop_on_a_full_disk(tmp_path, server, monkeypatch):
    """A full disk is not an unreadable image (resize) nor a transient failure to retry five
    times per file (download): one line, exit 1, no .part file left."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(jpeg_bytes())
    files.write_csv(tmp_path / "m.csv", ["path", "url"],
                   [[f"{i}.jpg", f"{server.url}/ok{i}.jpg"] for i in range(4)])
    real_save = Image.Image.save

    def save(im, fp, *a, **kw):  # the encoder writes, then the disk is full
        real_save(im, fp, *a, **kw)
        enospc()
    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(SystemExit) as e:
        data.main(["resize", "--manifest", str(tmp_path / "m.csv"), "--root", str(src),
                   "--out", str(tmp_path / "cache"), "--size", "16", "--workers", "1"])
    assert str(e.value.code).startswith("data.py: error: no space left on ")
    assert re.search(r"while writing .*cache/\d\.jpg$", str(e.value.code)), e.value.code
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".part")]
    monkeypatch.setattr(Image.Image, "save", real_save)  # the test server draws JPEGs
    monkeypatch.setattr(fetch, "stream", enospc)
    with pytest.raises(SystemExit) as e:
        data.main(["download", "--manifest", str(tmp_path / "m.csv"), "--root",
                   str(tmp_path / "img"), "--size", "0", "--workers", "1", "--retries", "3",
                   "--backoff", "0.5"])
    assert re.fullmatch(r"data\.py: error: no space left on \S+ while writing \S+/img/\d\.jpg",
                        str(e.value.code)), e.value.code
    assert sum(server.hits.values()) <= 2  # not retried, and the other files not tried
    assert not [f for f in os.listdir(tmp_path / "img") if f.endswith(".part")]


# -------------------------------------------------------------------------- zip archives (files.py)


def test_data_zip_bad_crc_listed_and_same_subset_as_folder(tmp_path, capsys):
    items = write_lists(tmp_path / "lists")
    bodies = {p: noise_jpeg(k) for k, (p, _) in enumerate(items)}
    victim = items[5][0]
    zpath = write_zip(tmp_path / "w.zip", bodies, "wikiart/", corrupt=victim)
    flipped = bytearray(bodies[victim])
    flipped[len(flipped) // 2] ^= 0x10  # what write_zip did to the stored bytes:
    assert files.load_image(io.BytesIO(bytes(flipped))).size == (48, 32)  # decoding cannot tell
    root = tmp_path / "img"  # the same images as a folder, the victim missing
    for p, body in bodies.items():
        if p != victim:
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            (root / p).write_bytes(body)
    base = ["wikiart", "--lists", str(tmp_path / "lists"), "--per-class", "0", "--min-per-class",
            "1"]  # Tiny (2 images) too
    capsys.readouterr()
    data.main([*base, "--out", str(tmp_path / "z"), "--images", str(zpath)])
    assert "skipped 1 bad CRC images" in capsys.readouterr().out
    data.main([*base, "--out", str(tmp_path / "f"), "--images", str(root)])
    assert (tmp_path / "z" / "manifest.csv").read_bytes() == \
        (tmp_path / "f" / "manifest.csv").read_bytes()
    rows = files.read_csv(tmp_path / "z" / "manifest.csv")
    assert len(rows) == 62 and MOJI in {r["path"] for r in rows}  # UTF-8 member names match
    assert [(r["path"], r["reason"]) for r in files.read_csv(tmp_path / "z" / "unusable.csv")] == \
        [(victim, "bad CRC")]
    assert [r["reason"] for r in files.read_csv(tmp_path / "f" / "unusable.csv")] == ["missing"]
    info = zipfile.ZipInfo(MOJI.encode("utf-8").decode("cp437"))  # UTF-8 name, no UTF-8 flag
    assert files.member_name(info) == MOJI


def test_data_resize_from_zip_and_bad_zips_are_one_line(tmp_path, capsys):
    bodies = {f"S/{k}.jpg": noise_jpeg(k, (96, 64)) for k in range(4)}
    zpath = write_zip(tmp_path / "a.zip", bodies, "top/", corrupt="S/2.jpg")
    files.write_csv(tmp_path / "m.csv", ["path"], [[p] for p in bodies] + [["S/9.jpg"]])
    cache = tmp_path / "cache"
    argv = ["resize", "--manifest", str(tmp_path / "m.csv"), "--out", str(cache), "--size", "32",
            "--workers", "2"]
    assert data.main([*argv, "--root", str(zpath)]) == 0
    assert Image.open(cache / "S" / "3.jpg").size == (48, 32)
    bad = {r["path"]: r["error"] for r in files.read_csv(cache / "unreadable.csv")}
    assert set(bad) == {"S/2.jpg", "S/9.jpg"} and "CRC" in bad["S/2.jpg"]
    capsys.readouterr()
    data.main([*argv, "--root", str(zpath)])
    assert "3 already cached, 2 to resize" in capsys.readouterr().out
    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 and then nothing of a zip")
    whole = zpath.read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: len(whole) // 2])  # no central directory
    write_zip(tmp_path / "evil.zip", {"S/0.jpg": noise_jpeg(0), "../evil.jpg": noise_jpeg(1)})
    for name, msg in (("not.zip", "cannot read zip"), ("cut.zip", "cannot read zip"),
                      ("evil.zip", "escapes the zip's root"), ("none.zip", "image zip not found")):
        with pytest.raises(SystemExit) as e:
            data.main([*argv[:3], "--out", str(tmp_path / "c2"), "--root", str(tmp_path / name)])
        msg_got = str(e.value.code)
        assert msg in msg_got and msg_got.startswith("data.py: error: ") and "\n" not in msg_got
    assert not (tmp_path / "c2").exists()


def test_data_zip_dataloader_workers_open_their_own_handle(tmp_path):
    bodies = {f"d/{k}.jpg": noise_jpeg(k) for k in range(24)}
    zpath = write_zip(tmp_path / "w.zip", bodies)
    for p, body in bodies.items():
        (tmp_path / "dir" / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dir" / p).write_bytes(body)

    def pixels(root, workers):
        ds = files.ImageDataset(list(bodies), root, lambda im: torch.from_numpy(np.array(im)))
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers,
                                             collate_fn=files.collate_skip)
        return torch.cat([x for x, _, _ in loader])

    assert torch.equal(pixels(zpath, 2), pixels(tmp_path / "dir", 0))
    # forked workers reading through the parent's handle would share its file offset and read
    # each other's members now and then: each must use a handle it opened itself
    probe = HandleProbe(files.ImageDataset(list(bodies), zpath))
    pids = torch.cat(list(torch.utils.data.DataLoader(probe, batch_size=4, num_workers=2)))
    assert (pids[:, 0] == pids[:, 1]).all() and (pids[:, 1] != os.getpid()).all()
    src = files.image_source(zpath)
    assert src._pid == os.getpid()  # the parent's own handle, still its own
    assert pickle.loads(pickle.dumps(src))._zf is None  # a spawned worker opens its own


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_data_zip_bombs_refused_unread_and_a_repeated_name_reads_the_first(tmp_path, capsys):
    """A member whose recorded sizes no image has (a JPEG and then 20 MB of zeros: it decoded,
    and was read whole into memory; at 2 GB, 4.3 GB of RSS) is refused from the zip's directory
    before a byte is inflated; members are read as streams, CRC-checked at their end. A name
    that repeats: one warning, and the first member is read (as unzip does), not the last."""
    jpg = noise_jpeg(0)
    with zipfile.ZipFile(tmp_path / "b.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w/S/ok.jpg", jpg)
        zf.writestr("w/S/bomb.jpg", jpg + bytes(20 << 20))  # deflates about 1000:1
        zf.writestr("w/S/twice.jpg", noise_jpeg(1))
        zf.writestr("w/S/twice.jpg", noise_jpeg(2))
    capsys.readouterr()
    src = files.image_source(tmp_path / "b.zip")
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "1 members repeat an earlier name (e.g. w/S/twice" \
        in out, out
    assert src.read("S/twice.jpg") == noise_jpeg(1)
    with src.open("S/ok.jpg") as f:
        assert isinstance(f, zipfile.ZipExtFile)  # a stream, not the member's bytes in memory
    with pytest.raises(Image.DecompressionBombError, match=r"inflates \d{3,}:1"):
        src.open("S/bomb.jpg")
    assert files.check_member(src, "S/bomb.jpg").startswith("too large to decode (S/bomb.jpg")
    ds = files.ImageDataset(["S/ok.jpg", "S/bomb.jpg"], tmp_path / "b.zip")
    assert ds[0][0].size == (48, 32) and ds[1][0] is None and "inflates" in ds[1][2]
    big = zipfile.ZipInfo("w/S/huge.bmp")  # any format: over 256 MB inflated is refused
    big.file_size, big.compress_size = 300 << 20, 290 << 20
    assert "over 256 MB" in files.member_problem(big)


# --------------------------------------------------------------------------------------- hf-wikiart


def hf_expected(path):
    """Labels and painter of a converted row, from its <Style>/<shard>-<row>.jpg name."""
    shard, row = map(int, path.rsplit("/", 1)[1][:-4].split("-"))
    j = shard * 12 + row

    def name(t, k):
        return "" if HF_NAMES[t][k].startswith("Unknown") else HF_NAMES[t][k]
    labels = {"style": name("style", j % 3), "artist": name("artist", j % 5),
              "genre": name("genre", j % 3)}
    return labels, labels["artist"] or f"painter-{j % 7}"


def test_data_hf_wikiart_download_convert_resume(tmp_path, server, monkeypatch, capsys):
    for i in (0, 1):
        server.files[f"/hf/{data.shard_name(i)}.parquet"] = hf_shard(i)
    out = tmp_path / "hf"
    argv = ["hf-wikiart", "--out", str(out), "--shards", "0-1", "--base-url", server.url + "/hf",
            "--size", "32", "--per-class", "0", "--downloads", "1", "--workers", "2"]
    real, calls = data.convert_row, []

    def interrupted(*a):  # Ctrl-C in the fourth row of shard 1
        calls.append(1)
        if len(calls) == 16:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(data, "convert_row", interrupted)
    with pytest.raises(SystemExit) as e:
        data.main(argv)
    assert e.value.code == 130 and "run the same command" in capsys.readouterr().out
    parquet, shards = out / "parquet", out / "shards"
    assert (shards / f"{data.shard_name(0)}.csv").exists()
    assert not (shards / f"{data.shard_name(1)}.csv").exists()
    assert not (parquet / f"{data.shard_name(0)}.parquet").exists()  # converted: deleted
    assert (parquet / f"{data.shard_name(1)}.parquet").exists()  # downloaded: kept
    assert not (out / "manifest.csv").exists()
    monkeypatch.setattr(data, "convert_row", real)
    assert data.main(argv) == 0
    assert sorted(server.hits.values()) == [1, 1]  # no shard downloaded twice
    rows = files.read_csv(out / "manifest.csv")
    assert len(rows) == 22 and {r["split"] for r in rows} == {"train", "val"}
    for r in rows:
        assert {t: r[t] for t in ("style", "artist", "genre")} == hf_expected(r["path"])[0]
    assert Image.open(out / "images" / rows[0]["path"]).size == (48, 32)
    assert sorted(r["path"] for r in files.read_csv(out / "unusable.csv")) == \
        ["Impressionism/00000-00005.jpg", "Impressionism/00001-00005.jpg"]
    assert json.loads((out / "classes.json").read_text()) == {
        "style": HF_NAMES["style"], "artist": HF_NAMES["artist"][1:],
        "genre": HF_NAMES["genre"][:2]}  # "Unknown ..." is no label
    capsys.readouterr()
    data.main([*argv, "--split", "artist"])  # everything converted: no download, no decoding
    assert "2 converted already, 0 to download" in capsys.readouterr().out
    assert sorted(server.hits.values()) == [1, 1]
    splits = {}
    for r in files.read_csv(out / "manifest.csv"):
        splits.setdefault(hf_expected(r["path"])[1], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())  # no painter in two splits
    assert set().union(*splits.values()) == {"train", "dev", "test"}
    assert not [p for p in out.rglob("*") if p.name.endswith((".part", ".tmp"))]


def test_data_hf_wikiart_bad_input_is_one_line(tmp_path, server, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    server.files[f"/hf/{data.shard_name(0)}.parquet"] = hf_shard(0, 4, ("image", "artist"))
    server.files[f"/hf/{data.shard_name(1)}.parquet"] = b"PAR1 but no parquet in here PAR1"

    def error(shards, out):
        with pytest.raises(SystemExit) as e:
            data.main(["hf-wikiart", "--base-url", server.url + "/hf", "--retries", "0",
                       "--shards", shards, "--out", str(tmp_path / out)])
        msg = str(e.value.code)
        assert msg.startswith("data.py: error: ") and "\n" not in msg, msg
        return msg
    assert "HTTP 404" in error("3", "a") and not list((tmp_path / "a").rglob("*.parquet"))
    assert "no column style" in error("0", "b")
    assert not (tmp_path / "b" / "shards").exists() and not (tmp_path / "b" / "images").exists()
    assert "cannot read parquet" in error("1", "c")
    assert "numbered 0..71" in error("70-72", "d")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # not installed
    assert "pip install pyarrow" in error("0", "e")
    for meta in (None, {"huggingface": "{not json"}, {"huggingface": '{"info": []}'},
                 {"huggingface": json.dumps({"info": {"features": {"style": {"names": 3}}}})}):
        assert data.class_names(pa.schema([("style", pa.int64())], metadata=meta), "style") \
            is None
    yaml_like = {"info": {"features": {"style": {"names": {"0": "A", "1": "B"}}}}}
    schema = pa.schema([("style", pa.int64())], metadata={"huggingface": json.dumps(yaml_like)})
    assert data.class_names(schema, "style") == ["A", "B"]
    assert data.row_label(2, None, "style") == "style_2"  # no names: named by index
    assert data.row_label(0, HF_NAMES["artist"], "artist") == "" == data.row_label(None, [], "x")


# ------------------------------------------------------------------------- split rules (wikiart.py)


def test_data_split_official_test_is_the_val_lists(tmp_path, capsys):
    write_lists(tmp_path / "lists")
    folders = ["Art_Nouveau_Modern", "Baroque", "Cubism"]
    style_val = {f"{f}/artist-{c}_work-{i}(1).jpg" for c, f in enumerate(folders)
                 for i in range(0, 20, 4)}
    genre_val = {"Cubism/artist-2_work-3(1).jpg", MOJI}  # both train in the style lists
    artist_val = {"Baroque/artist-1_work-5(1).jpg"}  # train in the style lists
    base = ["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(tmp_path / "o")]
    for extra, test in ((["--per-class", "0"], style_val | genre_val | artist_val),
                        (["--per-class", "5"], style_val | genre_val | artist_val),
                        (["--tasks", "style,genre"], style_val | genre_val)):
        capsys.readouterr()
        data.main(base + extra)
        log = capsys.readouterr().out
        rows = files.read_csv(tmp_path / "o" / "manifest.csv")
        assert {r["path"] for r in rows if r["split"] == "test"} == test, extra
        assert {r["split"] for r in rows} == {"train", "dev", "test"}
        fit = [r for r in rows if r["split"] != "test"]
        assert not {r["path"] for r in fit} & test
        if "5" in extra:  # the cap is on train (and dev) only
            assert max(sum(1 for r in fit if r["style"] == c) for c in ("Baroque", "Cubism")) == 5
    assert "genre val list: 2 images, 2 of them not in the style val list" in log


def test_data_split_artist_no_painter_in_two_splits(tmp_path, capsys):
    write_lists(tmp_path / "lists")
    data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(tmp_path / "o"),
               "--per-class", "0", "--min-per-class", "1", "--split", "artist", "--test-frac",
               "0.3"])
    assert "split artist: 5 artists" in capsys.readouterr().out
    splits = {}
    for r in files.read_csv(tmp_path / "o" / "manifest.csv"):
        splits.setdefault(wikiart.artist_of(r["path"]), set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == 5
    assert {"train", "test"} <= set().union(*splits.values())
    with pytest.raises(SystemExit, match="--test-frac \\+ --dev-frac must be < 1"):
        data.main(["wikiart", "--lists", str(tmp_path / "lists"), "--out", str(tmp_path / "o"),
                   "--split", "artist", "--test-frac", "0.9"])


# -------------------------------------------------------------------------------- demo (painter.py)


def test_data_demo_formats(tmp_path, capsys):
    out = tmp_path / "demo"
    assert data.main(["demo", "--out", str(out), "--n", "48"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    raw = (out / "lists" / "style_train.csv").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") > 0
    art = (out / "lists" / "artist_train").read_text(encoding="utf-8").split("\n")
    assert art[0].startswith("(Path to image),,") and art[1] == "" and ",," in art[2]
    rows = files.read_csv(out / "manifest.csv")
    assert len(rows) == 48 and list(rows[0]) == ["path", "style", "artist", "genre", "split"]
    assert all(os.path.isfile(out / "images" / r["path"]) for r in rows)
    assert any("ã" in r["path"] for r in rows)
    gallery = files.read_csv(out / "gallery.csv")
    assert len(gallery) == 48 and gallery[0]["attribution"]


def test_data_demo_again_gives_the_same_data(tmp_path, capsys):
    """The quick start's line run twice: the same files, byte for byte, not a shifted stream."""
    def files(root):
        return {p: (root / p).read_bytes() for p in painter.scan_files(root)}
    data.main(["demo", "--out", str(tmp_path / "a"), "--n", "24"])
    first = files(tmp_path / "a")
    os.remove(tmp_path / "a" / sorted(p for p in first if p.startswith("images"))[3])
    capsys.readouterr()
    data.main(["demo", "--out", str(tmp_path / "a"), "--n", "24"])
    assert "23 of the 24 images were already in" in capsys.readouterr().out
    assert files(tmp_path / "a") == first


def test_data_demo_long_tail(tmp_path, capsys):
    # 360 over 6 styles at 100:1: shares 100^(-c/5) -> 217.6 86.6 34.5 13.7 5.5 2.2, rounded
    assert painter.demo_tail_sizes(360, 100).tolist() == [218, 87, 34, 14, 5, 2]
    assert painter.demo_tail_sizes(120, 100).tolist() == [72, 29, 11, 4, 2, 2]
    assert painter.demo_tail_sizes(60, 1).tolist() == [10] * 6
    out = tmp_path / "tail"
    data.main(["demo", "--out", str(out), "--n", "120", "--tail", "100"])
    log = capsys.readouterr().out
    true = Counter(p.split("/")[0] for p in painter.scan_files(out / "images"))  # folder = style
    assert sorted(true.values(), reverse=True) == [72, 29, 11, 4, 2, 2]
    listed = Counter(r["style"] for r in files.read_csv(out / "manifest.csv"))
    assert sum(abs(listed[c] - true[c]) for c in true) <= 2 * (120 // 40)  # the label noise
    small = sorted(c for c, n in listed.items() if n < wikiart.SMALL_CLASS)
    assert len(small) >= 2 and "warning: " in log and all(c in log for c in small)
    with pytest.raises(SystemExit, match="at least 6 images"):
        data.main(["demo", "--out", str(out), "--n", "5", "--tail", "100"])


# ----------------------------------------------------------------- your own paintings (userdata.py)


def paintings_tree(demo, root, levels=2):
    """The demo's images rearranged as a user's folder: root/<style>[/<artist>]/x.jpg."""
    for r in files.read_csv(demo / "manifest.csv"):
        parts = [r["style"], r["artist"] or "unknown"][:levels]
        os.makedirs(root.joinpath(*parts), exist_ok=True)
        shutil.copy(demo / "images" / r["path"], root.joinpath(*parts))
    return root


def test_data_folder_labels_from_folder_names(demo, tmp_path, capsys):
    pics = paintings_tree(demo, tmp_path / "paintings")
    (pics / "Cubism" / "unknown" / "broken.jpg").write_bytes(jpeg_bytes()[:100])
    (pics / "Cubism" / "notes.txt").write_text("not a painting")
    shutil.copy(next((pics / "Cubism").rglob("*.jpg")), pics / "loose.jpg")  # no style folder
    out = tmp_path / "mine"
    assert data.main(["folder", "--images", str(pics), "--levels", "style,artist", "--out",
                      str(out), "--split", "artist"]) == 0
    log = capsys.readouterr().out
    assert "left out 1 images less than 2 folder(s) deep" in log and "1 files that are not" in log
    assert [r["reason"] for r in files.read_csv(out / "unusable.csv")] == ["corrupt"]
    rows = files.read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "style", "artist", "split"] and len(rows) == 120
    assert all(r["path"].split("/")[:2] == [r["style"], r["artist"]] for r in rows)
    by = {s: {r["artist"] for r in rows if r["split"] == s} for s in ("train", "dev", "test")}
    assert all(by.values()) and not (by["train"] & by["test"]) and not (by["train"] & by["dev"])
    assert f"--data {out / 'manifest.csv'} --root {pics}" in log
    table = crnn_data.read_table(str(out / "manifest.csv"), str(out / "classes.json"))
    assert table.tasks == ["style", "artist"] and (table.y >= 0).all()
    # ImageFolder's one level: deeper folders do not label; random: stratified test and dev
    data.main(["folder", "--images", str(pics), "--out", str(out), "--test-frac", "0.25"])
    rows = files.read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "style", "split"] and len(rows) == 120
    for style in {r["style"] for r in rows}:
        mine = Counter(r["split"] for r in rows if r["style"] == style)
        assert mine["test"] >= 3 and mine["dev"] >= 1 and mine["train"] > mine["test"]
    with pytest.raises(SystemExit, match="--split group:museum: no museum column"):
        data.main(["folder", "--images", str(pics), "--out", str(out), "--split", "group:museum"])
    with pytest.raises(SystemExit, match="no images 1 folder"):
        data.main(["folder", "--images", str(pics / "Cubism" / "unknown"), "--out", str(out)])


def test_data_folder_on_a_long_tail(demo_tail, tmp_path, capsys):
    """The long-tailed demo's folders (72, 29, 11, 4, 2, 2 images per style): the styles with
    fewer than --min-per-class images left to train after the test and dev are taken out are
    dropped by name, every style kept has a test and a dev image and >= 5 train images."""
    data.main(["folder", "--images", str(demo_tail / "images"), "--out", str(tmp_path / "m")])
    log = capsys.readouterr().out
    sizes = Counter(p.split("/")[0] for p in painter.scan_files(demo_tail / "images"))
    small = [c for c, n in sizes.items() if n < 7]  # 7 = 1 test + 1 dev + 5 train
    left = {2: 1, 4: 2}  # 2: 1 test, 1 train (no dev from 1); 4: 1 test, 1 dev, 2 train
    assert len(small) == 3 and all(f"dropped class {c}: {left[sizes[c]]} usable train images"
                                   in log for c in small)
    rows = files.read_csv(tmp_path / "m" / "manifest.csv")
    assert len(rows) == sum(n for n in sizes.values() if n >= 7)
    assert min(Counter(r["style"] for r in rows if r["split"] == "train").values()) >= 5
    for c in set(sizes) - set(small):
        assert {r["split"] for r in rows if r["style"] == c} == {"train", "dev", "test"}


def test_data_csv_any_paths_and_labels(demo, tmp_path, capsys):
    gallery = files.read_csv(demo / "gallery.csv")
    rows = [[str(demo / "images" / r["path"]), r["style"], r["attribution"], f"m{i % 5}"]
            for i, r in enumerate(gallery)]
    rows.append([rows[0][0], "Cubism", rows[0][2], "m0"])  # listed twice, another style
    files.write_csv(tmp_path / "labels.csv", ["file", "style", "painter", "museum"], rows)
    with pytest.raises(SystemExit, match=r"no column path, split.*data\.py csv --csv"):
        crnn.main(["--train", "--data", str(tmp_path / "labels.csv"), *CRNN_FAST])
    out = tmp_path / "mine"
    data.main(["csv", "--csv", str(tmp_path / "labels.csv"), "--path-col", "file",
               "--label-cols", "style,painter", "--out", str(out), "--split", "group:museum",
               "--min-per-class", "1"])
    log = capsys.readouterr().out
    assert f"image root: {demo / 'images'}" in log and "style 1" in log  # absolute paths
    got = files.read_csv(out / "manifest.csv")
    assert list(got[0]) == ["path", "style", "painter", "split"] and len(got) == 119
    assert {r["path"] for r in got} == {r["path"] for r in gallery} - {gallery[0]["path"]}
    museum = {os.path.relpath(r[0], demo / "images"): r[3] for r in rows}
    splits = {}
    for r in got:
        splits.setdefault(museum[r["path"]], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == 5
    table = crnn_data.read_table(str(out / "manifest.csv"), str(out / "classes.json"),
                                 crnn_data.train_tasks("style,painter"))
    assert table.tasks == ["style", "painter"] and len(table.classes["painter"]) == 6
    # --min-per-class per column: the first drops images, the others leave labels empty
    data.main(["csv", "--csv", str(tmp_path / "labels.csv"), "--path-col", "file",
               "--label-cols", "style,painter", "--out", str(out), "--min-per-class", "13"])
    got = files.read_csv(out / "manifest.csv")  # styles of 27, 21, 19, 19, 18, 16 images
    kept = Counter(r["style"] for r in got if r["split"] == "train")
    assert min(kept.values()) >= 13 and len(kept) == 5  # 16: 3 test, 1 dev, 12 train
    n = Counter(r["painter"] for r in got if r["painter"] and r["split"] == "train")
    assert n and min(n.values()) >= 13 and any(not r["painter"] for r in got)
    with pytest.raises(SystemExit, match="--label-cols 'style,split'"):
        data.main(["csv", "--csv", str(tmp_path / "labels.csv"), "--path-col", "file",
                   "--label-cols", "style,split", "--out", str(out)])


# --------------------------------------------------------------------------------- poses (poses.py)


def test_data_poses_round_trip_and_the_list_form(tmp_path):
    rng = np.random.default_rng(0)
    k = painter.demo_pose(rng, "walking", hide=(9,))
    k[:, :2] = k[:, :2] * 30 + 100
    k[3, 2] = 0.5  # labelled but hidden: COCO's v 1
    by_path = {"a/b.jpg": [{"box": np.array([10, 20, 50, 90], np.float32), "keypoints": k,
                            "score": 0.9}], "c.png": []}
    poses.write_poses(tmp_path / "poses.json", by_path)
    doc = json.loads((tmp_path / "poses.json").read_text())
    assert doc["categories"][0]["skeleton"][0] == [16, 14]  # COCO counts joints from 1
    ann = doc["annotations"][0]
    assert ann["keypoints"][9:12] == [round(float(k[3, 0]), 2), round(float(k[3, 1]), 2), 1]
    assert ann["keypoints"][27:30] == [0, 0, 0] and ann["bbox"] == [10, 20, 40, 70]
    back = poses.read_poses(tmp_path / "poses.json")
    assert sorted(back) == ["a/b.jpg", "c.png"] and back["c.png"] == []
    f, shown = back["a/b.jpg"][0], k[:, 2] > 0
    assert f["keypoints"][:, 2].tolist() == k[:, 2].tolist() and f["score"] == pytest.approx(0.9)
    assert f["keypoints"][shown] == pytest.approx(k[shown], abs=0.006)
    assert (f["keypoints"][~shown] == 0).all()  # a hidden joint's place is not kept
    assert f["box"].tolist() == [10, 20, 50, 90]
    listed = [{"file_name": "./x/y.jpg", "keypoints": k[:, :2].tolist(),  # MMPose's form
               "keypoint_scores": [0.9] * 17},
              {"path": "x/y.jpg", "keypoints": [[1, 2, 2]] * 17}]
    (tmp_path / "list.json").write_text(json.dumps(listed))
    figures = poses.read_poses(tmp_path / "list.json")["x/y.jpg"]
    assert len(figures) == 2 and figures[0]["keypoints"][:, 2] == pytest.approx([0.9] * 17)
    assert figures[1]["box"].tolist() == [1, 2, 1, 2] and figures[1]["score"] == 1


@pytest.mark.parametrize("doc, msg", [
    ("{not json", "not JSON"),
    ('{"images": 3}', "neither COCO keypoints"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, '
     '"keypoints": []}]}', r"annotations\[0\]: image_id 2 is not in images"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, '
     '"keypoints": [1, 2, 2]}]}', r"annotations\[0\]: keypoints must be 17 \(x, y, v\)"),
    ('[{"file_name": "a.jpg", "keypoints": [' + ",".join(["1, 2, 3"] * 17) + "]}]",
     "entry 0: a keypoint's v must be 0, 1 or 2 .COCO., not 3"),
    ('[{"file_name": "/etc/a.jpg", "keypoints": []}]', "path must be relative"),
    ('[{"keypoints": []}]', "entry 0: needs a file_name"),
    ('[{"file_name": "a.jpg", "keypoints": [' + ",".join(["1, 2, 2"] * 17) + '], "bbox": 5}]',
     r"bbox must be \[x, y, width, height\]"),
])
def test_data_poses_malformed_is_one_line(tmp_path, doc, msg):
    (tmp_path / "p.json").write_text(doc)
    with pytest.raises(files.UserError, match=msg) as e:
        poses.read_poses(tmp_path / "p.json")
    assert "\n" not in str(e.value) and str(tmp_path / "p.json") in str(e.value)
    with pytest.raises(files.UserError, match="poses file not found"):
        poses.read_poses(tmp_path / "none.json")


def test_data_demo_figures_are_painted_where_their_joints_are():
    rng, counts = np.random.default_rng(4), Counter()
    for _ in range(30):
        im = Image.new("RGB", (160, 120), (200, 190, 170))
        figures = painter.demo_figures(im, rng)
        counts[len(figures)] += 1
        a = np.asarray(im, np.int64)
        for f in figures:
            k = f["keypoints"]
            assert k.shape == (17, 3) and set(np.unique(k[:, 2])) <= {0.0, 1.0}
            shown = k[k[:, 2] > 0, :2]
            assert (shown >= 0).all() and (shown < [160, 120]).all()  # inside the image
            assert f["box"].tolist() == pytest.approx([*shown.min(0), *shown.max(0)], abs=1e-4)
            for j, jj in poses.SKELETON:  # a shown limb's middle is painted (dark here, +-2 px:
                if j >= 5 and k[j, 2] and k[jj, 2]:  # PIL's thinnest lines sit off centre)
                    x, y = ((k[j, :2] + k[jj, :2]) / 2).round().astype(int)
                    assert a[y - 2:y + 3, x - 2:x + 3].sum(-1).min() < 3 * 100
    assert set(counts) == {0, 1, 2}
    by_family = {f: painter.demo_pose(np.random.default_rng(1), f, mirror=False, hide=())
                 for f in painter.POSE_FAMILIES}
    wrist_up = {f: p[9, 1] < p[5, 1] for f, p in by_family.items()}  # left wrist above shoulder
    assert wrist_up["arms_raised"] and not wrist_up["standing"]
    flipped = painter.demo_pose(np.random.default_rng(1), "pointing", mirror=True, hide=())
    assert flipped[10, 0] == pytest.approx(-by_family["pointing"][9, 0])  # the left arm, now right
    hidden = painter.demo_pose(np.random.default_rng(1), "standing", hide=(13, 15))
    assert hidden[[13, 15], 2].tolist() == [0, 0] and hidden[14, 2] == 1


# ============================================================================
# nets: the one backbone loader, JPEGs on the device, the malloc switch


def test_nets_backbone_weights_offline_local_and_mismatch(tmp_path, monkeypatch):
    def offline(*a, **kw):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", offline)
    with pytest.raises(files.UserError, match="offline, use --weights PATH") as e:
        nets.backbone("resnet18", "imagenet")
    assert "a baseline only: search by learned style with --ckpt" in str(e.value)
    ref = torchvision.models.resnet18(num_classes=7)  # a fine-tuned head of any size is fine
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    trunk, channels = nets.backbone("resnet18", str(tmp_path / "r18.pth"))
    assert torch.equal(trunk[0].weight, ref.conv1.weight) and channels == 512
    assert crnn_model.CRNN({"style": 3}, "resnet18",
                           str(tmp_path / "r18.pth")).proj.in_channels == 512
    with pytest.raises(files.UserError, match="not a torchvision resnet50 state_dict"):
        nets.backbone("resnet50", str(tmp_path / "r18.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(files.UserError) as e:
        nets.backbone("resnet18", str(tmp_path / "junk.pth"))
    assert str(e.value) == f"--weights {tmp_path / 'junk.pth'}: not a state_dict"
    with pytest.raises(files.UserError, match="unknown backbone 'resnet7'"):
        nets.backbone("resnet7")


def test_nets_backbone_seed_rebuilds_the_same_model():
    a, b = (nets.backbone("resnet18", "none", seed=3)[0] for _ in range(2))
    c = nets.backbone("resnet18", "none", seed=4)[0]
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    torch.manual_seed(0)
    d = nets.backbone("resnet18", "none")[0]  # seed None: torch's global stream, as crnn.py uses
    torch.manual_seed(0)
    assert torch.equal(d[0].weight, torchvision.models.resnet18().conv1.weight)


def test_nets_autocast_and_cudnn_flags(monkeypatch, demo, tmp_path):
    """No autocast at all where none applies (torch 2.1-2.4 refuse even a disabled one on mps),
    and crnn.main gives a notebook its cuDNN flags back after training."""
    assert isinstance(nets.autocast(torch.device("mps"), None), contextlib.nullcontext)
    assert isinstance(nets.autocast(torch.device("cpu"), None), contextlib.nullcontext)
    assert isinstance(nets.autocast(torch.device("cpu"), torch.bfloat16), torch.autocast)
    seen = []
    monkeypatch.setattr(crnn, "cmd_train", lambda *a: seen.append(
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))
        or {"epoch": 0, "best": 0.0, "selected_on": "val"})
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    crnn.main(["--train", "--data", str(demo / "manifest.csv"), *CRNN_FAST,
               "--out", str(tmp_path)])
    assert seen == [(False, True)]  # during the run
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)


def fit_for(amp):
    """crnn_train.make_fit on a tiny model, as cmd_train calls it with this autocast dtype."""
    model = crnn_model.CRNN({"style": 3}, torch.nn.Conv2d(3, 8, 3), hidden=8)
    feeds = crnn_train.Feeds(model, [None], [None], [[0]], None, None, [])
    args = crnn.build_parser().parse_args(["--train", "--epochs", "1"])
    return crnn_train.make_fit(model, feeds, args, torch.device("cuda"), amp)


@pytest.mark.parametrize("capability, weights, amp, scaler", [
    ((7, 5), "fp16", torch.float16, True),  # T4: no bf16 hardware (torch emulates it)
    ((7, 0), "fp16", torch.float16, True),  # V100
    ((8, 0), "bf16", torch.bfloat16, False),  # A100
    ((8, 9), "bf16", torch.bfloat16, False),  # L4
    ((9, 0), "bf16", torch.bfloat16, False)], ids=["T4", "V100", "A100", "L4", "H100"])
def test_nets_precision_by_capability(monkeypatch, capability, weights, amp, scaler):
    """One rule for training and inference on CUDA, by compute capability: a T4 got bf16
    weights (torch.cuda.is_bf16_supported() is True there: emulated) and every GPU got fp16 +
    GradScaler training; now bf16 both from sm 8.0 without a scaler, fp16 both below with
    one. The CPU's choice is unchanged and --no-amp is fp32 everywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert nets.inference_precision(cuda)[0] == weights and nets.autocast_dtype(cuda) == amp
    fit = fit_for(nets.autocast_dtype(cuda))
    assert fit.amp == amp and (fit.scaler is not None) == scaler
    line = nets.precision_line(cuda)
    assert f"sm {capability[0]}.{capability[1]}" in line and ("GradScaler" in line) == scaler
    assert nets.choose_precision(cuda, enabled=False) == ("fp32", None, "--no-amp")
    cpu, fast = torch.device("cpu"), nets.cpu_bf16_is_fast() and nets.mkldnn_bf16()
    assert nets.choose_precision(cpu)[:2] == (("bf16", torch.bfloat16) if fast else ("fp32", None))
    assert nets.choose_precision(torch.device("mps"))[:2] == ("fp32", None)


def test_nets_more_ranks_than_gpus_is_one_line(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine: rank 1 asked for cuda:1 and died in
    torch; now one line naming the fix, before any GPU or process group is touched."""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", touched.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(files.UserError) as e:
        nets.init_distributed(torch.device("cuda"))
    assert str(e.value) == ("torchrun rank 1: LOCAL_RANK 1 but this machine has 1 CUDA GPU: "
                            "start at most --nproc-per-node 1 (one process per GPU), or pass "
                            "--device cpu") and touched == []


def test_nets_copies_wait_on_mps(monkeypatch):
    """Host-to-device copies are asynchronous on CUDA only (pinned memory); on MPS a
    non_blocking copy can read its source after the loop dropped it (pytorch#189690)."""
    class Copy:
        def __init__(self):
            self.non_blocking = []

        def to(self, *a, non_blocking=False, **kw):
            self.non_blocking.append(non_blocking)
            return self

        def float(self):
            return self

        def contiguous(self, **kw):
            return self
    for device, want in (("mps", False), ("cuda", True), ("cpu", False)):
        x, y = Copy(), Copy()
        crnn.to_device(x, torch.device(device))
        embed.forward(lambda t: torch.ones(1, 4), y, torch.device(device))
        assert x.non_blocking == y.non_blocking == [want], device


def oriented_jpeg(orientation, size=(96, 64)):
    """A JPEG whose pixels are not symmetric under any flip or turn (a red ramp across, green
    down, a blue block near a corner), with EXIF orientation `orientation`."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[4:20, 8:30, 2] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_nets_device_decode_turns_images_upright(monkeypatch):
    """torchvision's CUDA JPEG decoder drops apply_exif_orientation (decode_jpegs_cuda takes
    none): emulated here by a decode_jpeg that ignores it, run on the CPU. Each orientation 2-8
    must still come out as PIL + exif_transpose gives it (the host reads the tag and turns the
    tensor), and a file without a tag or with a broken header is left as it is."""
    import torchvision.io
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, *a, **kw: real(
        data, *a, **{k: v for k, v in kw.items() if k != "apply_exif_orientation"}))
    tf = nets.make_transform(48)
    for o in range(1, 9):
        blob = oriented_jpeg(o)
        assert nets.jpeg_orientation(torch.frombuffer(bytearray(blob), dtype=torch.uint8)) == o
        want = tf(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB"))
        got = nets.decode_jpegs([torch.frombuffer(bytearray(blob), dtype=torch.uint8)], 48,
                                torch.device("cpu"))[0]
        sideways = tf(Image.open(io.BytesIO(blob)).convert("RGB"))  # the tag ignored
        assert (got - want).abs().max() < 0.05, o  # the same decoder and resampling as PIL
        assert o == 1 or (sideways - want).abs().mean() > 0.3, o  # the test can fail
    assert nets.jpeg_orientation(jpeg_bytes()) == 1  # no EXIF at all
    six = oriented_jpeg(6)
    assert nets.jpeg_orientation(six[:2] + b"\xff" + six[2:]) == 6  # a fill byte before APP1
    assert nets.jpeg_orientation(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00") == 1  # cut


def test_nets_one_malloc_switch(monkeypatch):
    """ARTEXTRACT_MALLOC_TUNING=0 or 1 decides; the old ARTEXTRACT_NO_MALLOC_TUNING is not a
    second switch (it would override the documented one)."""
    monkeypatch.setenv("ARTEXTRACT_NO_MALLOC_TUNING", "1")
    monkeypatch.setenv("ARTEXTRACT_MALLOC_TUNING", "1")
    assert nets.malloc_tuning_wanted() == (True, "ARTEXTRACT_MALLOC_TUNING=1")
    monkeypatch.setenv("ARTEXTRACT_MALLOC_TUNING", "0")
    assert nets.malloc_tuning_wanted()[0] is False


def test_nets_parts_join_in_rank_order_and_only_finished_ones(tmp_path, monkeypatch):
    """nets.py's per-rank parts: a part counts once its json is written (rows without one, or
    rows that are not its n, are not trusted); rank 0 joins them in rank order."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    stem = str(tmp_path / "x")
    for r, n in enumerate((2, 0, 3)):  # rank 1's part is empty: more ranks than rows there
        monkeypatch.setenv("RANK", str(r))
        np.save(nets.part_stem(stem) + ".npy", np.full((n, 2, 2), r, np.float16))
        assert nets.read_part(stem) is None  # rows, no record yet: not finished
        nets.finish_part(stem, {"n": n, "rank": r})
    assert nets.part_stem(stem, 2) == f"{stem}.part-2-of-3"
    rec, rows = nets.read_part(stem, 2)
    assert rec == {"n": 3, "rank": 2} and rows.shape == (3, 2, 2)
    recs = nets.join_parts(stem, str(tmp_path / "x.npy"))
    assert [r["rank"] for r in recs] == [0, 1, 2]
    joined = np.load(tmp_path / "x.npy")
    assert joined.dtype == np.float16 and joined[:, 0, 0].tolist() == [0, 0, 2, 2, 2]
    np.save(nets.part_stem(stem, 0) + ".npy", np.zeros((1, 2, 2), np.float16))  # cut short
    assert nets.read_part(stem, 0) is None
    with pytest.raises(files.UserError, match="rank 0's part is missing or unreadable"):
        nets.join_parts(stem, str(tmp_path / "y.npy"))
    nets.remove_parts(stem)
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_a_torch_torchvision_pair_that_does_not_belong_is_one_line(demo, monkeypatch, capsys):
    # torch 2.N goes with torchvision 0.(N + 15): real pairs from PyTorch's release table
    for torch_v, tv in (("2.0.1", "0.15"), ("2.5.1+cpu", "0.20"), ("2.7.0", "0.22"),
                        ("2.14.1", "0.29"), ("1.13.1", None), ("nightly", None)):
        assert nets.torchvision_for(torch_v) == tv, torch_v
    real = importlib.import_module

    def broken(name, *a, **kw):  # what a CPU torch with a CUDA torchvision does at import
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *a, **kw)
    monkeypatch.setattr(nets, "_TORCHVISION_OK", [])
    monkeypatch.setattr(nets.importlib, "import_module", broken)
    monkeypatch.setattr(nets.torch, "__version__", "2.5.1+cpu")
    msg = retrieve_error(["--eval", "--index", str(demo / "no-index")])
    assert "torchvision 0.20.x belongs with it" in msg and nets.CPU_INSTALL in msg, msg
    assert "torchvision::nms" in msg
    monkeypatch.setattr(nets.importlib, "import_module", real)
    capsys.readouterr()
    retrieve_error(["--eval", "--index", str(demo / "no-index")])  # imports: the index is missing
    out = capsys.readouterr().out
    assert "warning: torch 2.5.1+cpu with torchvision" in out and "0.20.x belongs" in out, out
    assert nets._TORCHVISION_OK  # checked once: later commands in this process say nothing


def test_quick_start_installs_the_cpu_build_first_as_ci_does():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        block = f.read().split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith(nets.CPU_INSTALL + " && "), lines[0]  # word for word: no CUDA
    readme = [c.strip() for ln in lines for c in ln.split("&&") if c.strip().startswith("pip ")]
    with open(os.path.join(here, ".ci", "run"), encoding="utf-8") as f:
        ci = [ln.replace("python3 -m pip install -q", "pip install") for ln in f.read().split("\n")
              if ln.startswith("python3 -m pip")]
    other = [ln for ln in block.splitlines() if ln.lstrip("# ").startswith("b) ")]
    assert len(other) == 1 and "pip install -r requirements.txt" in other[0], block
    # CI installs as the README says: alternative b) (its mirrors lack PyTorch's CPU index), then
    # the test tools
    assert ci == ["pip install -r requirements.txt", readme[-1]], (ci, readme)

# ============================================================================
# pages: heat overlays and the HTML pieces (the pages themselves come with each script's runs)


def test_pages_heat_overlay_is_bilinear_and_red_where_hot():
    im = Image.new("RGB", (64, 48), (128, 128, 128))
    heat = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # hot: the bottom right of a 2 x 3 grid
    a = np.asarray(pages.heat_overlay(im, heat), np.int64)
    assert a.shape == (48, 64, 3)
    hot, cold = a[40, 56], a[4, 4]  # inside the hot cell, far from it
    assert hot[0] > hot[2] + 60 and cold[2] > cold[0] + 60  # red against blue (jet)
    row = a[40]  # the bottom row runs from cold to hot: smoothly (nearest would jump ~70 at once)
    assert np.abs(np.diff(row, axis=0)).max() <= 30 and np.ptp(row, axis=0).max() > 100
    flat = np.asarray(pages.heat_overlay(im, np.ones((2, 3))), np.int64)
    assert (flat == flat[0, 0]).all()  # a uniform map tints evenly
    even = np.full((2, 3), 1 / 6)  # uniform attention: drawn at half the scale (green), not red
    assert pages.attention_top(even) == pytest.approx(2 / 6)
    g = np.asarray(pages.heat_overlay(im, even, pages.attention_top(even)), np.int64)[10, 10]
    assert g[1] > g[0] + 40 and g[1] > g[2] + 40


def test_pages_rows_are_escaped_and_nga_rows_link_to_nga(tmp_path):
    row = {"path": "a.jpg", "objectid": "46189", "title": "<script>alert(1)</script>",
           "url": "https://api.nga.gov/iiif/x/full/!512,512/0/default.jpg", "note": "a & b"}
    out = pages.row_html(row)
    assert "<script>" not in out and "&lt;script&gt;" in out and "a &amp; b" in out
    assert 'href="https://www.nga.gov/content/ngaweb/Collection/art-object-page.46189.html"' in out
    assert data.nga_page_url({**row, "url": ""}) is None  # the demo's made-up ids: no link
    assert pages.script_json({"t": "</script><!--"}) == '{"t":"<\\/script><\\!--"}'


def test_pages_many_classes_list_the_top_confusions(tmp_path):
    """Past pages.GRID_MAX classes report.html lists the largest confusions, not a K x K grid
    (186 artists: 4.4 MB, off the page)."""
    k, rng = 40, np.random.default_rng(0)
    y = rng.integers(0, k, 400)
    pred = np.where(rng.random(400) < 0.9, y, (y + 1) % k)
    pred[y == 3] = 7  # the largest confusion: every true 3 called 7
    names = [f"artist_{i}" for i in range(k)]
    res = {"artist": {"report": metrics.classification_report(y, pred, k, names), "top3": 0.5,
                      "confusion": metrics.confusion_matrix(y, pred, k)}}
    pages.eval_page(str(tmp_path / "r.html"), ["x"], res, [], 0)
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'class="cm"' not in text and text.count("<li>true ") == 20
    n3 = int((y == 3).sum())
    first = text.split('<ol class="confusions">')[1].split("</li>")[0]
    assert first == f"<li>true <b>artist_3</b> \u2192 predicted <b>artist_7</b>: {n3} of {n3} " \
        "(100%)"
    cm = res["artist"]["confusion"]
    crnn.confusion_png(cm, names, "artist", str(tmp_path / "cm.png"))  # GRID_MAX classes drawn
    crnn.confusion_png(cm[:30, :30], names[:30], "artist", str(tmp_path / "cm30.png"))
    with Image.open(tmp_path / "cm.png") as a, Image.open(tmp_path / "cm30.png") as b:
        assert a.width < 1.2 * b.width and a.height < 1.2 * b.height  # not a 40 x 40 grid
        top = np.asarray(a.convert("L"))[30:]
        assert (top < 60).sum() > 0  # the 100% cell of 3 -> 7 is there (dark blue)
    res["artist"]["confusion"] = res["artist"]["confusion"][:6, :6]
    res["artist"]["report"]["per_class"] = res["artist"]["report"]["per_class"][:6]
    pages.eval_page(str(tmp_path / "r.html"), ["x"], res, [], 0)
    assert 'class="cm"' in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_pages_draw_figures_colours_shown_limbs_only():
    im = Image.new("RGB", (100, 80), (128, 128, 128))
    k = np.zeros((17, 3))
    k[[5, 7, 9, 6, 8, 10], :2] = [[40, 40], [40, 80], [40, 120], [120, 40], [120, 80],
                                  [120, 120]]
    k[[5, 7, 6, 8, 10], 2] = 1  # the left wrist (9) hidden
    other = k.copy()
    other[:, 0] += 30
    out = np.asarray(pages.draw_figures(im, [{"keypoints": k}, other], scale=0.5), np.int64)
    assert out.shape == (80, 100, 3) and (np.asarray(im) == 128).all()  # a copy
    assert tuple(out[30, 20]) == pages.FIGURE_COLOURS[0]  # shoulder to elbow, at half scale
    assert tuple(out[50, 20]) == (128, 128, 128)  # elbow to the hidden wrist: not drawn
    assert tuple(out[50, 60]) == pages.FIGURE_COLOURS[0]
    assert tuple(out[30, 35]) == pages.FIGURE_COLOURS[1]  # the second figure's own colour


# ============================================================================
# crnn: learning, exact resume, evaluation files, prediction, bad input (crnn.py and its rooms:
# crnn_model.py, crnn_data.py, crnn_train.py)


# ----------------------------------------------------------- training (crnn_train.py, crnn_data.py)


@pytest.mark.xdist_group("trained")
def test_crnn_learns_demo_above_chance(trained):
    log = [json.loads(ln) for ln in open(trained / "log.jsonl", encoding="utf-8")]
    assert [r["epoch"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"] - 1.0  # summed over 3 tasks, starts near 5.0
    model, ckpt = crnn.load_checkpoint(str(trained / "best.pt"))
    dev = ckpt["dev"]
    assert ckpt["best"] == max(r["dev"]["mean_f1"] for r in log)
    assert dev["tasks"]["style"]["acc"] > 0.45  # 6 styles: chance 0.17
    assert dev["mean_f1"] > 0.35  # mean macro-F1 over 3 tasks: chance ~0.2
    assert set(ckpt["classes"]) == {"style", "artist", "genre"}
    assert model.embed(torch.randn(2, 3, 64, 64)).shape == (2, 512)  # 2 x --hidden 256
    # best.pt without AdamW's two moments (2x the model): only last.pt, which --resume reads
    last = torch.load(trained / "last.pt", weights_only=True)
    assert "optimizer" not in ckpt and "scheduler" not in ckpt and last["optimizer"]["state"]
    assert os.path.getsize(trained / "best.pt") < 0.4 * os.path.getsize(trained / "last.pt")


# A child python that runs crnn.main(argv[2:]) and SIGKILLs itself (as `kill -9`: no handler,
# no cleanup) at its train_step number argv[1]
KILLED_AT_STEP = """import os, signal, sys
import crnn, crnn_train
n, real, calls = int(sys.argv[1]), crnn_train.train_step, []
def step(*a, **kw):
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)
crnn_train.train_step = step
crnn.main(sys.argv[2:])
"""


def crnn_child(*argv, code="import sys, crnn; crnn.main(sys.argv[1:])"):
    """crnn.main(argv) in a fresh python (one torch thread, like this process): (status, output)."""
    env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("mode", [[], ["--freeze-backbone", "--balance", "sampler", "--rnn",
                                         "gru"]], ids=["end2end", "frozen-sampler-gru"])
def test_crnn_resume_in_a_new_process_equals_uninterrupted(demo, tmp_path, monkeypatch, mode):
    """As a user does it: train, `kill -9` in the middle of epoch 2, `--resume` alone in a new
    process: the weights, losses and val scores equal a run that was never stopped, bit for
    bit. The killed run decodes in a worker process, the resumed one in the default number,
    the uninterrupted one in none: each augmentation draw is seeded, so --workers changes
    nothing. --resume alone must take --no-amp from last.pt (it ran bf16 autocast on AMX).
    The frozen mode (no augmentation) stops in this process, at epoch 2's start: one child
    python less (each costs seconds of imports)."""
    rows = files.read_csv(demo / "manifest.csv")[:32]  # 2 epochs of 3 runs: keep them small
    files.write_csv(tmp_path / "m.csv", list(rows[0]), [list(r.values()) for r in rows])
    args = ["--train", "--data", str(tmp_path / "m.csv"), "--root", str(demo / "images"),
            "--classes", str(demo / "classes.json"), *CRNN_FAST, *mode, "--epochs", "2",
            "--batch-size", "16", "--lr", "1e-3", "--seed", "1"]
    if mode:  # a weights file other than the seed's init: the rebuilt cache must use it
        torch.manual_seed(123)
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
        args += ["--weights", str(tmp_path / "r18.pth")]
    crnn.main([*args, "--out", str(tmp_path / "a")])
    if mode:
        kill_in_epoch(monkeypatch, 2)
        with pytest.raises(KeyboardInterrupt):
            crnn.main([*args, "--out", str(tmp_path / "b")])
    else:
        steps = -(-sum(r["split"] == "train" for r in rows) // 16)
        rc, out = crnn_child(steps + 2, *args, "--workers", "1", "--out", tmp_path / "b",
                             code=KILLED_AT_STEP)  # the 2nd step of epoch 2
        assert rc == -signal.SIGKILL, out[-2000:]
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    shutil.rmtree(tmp_path / "b" / "cache", ignore_errors=True)  # rebuilt from last.pt
    rc, out = crnn_child("--train", "--resume", "--out", tmp_path / "b")
    assert rc == 0 and "resuming " in out and "--no-amp" in out, out[-2000:]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in "ab")
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), (k, (v.float() - b["model"][k].float()).abs().max())
    assert a["dev"] == b["dev"]
    logs = [[json.loads(ln)["loss"] for ln in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert logs[0] == logs[1] and len(logs[0]) == 2


def test_crnn_resume_takes_its_flags_from_last_pt(demo, tmp_path, capsys):
    """--resume alone continues the run with the flags last.pt was trained with; a larger
    --epochs extends it; typed flags that contradict it are all named in one line."""
    out = ["--out", str(tmp_path)]
    crnn.main(["--train", "--data", str(demo / "manifest.csv"), *CRNN_FAST, "--freeze-backbone",
               "--epochs", "1", "--hidden", "32", "--lr", "1e-3", *out])
    capsys.readouterr()
    state = crnn.main(["--train", "--resume", "--epochs", "2", "--workers", "0", *out])
    printed = capsys.readouterr().out
    assert state["epoch"] == 2 and "--backbone resnet18" in printed and "--hidden 32" in printed
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["args"]["hidden"] == 32 and ckpt["args"]["epochs"] == 2
    msg = crnn_error(capsys, ["--train", "--resume", "--epochs", "3", "--hidden", "64",
                              "--backbone", "resnet34", *out])
    assert "--backbone resnet34 (it has resnet18); --hidden 64 (it has 32)" in msg
    assert "pass a larger --epochs" in crnn_error(capsys, ["--train", "--resume", *out])


def test_crnn_overflowed_fp16_step_leaves_the_schedule(demo):
    """A GradScaler step skipped for an overflowed gradient is no optimizer step: the learning
    rate schedule must not advance (it did: torch warned 'lr_scheduler.step() before
    optimizer.step()')."""
    torch.manual_seed(0)
    model = crnn_model.CRNN({"style": 6}, "resnet18", "none", hidden=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = crnn_train.make_scheduler(opt, 100, 0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    fit = crnn_train.Fit(model, model, opt, sched, scaler, [None], 0.0, torch.device("cpu"), None,
                   False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([[0], [1], [2], [3]])
    hook = model.heads["style"].weight.register_hook(lambda g: g * float("inf"))  # overflow
    crnn_train.train_step(fit, x, y)
    assert scaler.get_scale() == 2.0 ** 15 and sched.last_epoch == 0  # skipped, not counted
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # no step
    hook.remove()  # finite gradients: a real step, which the schedule counts
    crnn_train.train_step(fit, x, y)
    assert sched.last_epoch == 1 and scaler.get_scale() == 2.0 ** 15


def test_crnn_balance_weights_by_hand():
    c = np.array([100, 10, 1])  # 111 train images; weights scaled to mean 1 over them
    got = {b: crnn_train.class_weights(c, b) for b in crnn.BALANCES}
    assert got["inverse"] == pytest.approx(111 / (3 * c))  # n / (K * count), as before
    assert crnn_train.class_weights(c, "loss") == pytest.approx(got["inverse"])  # the old name
    assert got["sqrt"] == pytest.approx(c ** -0.5 * 111 / (10 + 10 ** 0.5 + 1))
    assert got["capped"] == pytest.approx(np.array([0.01, 0.1, 0.1]) * 111 / 2.1)  # 1 -> 10
    eff = (1 - 0.999) / (1 - 0.999 ** c)
    assert got["effective"] == pytest.approx(eff * 111 / (eff * c).sum())
    assert got["none"] is got["logit-adjust"] is got["sampler"] is None
    assert crnn_train.logit_offsets(c, "logit-adjust") == pytest.approx(np.log(c / 111))
    assert crnn_train.logit_offsets(np.array([3, 0]), "logit-adjust") == \
        pytest.approx(np.log([.75, .25]))
    assert crnn_train.logit_offsets(c, "sqrt") is None


class HeadsToy(torch.nn.Module):
    """Two linear heads over a flattened (B, 3, 2, 2) input: a CRNN's outputs, cheaply."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleDict({"style": torch.nn.Linear(12, 4),
                                          "genre": torch.nn.Linear(12, 3)})

    def forward(self, x):
        return {t: h(x.flatten(1)) for t, h in self.heads.items()}


@pytest.mark.parametrize("balance", crnn.BALANCES)
def test_crnn_balanced_loss_shares_add_up_to_one_process(balance):
    """Under torchrun each rank's share_loss divides its summed loss by the whole batch's
    divisor (batch_divisors): the ranks' shares must add up to 1 process's multitask_loss for
    every --balance way (weighted means, logit offsets, smoothing), so that DDP's averaged
    gradient is the 1-process one."""
    torch.manual_seed(0)
    y = torch.tensor([[0, 0], [0, 1], [0, -1], [1, 2], [0, 0], [3, -1], [2, 1], [-1, 2], [0, 1]])
    table = crnn_data.Table([str(i) for i in range(9)], np.array(["train"] * 9), ["style", "genre"],
                       {"style": list("abcd"), "genre": list("xyz")}, y.numpy())
    ce, offsets, _ = crnn_train.balance_weights(table, np.arange(9), argparse.Namespace(
        balance=balance), torch.device("cpu"))
    toy, x = HeadsToy(), torch.randn(9, 3, 2, 2)
    fit = crnn_train.Fit(toy, toy, None, None, None, ce, 0.1, torch.device("cpu"), None, False,
                   ddp=toy, offsets=offsets)
    whole = crnn_train.multitask_loss(toy(x), y, ce, 0.1, offsets)
    shares = [np.arange(9)[r::3] for r in range(3)]  # 3 ranks
    div = np.sum([crnn_train.batch_divisors(y[s], ce) for s in shares], 0)
    assert sum(crnn_train.share_loss(fit, x[s], y[s], div) for s in shares).item() == \
        pytest.approx(whole.item(), rel=1e-6)
    plain = crnn_train.multitask_loss(toy(x), y, [None, None], 0.1)
    assert (whole.item() == pytest.approx(plain.item())) == (balance in ("none", "sampler"))
    if balance == "logit-adjust":  # no smoothing: exactly cross-entropy of logits + log prior
        z = toy(x)
        expected = sum(torch.nn.functional.cross_entropy(z[t] + offsets[j], y[:, j],
                                                         ignore_index=-1)
                       for j, t in enumerate(z))
        assert crnn_train.multitask_loss(z, y, ce, 0.0, offsets).item() == \
            pytest.approx(expected.item(), rel=1e-6)


# The long-tailed demo at the tiny settings of the other training tests: frozen features of a
# random ResNet18, so each run takes seconds (the feature cache is shared).
TAIL = [*CRNN_FAST, "--freeze-backbone", "--epochs", "6", "--batch-size", "16", "--lr", "1e-3",
        "--seed", "0"]


def test_crnn_long_tail_default_holds_where_inverse_weights_collapse(demo_tail, tmp_path,
                                                                     capsys):
    """issue 20 on the long-tailed demo: n/(K*count) weights (--balance loss, the old
    default) call most val images a class with one or two train images, and the guard says so
    every epoch and in --eval's report; the default beats the majority class in macro-F1,
    calls no smallest class for half the images and leaves the guard silent."""
    rows = files.read_csv(demo_tail / "manifest.csv")
    n_train = Counter(r["style"] for r in rows if r["split"] == "train")
    names = json.loads((demo_tail / "classes.json").read_text())["style"]
    base = ["--train", "--data", str(demo_tail / "manifest.csv"), *TAIL, "--cache",
            str(tmp_path / "cache")]
    got = {}
    for run, flags in (("loss", ["--balance", "loss"]), ("default", [])):
        crnn.main([*base, *flags, "--out", str(tmp_path / run)])
        log = capsys.readouterr().out
        crnn.main(["--eval", "--ckpt", str(tmp_path / run / "best.pt"), "--workers", "0",
                   "--no-amp"])
        capsys.readouterr()
        got[run] = (log, json.loads((tmp_path / run / "metrics.json").read_text())["style"],
                    (tmp_path / run / "report.txt").read_text())
    log, m, report = got["loss"]
    col = m["collapse"]
    assert col and col["predicted"] > 0.9 and col["true"] < 0.2
    assert all(n_train[names[c]] < wikiart.SMALL_CLASS for c in col["classes"])
    line = f"warning: style: {col['predicted']:.0%} of the val images are called " \
        + " or ".join(names[c] for c in col["classes"])
    assert line in report and "--balance loss pushes the model toward rare classes" in report
    assert "of the val images are called" in log
    log, m, report = got["default"]
    assert m["collapse"] is None and "collapsed" not in report
    assert m["macro"]["f1"] > m["baselines"]["majority"]["macro_f1"]
    least = min(n_train.values())
    assert all(c["predicted"] <= m["n"] / 2 for c in m["per_class"] if n_train[c["name"]] == least)
    # what training says at its start: the small classes by name, what selection averages
    small = sorted((n, c) for c, n in n_train.items() if n < wikiart.SMALL_CLASS)
    assert "warning: style: " in log and f"{small[0][1]} ({small[0][0]})" in log
    assert "each averaged over the task's classes in the split or predicted (style 6, artist 6, " \
        "genre 4)" in log
    assert "val baselines (macro-F1): style majority class " in log
    # a checkpoint from before train counts and the new --balance names still resumes and
    # evaluates; --eval then takes the majority class from the manifest's train rows
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "loss" / name, weights_only=True)
        del ckpt["train_counts"]
        torch.save(ckpt, tmp_path / "loss" / name)
    crnn.main(["--eval", "--ckpt", str(tmp_path / "loss" / "best.pt"), "--workers", "0"])
    m = json.loads((tmp_path / "loss" / "metrics.json").read_text())["style"]
    assert m["baselines"]["majority"]["name"] == n_train.most_common(1)[0][0]
    capsys.readouterr()
    crnn.main(["--train", "--resume", "--epochs", "7", "--workers", "0", "--out",
               str(tmp_path / "loss")])
    assert "--balance loss" in capsys.readouterr().out


def test_crnn_feature_cache_reused_and_rebuilt(demo, tmp_path, capsys):
    args = ["--train", "--data", str(demo / "manifest.csv"), *CRNN_FAST, "--freeze-backbone",
            "--epochs", "1", "--out", str(tmp_path)]
    state = crnn.main(args)
    out = capsys.readouterr().out
    assert out.count("cache: wrote") == 2
    assert state["epoch"] == 1 and repr(state) == (f"<crnn.py: best val mean macro-F1 "
                                                   f"{state['best']:.4f} after 1 epochs: "
                                                   f"{tmp_path / 'best.pt'}>")
    assert f"next: python crnn.py --eval --ckpt {tmp_path / 'best.pt'} " in out
    assert "# scores on the val split (no test split here; best.pt was chosen on val" in out
    assert f"python retrieve.py --build --ckpt {tmp_path / 'best.pt'} --images " in out
    feats = np.load(tmp_path / "cache" / "train.npy", mmap_mode="r")
    assert feats.dtype == np.float16 and feats.shape[1:] == (512, 2, 2)  # 64 px / 32
    msg = crnn_error(capsys, args)  # the same flags again would replace a better best.pt
    assert f"{tmp_path} holds a run with these flags (1 epochs, best mean F1 " in msg
    assert "--resume to continue it, or --overwrite to replace it" in msg
    crnn.main([*args, "--overwrite"])
    assert capsys.readouterr().out.count("cache: reusing") == 2
    crnn.main([*args, "--img-size", "96", "--overwrite"])  # another key: rebuilt, 3x3 maps
    assert capsys.readouterr().out.count("cache: wrote") == 2
    assert np.load(tmp_path / "cache" / "val.npy", mmap_mode="r").shape[2:] == (3, 3)
    with open(tmp_path / "cache" / "train.npy", "r+b") as f:  # killed while writing it
        f.truncate(1000)
    (tmp_path / "cache" / "val.json").write_text('{"key": "resnet18|none|9')  # truncated
    crnn.main([*args, "--img-size", "96", "--overwrite"])
    out = capsys.readouterr().out
    assert out.count("does not load") == 2 and out.count("cache: wrote") == 2
    assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f]


def test_crnn_cache_key_is_the_weights_bytes(tmp_path):
    """The feature cache keys a weights file as the index does, by its sha256: a copy under
    another name (or touched) keeps the cache, a changed byte rebuilds it."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(3)}, a)
    shutil.copy(a, b)
    os.utime(b, (1, 1))
    key = lambda w: crnn_data.cache_key(argparse.Namespace(  # noqa: E731
        weights=str(w), backbone="resnet18", img_size=64, seed=0), "fp32")
    assert key(a) == f"resnet18|{a}@sha256:{files.file_sha256(a)[:16]}|64px"
    assert key(a).split("@")[1] == key(b).split("@")[1]  # the same bytes, another name and date
    torch.save({"w": torch.ones(3)}, b)
    assert key(a).split("@")[1] != key(b).split("@")[1]


@pytest.mark.xdist_group("trained")
def test_crnn_reads_old_checkpoints_val_as_dev(trained, tmp_path):
    """Checkpoints before issue 22 kept the dev scores under "val": they load with them as
    "dev", and --eval still reads such a checkpoint."""
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    ckpt["val"] = ckpt.pop("dev")
    torch.save(ckpt, tmp_path / "old.pt")
    got = crnn.load_checkpoint(str(tmp_path / "old.pt"))[1]
    assert got["dev"] == ckpt["val"] and "val" not in got


def test_crnn_thin_tasks_left_out_unless_asked(demo, tmp_path, capsys):
    """A task with a median under 5 train images per class (here 60 'artists' of 2 images) is
    left out of training by default, with the line that says how to keep it."""
    rows = files.read_csv(demo / "manifest.csv")
    for i, r in enumerate(rows):
        r["artist"] = f"painter_{i // 2}"
    files.write_csv(tmp_path / "m.csv", list(rows[0]), [list(r.values()) for r in rows])
    args = ["--train", "--data", str(tmp_path / "m.csv"), "--root", str(demo / "images"),
            *CRNN_FAST, "--freeze-backbone", "--epochs", "1", "--out", str(tmp_path / "run")]
    crnn.main(args)
    log = capsys.readouterr().out
    assert re.search(r"left out artist: a median of [12](\.5)? train images per class over its 60 "
                     r"classes, under 5: too few to learn \(--tasks style,genre,artist keeps "
                     r"it\)", log), log
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["tasks"] == \
        ["style", "genre"]
    table = crnn_data.read_table(str(tmp_path / "m.csv"), str(tmp_path / "none.json"))
    assert crnn_data.learnable_tasks(table, "style,artist") is table  # typed: kept


def test_crnn_patience_stops_early(demo, tmp_path, capsys):
    crnn.main(["--train", "--data", str(demo / "manifest.csv"), *CRNN_FAST, "--freeze-backbone",
               "--lr", "0", "--epochs", "6", "--patience", "2", "--out", str(tmp_path)])
    assert "early stop" in capsys.readouterr().out  # lr 0: val never improves after epoch 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def test_crnn_corrupt_images_skipped_and_counted(demo, tmp_path, capsys):
    rows = files.read_csv(demo / "manifest.csv")
    bad = [r for r in rows if r["split"] == "train"][:2] + [r for r in rows
                                                            if r["split"] == "val"][:1]
    root = tmp_path / "images"
    for r in rows:
        dest = root / r["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        if r in bad:
            dest.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            os.link(demo / "images" / r["path"], dest)
    args = ["--data", str(demo / "manifest.csv"), "--root", str(root), *CRNN_FAST]
    crnn.main(["--train", *args, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "skipped 2 train + 1 val" in capsys.readouterr().out
    rec = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert rec["skipped"] == 2 and rec["skipped_dev"] == 1
    listed = files.read_csv(tmp_path / "run" / "skipped.csv")
    assert sorted(r["path"] for r in listed) == sorted(r["path"] for r in bad)
    assert all(r["reason"].startswith("cannot decode") for r in listed)
    crnn.main(["--eval", *args, "--ckpt", str(tmp_path / "run" / "last.pt")])
    assert "1 unreadable and skipped" in (tmp_path / "run" / "report.txt").read_text()


def test_crnn_mostly_missing_images_refused_before_training(demo, tmp_path, capsys):
    """A manifest whose images are mostly not there (a 2-million-row list with 360 files
    trained an 8-minute epoch of skips) stops in one line with a count and examples, before
    anything is written; --skip-missing trains on those found; a few missing: a note."""
    rows = files.read_csv(demo / "manifest.csv")
    gone = [{**r, "path": f"lost/{k}.jpg"} for k, r in enumerate(rows * 2)]
    files.write_csv(tmp_path / "m.csv", list(rows[0]), [list(r.values()) for r in rows + gone])
    args = ["--train", "--data", str(tmp_path / "m.csv"), "--root", str(demo / "images"),
            "--classes", str(demo / "classes.json"), *CRNN_FAST, "--freeze-backbone",
            "--epochs", "1", "--out", str(tmp_path / "run")]
    msg = crnn_error(capsys, args)
    assert re.search(r"240 of the 360 train and val images are not in \S+ \(e\.g\. lost/0\.jpg, "
                     r"lost/1\.jpg, lost/2\.jpg\): is --root right\? --skip-missing trains on "
                     r"the 120 there$", msg), msg
    assert not (tmp_path / "run").exists()
    state = crnn.main([*args, "--skip-missing"])
    out = capsys.readouterr().out
    assert "left out (--skip-missing)" in out and state["epoch"] == 1
    assert f"{sum(r['split'] == 'train' for r in rows)} train images" in out
    files.write_csv(tmp_path / "m.csv", list(rows[0]), [list(r.values()) for r in rows + gone[:3]])
    crnn.main([*args, "--overwrite"])
    assert "note: 3 of the 123 train and val images are not in" in capsys.readouterr().out


def test_crnn_paths_in_two_splits_refused_or_dropped(demo, tmp_path, capsys):
    rows = files.read_csv(demo / "manifest.csv")
    val = [r for r in rows if r["split"] == "val"]
    leaked = [{**r, "split": "train"} for r in val[:4]]  # val images listed again as train
    files.write_csv(tmp_path / "m.csv", list(rows[0]),
                   [list(r.values()) for r in rows + leaked + rows[:2]])  # + 2 repeated rows
    args = ["--train", "--data", str(tmp_path / "m.csv"), "--root", str(demo / "images"),
            "--classes", str(demo / "classes.json"), *CRNN_FAST, "--freeze-backbone",
            "--epochs", "1", "--out", str(tmp_path / "run")]
    msg = crnn_error(capsys, args)
    assert "4 paths stand in more than one split" in msg and val[0]["path"][:20] in msg
    state = crnn.main([*args, "--drop-leaks"])
    out = capsys.readouterr().out
    assert "2 repeated rows read once; 4 paths left out of train (--drop-leaks)" in out
    train_rows = len([r for r in rows if r["split"] == "train"])
    assert f"{train_rows} train images" in out and state["epoch"] == 1


def test_crnn_full_disk_is_one_line(demo, tmp_path, monkeypatch, capsys):
    """The frozen backbone's feature cache is a memory map: on a full disk (injected: its
    fallocate fails) one line naming it, and no temp file in the cache folder."""
    monkeypatch.setattr(os, "posix_fallocate", enospc, raising=False)
    msg = crnn_error(capsys, ["--train", "--data", str(demo / "manifest.csv"), *CRNN_FAST,
                              "--freeze-backbone", "--epochs", "1", "--out", str(tmp_path)])
    assert re.fullmatch(r"crnn\.py: error: no space left on \S+ while writing \S+/cache/train"
                        r"\.npy\.\w+\.tmp\.npy", msg), msg
    assert os.listdir(tmp_path / "cache") == []


def test_crnn_nan_loss_stops_and_keeps_last_good(demo, tmp_path, monkeypatch, capsys):
    real, calls = crnn_train.multitask_loss, []

    def nan_in_epoch_2(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) > 6 else loss  # 90 images / 16 = 6 steps
    monkeypatch.setattr(crnn_train, "multitask_loss", nan_in_epoch_2)
    msg = crnn_error(capsys, ["--train", "--data", str(demo / "manifest.csv"), *CRNN_FAST,
                                  "--freeze-backbone", "--batch-size", "16", "--epochs", "3",
                                  "--out", str(tmp_path)])
    assert "loss became nan in epoch 2" in msg and "last.pt" in msg
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


# ----------------------------------------------------------------------------------------- torchrun


def test_crnn_torchrun_resumes_on_two_processes_like_one(demo, tmp_path, monkeypatch):
    """1 process killed in epoch 2; `torchrun --nproc-per-node 2 crnn.py --train --resume` (its
    flags from last.pt) trains epochs 2 and 3 (its ranks rebuild the feature cache in shares);
    against 1 process run straight through. One torchrun launch: each costs ~8 s of CPU in
    imports alone. 81 train images in batches of 16: the last batch of each epoch has one image,
    so rank 1 gets an empty share and steps on the zero input (DDP needs every rank in every
    backward).

    The check: equal weights within tolerance at the same global batch (plus equal losses and
    cached features), not only equal val metrics. With --freeze-backbone --dropout 0 the runs
    compute the same function; what differs is the order of float sums (gradients summed over
    2 ranks). The logged losses agree to ~2e-7 and most weights to ~3e-5; AdamW turns rounding
    noise in near-zero gradients into steps of up to lr, so a few weights drift further
    (attention score.bias, whose true gradient is 0: softmax ignores a shift): up to 6.5e-4
    here. A rank averaging its own share's mean loss (the usual DDP shortcut, which weights
    tasks and classes unlike 1 process) differs by 1e-2, so atol 2e-3 tells the two apart.
    Val metrics alone would not: near chance, one flipped argmax changes them."""
    rows = files.read_csv(demo / "manifest.csv")
    train = [r for r in rows if r["split"] == "train"][:81]
    for r in train[8:]:  # artist labels on 8 train images: many a step has none (its head
        r["artist"] = ""  # then gets no gradient, and AdamW must leave it alone, as in 1 process)
    rows = [r for r in rows if r["split"] != "train"] + train
    files.write_csv(tmp_path / "m81.csv", list(rows[0]), [list(r.values()) for r in rows])
    args = ["--train", "--data", str(tmp_path / "m81.csv"), "--root", str(demo / "images"),
            "--classes", str(demo / "classes.json"), *CRNN_FAST, "--freeze-backbone", "--dropout",
            "0", "--epochs", "3", "--batch-size", "16", "--lr", "1e-3", "--seed", "1",
            "--device", "cpu", "--tasks", "style,artist,genre"]  # typed: the thin artist stays
    one, two = tmp_path / "one", tmp_path / "two"
    crnn.main([*args, "--out", str(one)])
    kill_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        crnn.main([*args, "--out", str(two)])
    shutil.rmtree(two / "cache")  # rebuilt by the 2 ranks, each its share
    rc, out = torchrun("crnn.py", "--train", "--resume", "--out", two, "--workers", "0",
                       "--device", "cpu")  # the rest (--no-amp too) from last.pt
    assert rc == 0 and "resuming " in out and "after epoch 1" in out, out[-3000:]
    assert "train.part-0-of-2" in out and "val.part-0-of-2" in out
    assert out.count("epoch 3/3:") == 1  # rank 0 alone prints
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(os.listdir(two)) == ["best.pt", "cache", "last.pt", "log.jsonl"]
    assert sorted(os.listdir(two / "cache")) == ["train.json", "train.npy", "val.json", "val.npy"]
    for f in ("train.npy", "val.npy"):  # each rank cached its share, rank 0 joined them
        np.testing.assert_allclose(np.load(two / "cache" / f), np.load(one / "cache" / f),
                                   rtol=2e-3, atol=1e-3)  # fp16: 1 ulp is 2^-10 relative
    logs = [[json.loads(ln) for ln in open(d / "log.jsonl")] for d in (one, two)]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]  # epoch 1 from 1 process, 2-3 from 2
    np.testing.assert_allclose([r["loss"] for r in logs[1]], [r["loss"] for r in logs[0]],
                               rtol=1e-5)
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (one, two))
    assert b["epoch"] == 3
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, atol=1e-5 if k.startswith("heads.") else 2e-3,
                                   rtol=0, msg=k)
    # validation on all ranks' predictions gathered: all 30 val images, and the metrics that
    # one process computes from the same weights and features
    assert b["dev"]["images"] == a["dev"]["images"] == 30
    model = crnn.load_checkpoint(str(two / "last.pt"))[0]
    with torch.no_grad():
        logits = model.classify(torch.from_numpy(np.load(two / "cache" / "val.npy")).float())
    table = crnn.read_table(str(tmp_path / "m81.csv"), str(demo / "classes.json"))
    y = table.y[np.flatnonzero((table.split == "val") & (table.y >= 0).any(1))]
    for j, t in enumerate(table.tasks):
        m = y[:, j] >= 0
        acc = (logits[t].argmax(1).numpy()[m] == y[m, j]).mean()
        assert b["dev"]["tasks"][t]["n"] == m.sum() and b["dev"]["tasks"][t]["acc"] == \
            pytest.approx(acc), t


def test_crnn_torchrun_frozen_cache_with_fewer_images_than_ranks(demo, tmp_path):
    """Two ranks, one train and one val image: rank 0's share of each split is empty. It raised
    'no readable image among 0' and took the run down; now it writes an empty part, joins
    every barrier, and the run trains on the one image."""
    rows = files.read_csv(demo / "manifest.csv")
    one = [next(r for r in rows if r["split"] == s) for s in ("train", "val")]
    files.write_csv(tmp_path / "m1.csv", list(rows[0]), [list(r.values()) for r in one])
    rc, out = torchrun("crnn.py", "--train", "--data", tmp_path / "m1.csv", "--root",
                       demo / "images", "--classes", demo / "classes.json", *CRNN_FAST,
                       "--freeze-backbone", "--epochs", "1", "--out", tmp_path / "run",
                       "--device", "cpu")
    assert rc == 0, out[-3000:]
    assert "train.part-0-of-2.npy (0 images" in out and "1 train images" in out
    assert np.load(tmp_path / "run" / "cache" / "train.npy").shape[0] == 1
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text())["epoch"] == 1


# ------------------------------------------------------------------------------------ eval, predict


@pytest.mark.xdist_group("trained")
def test_crnn_eval_writes_every_file(trained, demo, tmp_path, capsys):
    out = tmp_path / "eval"
    crnn.main(["--eval", "--ckpt", str(trained / "best.pt"), "--outliers", "6", "--out", str(out),
               "--workers", "0"])
    tasks = ["style", "artist", "genre"]
    names = ["report.txt", "metrics.json", "predictions.csv", "outliers.csv", "outliers.png"]
    names += [f"confusion_{t}.{ext}" for t in tasks for ext in ("csv", "png")]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "metrics.json").read_text())
    preds = files.read_csv(out / "predictions.csv")
    classes = json.loads((demo / "classes.json").read_text())
    for t in tasks:
        lab = [r for r in preds if r[f"{t}_true"]]
        y = np.array([classes[t].index(r[f"{t}_true"]) for r in lab])
        p = np.array([classes[t].index(r[f"{t}_pred"]) for r in lab])
        rep = metrics.classification_report(y, p, len(classes[t]))
        assert summary[t]["n"] == len(lab) > 0
        assert summary[t]["accuracy"] == pytest.approx(float((y == p).mean()))
        assert summary[t]["macro"]["f1"] == pytest.approx(rep["macro"]["f1"])
        with open(out / f"confusion_{t}.csv", encoding="utf-8") as f:
            header, *cm = list(csv.reader(f))
        assert header[1:] == classes[t] and [r[0] for r in cm] == classes[t]
        cm = [[int(v) for v in r[1:]] for r in cm]
        assert np.array_equal(cm, metrics.confusion_matrix(y, p, len(classes[t])))
        assert f"top-3 accuracy {summary[t]['top3']:.4f}" in (out / "report.txt").read_text()
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    assert summary["style"]["accuracy"] == pytest.approx(ckpt["dev"]["tasks"]["style"]["acc"])
    for t in tasks:  # the trained model: baselines beside it, and the guard silent
        base = summary[t]["baselines"]
        assert base["majority"]["name"] == classes[t][int(np.argmax(ckpt["train_counts"][t]))]
        assert summary[t]["macro"]["f1"] > base["majority"]["macro_f1"]
        assert summary[t]["collapse"] is None
    assert "collapsed" not in (out / "report.txt").read_text()
    # --predict on the same val images, another code path (no DataLoader, other batches):
    # its top-1 is predictions.csv's, its top-3 gives the report's top-3 accuracy
    by_file = {str(demo / "images" / r["path"]): r for r in preds}
    top = crnn.main(["--predict", *by_file, "--ckpt", str(trained / "best.pt"), "-k", "3"])
    for t in tasks:
        lab = [f for f, r in by_file.items() if r[f"{t}_true"]]
        hits = [by_file[f][f"{t}_true"] in [c for c, _ in top[f][t]] for f in lab]
        assert summary[t]["top3"] == pytest.approx(np.mean(hits))
        for f in lab:
            assert top[f][t][0][0] == by_file[f][f"{t}_pred"]
            assert top[f][t][0][1] == pytest.approx(float(by_file[f][f"{t}_p_pred"]), abs=2e-4)
    found = files.read_csv(out / "outliers.csv")
    scores = [float(r["score"]) for r in found]
    assert 0 < len(found) <= 6 and scores == sorted(scores, reverse=True)
    for r in found:
        assert r["true"] != r["pred"]
        assert float(r["score"]) == pytest.approx(float(r["p_pred"]) - float(r["p_true"]),
                                                  abs=2e-4)
    with Image.open(out / "outliers.png") as im, Image.open(out / "confusion_style.png") as cm:
        assert im.width >= 190 and im.height >= 200 and cm.width > 6 * 12


def test_crnn_guard_rule_by_hand():
    def rep(y, p, k=5):
        return metrics.classification_report(np.array(y), np.array(p), k)
    y = [0] * 8 + [1, 2]  # class 0 is 80% of the labels
    assert crnn.collapse(rep(y, [4] * 10)) == {"classes": [4], "predicted": 1.0, "true": 0.0}
    assert crnn.collapse(rep(y, [0] * 10)) is None  # the majority class: wrong, not collapsed
    assert crnn.collapse(rep(y, [4] * 9 + [0])) is None  # 90% is not more than 90%
    assert crnn.collapse(rep(y, [4] * 6 + [3] * 4)) == {"classes": [4, 3], "predicted": 1.0,
                                                        "true": 0.0}  # two rare ones
    assert crnn.collapse(rep(y, [1] * 10)) == {"classes": [1], "predicted": 1.0, "true": 0.1}
    assert crnn.collapse(rep([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1] * 10)) is None  # 20% of them


@pytest.mark.xdist_group("trained")
def test_crnn_guard_and_baselines_on_a_hand_made_split(trained, demo, tmp_path, capsys):
    """A checkpoint forced to call every image Ukiyo_e, from before checkpoints kept their
    train counts: --eval says it collapsed in report.txt, report.html and metrics.json, and
    scores the baselines of a hand-made split (majority class: its train rows' most frequent)."""
    names = json.loads((demo / "classes.json").read_text())["style"]
    paths = {c: [r["path"] for r in files.read_csv(demo / "manifest.csv") if r["style"] == c]
             for c in names}
    a, b, c, rare = names[0], names[1], names[2], names[5]
    rows = [[paths[a][i], a, "train"] for i in range(3)] + [[paths[b][0], b, "train"]]
    rows += [[paths[a][3], a, "test"], [paths[b][1], b, "test"], [paths[b][2], b, "test"],
             [paths[c][0], c, "test"]]
    files.write_csv(tmp_path / "m.csv", ["path", "style", "split"], rows)
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    del ckpt["train_counts"]
    ckpt["args"]["balance"] = "loss"
    ckpt["model"]["heads.style.weight"].zero_()
    ckpt["model"]["heads.style.bias"].copy_(torch.full((6,), -10.0))
    ckpt["model"]["heads.style.bias"][5] = 10.0
    torch.save(ckpt, tmp_path / "forced.pt")
    crnn.main(["--eval", "--ckpt", str(tmp_path / "forced.pt"), "--data", str(tmp_path / "m.csv"),
               "--root", str(demo / "images"), "--classes", str(demo / "classes.json"),
               "--out", str(tmp_path / "e"), "--workers", "0"])
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())["style"]
    assert m["collapse"] == {"classes": [5], "predicted": 1.0, "true": 0.0}
    line = f"warning: style: 100% of the test images are called {rare}, which 0% of them are"
    assert line in (tmp_path / "e" / "report.txt").read_text()
    page = (tmp_path / "e" / "report.html").read_text(encoding="utf-8")
    assert f'<p class="warn">{html.escape(line)}' in page
    # test = a b b c, majority (of train: a a a b) a: accuracy 1/4, F1_a = 2*1 / (4 + 1) = 0.4,
    # macro over the 3 classes in the truth or the calls (a, b, c) 0.4 / 3, weighted 0.4 / 4;
    # uniform: metrics' exact expectation
    assert m["baselines"]["majority"] == pytest.approx({"class": 0, "name": a, "accuracy": 0.25,
                                                        "macro_f1": 0.4 / 3, "weighted_f1": 0.1})
    assert m["baselines"]["uniform"] == pytest.approx(metrics.uniform_scores([0, 1, 1, 2], 6))
    assert m["baselines"]["uniform"]["accuracy"] == pytest.approx(1 / 6)
    for v in ("0.250", f"{0.4 / 3:.3f}", "0.100", f"{m['baselines']['uniform']['macro_f1']:.3f}"):
        assert f"<td>{v}</td>" in page
    assert check_page(tmp_path / "e" / "report.html").tags["table"] >= 3


@pytest.mark.xdist_group("trained")
def test_crnn_outliers_anywhere_find_the_planted_labels(trained, demo, tmp_path, capsys):
    """The demo's deliberately wrong style labels: outliers looked for in every split name
    more of them than in the held-out split alone, and say how many."""
    found = {}
    for where in ("heldout", "all"):
        crnn.main(["--eval", "--ckpt", str(trained / "best.pt"), "--outliers", "20",
                   "--outliers-split", where, "--out", str(tmp_path / where), "--workers", "0"])
        line = next(ln for ln in capsys.readouterr().out.splitlines()
                    if ln.startswith("planted label errors"))
        found[where] = int(re.search(r": (\d+) of (\d+) named", line)[1])
        planted = {r["path"] for r in files.read_csv(demo / "label_noise.csv")}
        named = {r["path"] for r in files.read_csv(tmp_path / where / "outliers.csv")
                 if r["task"] == "style"}
        assert found[where] == len(planted & named)
    assert found["all"] > found["heldout"], found


@pytest.mark.xdist_group("trained")
def test_crnn_inference_in_bf16_agrees_with_fp32(trained, demo):
    """--eval/--predict's Inference model with bf16 backbone weights (what AMX CPUs and CUDA
    get) against fp32: embeddings at cosine >= 0.999, the same predicted classes."""
    model, _ = crnn.load_checkpoint(str(trained / "best.pt"))
    rows = [r for r in files.read_csv(demo / "manifest.csv") if r["split"] == "val"][:12]
    x = torch.stack([nets.make_transform(64)(files.load_image(demo / "images" / r["path"], 64))
                     for r in rows])
    with torch.no_grad():
        a = crnn_model.Inference(model, "fp32").eval()
        b = crnn_model.Inference(model, "bf16").eval()
        cos = torch.nn.functional.cosine_similarity(a.embed(x), b.embed(x))
        pa, pb = a(x), b(x)
    assert cos.min() >= 0.999, cos
    assert all(torch.equal(pa[t].argmax(1), pb[t].argmax(1)) for t in pa)


@pytest.mark.xdist_group("trained")
def test_crnn_eval_and_predict_follow_data_to_its_run(trained, demo, tmp_path, monkeypatch,
                                                      capsys):
    """Without --ckpt, --data M means runs/<M's folder>/best.pt (where --train M wrote it), not
    the demo's model; a label the checkpoint lacks names the checkpoint."""
    monkeypatch.chdir(tmp_path)
    rows = files.read_csv(demo / "manifest.csv")
    os.makedirs("mine")
    files.write_csv("mine/manifest.csv", list(rows[0]), [list(r.values()) for r in rows])
    os.makedirs("runs/mine")
    shutil.copy(trained / "best.pt", "runs/mine/best.pt")
    res = crnn.main(["--eval", "--data", "mine/manifest.csv", "--root", str(demo / "images"),
                     "--workers", "0"])
    assert res["style"]["accuracy"] > 0.3 and len(repr(res)) < 200
    assert (tmp_path / "runs" / "mine" / "report.txt").read_text().startswith(
        f"checkpoint: {os.path.join('runs', 'mine', 'best.pt')}\n")
    crnn.main(["--predict", str(demo / "images" / rows[0]["path"]), "--data", "mine/manifest.csv"])
    assert os.path.isfile("runs/mine/predict/predictions.csv")
    msg = crnn_error(capsys, ["--eval", "--data", str(demo / "manifest.csv")])
    assert "checkpoint not found: runs/demo/best.pt (train it with `python crnn.py --train " \
           f"--data {demo / 'manifest.csv'}`, or pass --ckpt)" in msg
    rows[0]["artist"] = "juan-gris"
    files.write_csv("mine/manifest.csv", list(rows[0]), [list(r.values()) for r in rows])
    msg = crnn_error(capsys, ["--eval", "--data", "mine/manifest.csv"])
    assert "artist 'juan-gris' is not in the class list (6 artist classes of checkpoint " \
           f"{os.path.join('runs', 'mine', 'best.pt')}, trained on {demo / 'manifest.csv'})" in msg
    capsys.readouterr()
    msg = crnn_error(capsys, ["--predict", "missing.jpg", "--data", "mine/manifest.csv"])
    assert msg.endswith("not found: missing.jpg") and "model:" not in capsys.readouterr().out


@pytest.mark.xdist_group("trained")
def test_crnn_eval_uses_the_checkpoints_classes(trained, demo, tmp_path):
    """A classes.json beside the manifest that differs from the checkpoint's (another subset's)
    is not consulted: the checkpoint's own lists label the rows."""
    shutil.copy(demo / "manifest.csv", tmp_path / "manifest.csv")
    other = json.loads((demo / "classes.json").read_text())
    other["style"] = other["style"][::-1]
    (tmp_path / "classes.json").write_text(json.dumps(other))
    res = crnn.main(["--eval", "--ckpt", str(trained / "best.pt"), "--data",
                     str(tmp_path / "manifest.csv"), "--root", str(demo / "images"), "--out",
                     str(tmp_path / "eval"), "--workers", "0"])
    ckpt = torch.load(trained / "best.pt", weights_only=True)
    assert res["style"]["accuracy"] == pytest.approx(ckpt["dev"]["tasks"]["style"]["acc"])


@pytest.mark.xdist_group("trained")
def test_crnn_predict_file_and_folder(trained, demo, tmp_path, capsys):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    src = next((demo / "images" / "Cubism").iterdir())
    (folder / "sub" / "a.jpg").write_bytes(src.read_bytes())
    (folder / "b.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("hello")
    ckpt = ["--ckpt", str(trained / "best.pt"), "-k", "3", "--no-amp"]
    results = crnn.main(["--predict", str(src), *ckpt])
    out = capsys.readouterr().out
    tasks = ("style", "artist", "genre")
    lines = out.splitlines()
    at = lines.index(str(src))  # the file's line, then its tasks': the printed lines are results
    assert lines[at:at + 4] == [str(src)] + [
        f"  {t}: " + ", ".join(f"{c} {q:.3f}" for c, q in results[str(src)][t]) for t in tasks]
    assert lines[-1] == "1 images classified"
    model, ck = crnn.load_checkpoint(str(trained / "best.pt"))  # the model's own top 3, apart
    x = nets.make_transform(ck["args"]["img_size"])(files.load_image(src, ck["args"]["img_size"]))
    with torch.no_grad():
        logits = model(x[None])
    for t in tasks:
        p = torch.softmax(logits[t][0].float(), 0)
        order = p.argsort(descending=True)[:3].tolist()
        assert [c for c, _ in results[str(src)][t]] == [ck["classes"][t][j] for j in order], t
        assert [q for _, q in results[str(src)][t]] == pytest.approx(p[order].tolist(), abs=1e-4)
    results = crnn.main(["--predict", str(folder), *ckpt])
    assert list(results) == [str(folder / "sub" / "a.jpg")]
    assert re.fullmatch(r"<crnn\.py: 1 images classified: \S+predictions\.csv>", repr(results))
    out = capsys.readouterr().out  # each reason counted as what it is (b.png is no 'not image')
    listed = files.read_csv(trained / "predict" / "predictions.csv")  # not --eval's own
    assert f"wrote {trained / 'predict' / 'predictions.csv'} (1 images, top 3" in out
    assert [r["path"] for r in listed] == [str(folder / "sub" / "a.jpg")]
    for t, top in results[str(folder / "sub" / "a.jpg")].items():
        assert [(listed[0][f"{t}_top{i}"], float(listed[0][f"{t}_p{i}"])) for i in (1, 2, 3)] \
            == [(c, pytest.approx(q, abs=1e-4)) for c, q in top]
    assert f"skipped (cannot decode (cannot identify image file '{folder / 'b.png'}'" in out
    assert out.rstrip().endswith("1 images classified, 1 files skipped (not image files by their "
                                 "extension), 1 unreadable (why: above)"), out[-300:]


def test_crnn_selects_on_dev_reports_on_test_from_a_zip(demo, demo_zip, tmp_path, capsys):
    """A train/dev/test manifest (as `wikiart --split official` writes) over the zipped demo
    images; one genre class is labelled only in test."""
    classes = json.loads((demo / "classes.json").read_text())
    rare, rows = classes["genre"][0], []
    for k, r in enumerate(files.read_csv(demo / "manifest.csv")):
        split = "test" if r["split"] == "val" else "dev" if k % 4 == 0 else "train"
        genre = "" if split != "test" and r["genre"] == rare else r["genre"]
        rows.append([r["path"], r["style"], r["artist"], genre, split])
    files.write_csv(tmp_path / "m.csv", ["path", "style", "artist", "genre", "split"], rows)
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    out = tmp_path / "run"
    capsys.readouterr()
    crnn.main(["--train", "--data", str(tmp_path / "m.csv"), "--root", str(demo_zip), *CRNN_FAST,
               "--freeze-backbone", "--epochs", "2", "--tasks", "style,genre", "--out", str(out)])
    log = capsys.readouterr().out
    assert "selecting best.pt on dev" in log and "skipped 0 train + 0 dev" in log
    assert f"warning: genre: test classes never seen in train (always scored wrong): {rare}" in log
    assert sorted(os.listdir(out / "cache")) == ["dev.json", "dev.npy", "train.json", "train.npy"]
    assert [json.loads(ln)["split"] for ln in open(out / "log.jsonl")] == ["dev", "dev"]
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["selected_on"] == "dev" and list(ckpt["classes"]) == ["style", "genre"]
    crnn.main(["--eval", "--ckpt", str(out / "best.pt"), "--outliers", "3", "--workers", "0"])
    n_test = sum(1 for r in rows if r[4] == "test")
    report = (out / "report.txt").read_text()
    assert f"(test split, {n_test} images, 0 unreadable" in report and rare in report
    assert report.count("n/a = undefined") == 1 and "micro avg" not in report  # = accuracy
    assert "selected on" not in report
    assert {r["path"] for r in files.read_csv(out / "predictions.csv")} == \
        {r[0] for r in rows if r[4] == "test"}
    assert files.read_csv(out / "outliers.csv")
    with Image.open(out / "outliers.png") as im:  # thumbnails read from the zip, not grey
        assert im.getpixel((90, 90)) not in (pages.GREY, (255, 255, 255))
    crnn.main(["--eval", "--ckpt", str(out / "best.pt"), "--split", "dev", "--workers", "0"])
    assert "note: best.pt was selected on this dev split" in (out / "report.txt").read_text()
    msg = crnn_error(capsys, ["--eval", "--ckpt", str(out / "best.pt"), "--split", "val"])
    assert "no labelled rows with split val (splits here: dev, test, train" in msg
    msg = crnn_error(capsys, ["--train", "--data", str(tmp_path / "m.csv"), "--tasks", "colour"])
    assert "--tasks 'colour'" in msg


@pytest.mark.xdist_group("trained")
def test_crnn_eval_html_report(trained, demo, tmp_path, capsys):
    out = tmp_path / "eval"
    crnn.main(["--eval", "--ckpt", str(trained / "best.pt"), "--outliers", "5", "--out", str(out),
               "--workers", "0"])
    p = check_page(out / "report.html")
    text = (out / "report.html").read_text(encoding="utf-8")
    found = files.read_csv(out / "outliers.csv")
    summary = json.loads((out / "metrics.json").read_text())
    assert p.classes["outlier"] == len(found) > 0
    assert p.tags["img"] == 2 * len(found)  # what the model saw, and its attention over it
    assert p.classes["cm"] == 3 and text.count('<td style="background') == 6 * 6 + 6 * 6 + 4 * 4
    assert "model: resnet18 + lstm 256, 64 px" in text and "val split" in text
    for t, s in summary.items():
        assert f"{s['macro']['f1']:.3f}" in text and f"{s['top3']:.3f}" in text
        assert f"<h2>{t}: {s['n']} labelled images</h2>" in text
    assert "title=\"true " in text and "\u2192 predicted" in text  # a cell's hover names its pair
    for r in found:
        assert html.escape(r["path"]) in text
    # an outlier whose file no longer decodes: a grey card, counted, not a crash
    gone = {"path": "gone.jpg", "task": "style", "true": "A", "pred": "B", "p_true": 0.1,
            "p_pred": 0.8, "score": 0.7}
    model, _ = crnn.load_checkpoint(str(trained / "best.pt"))
    crnn.look_at_outliers(model, [gone], str(demo / "images"), 64, torch.device("cpu"))
    res = {"style": {"report": summary["style"], "top3": 0.5, "confusion": np.eye(6, dtype=int)}}
    res["style"]["report"]["per_class"] = summary["style"]["per_class"]
    pages.eval_page(str(tmp_path / "gone.html"), ["x"], res, [gone], 1)
    p = check_page(tmp_path / "gone.html")
    assert p.classes["outlier"] == 1 and "1 image(s) no longer decode" in \
        (tmp_path / "gone.html").read_text(encoding="utf-8")


def patch_images(n, seed, present=0.5, rows=4, cols=6):
    """n images (3, 8 rows, 8 cols) that are flat 0 except, in a fraction `present` of them, one
    8 x 8 px cell of +-1 noise (the backbone below sees it as one cell); label 1 = has it."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 8 * rows, 8 * cols), np.float32)
    y = (rng.random(n) < present).astype(np.int64)
    cell = rng.integers(0, rows * cols, n)
    for i in np.flatnonzero(y):
        r, c = divmod(int(cell[i]), cols)
        x[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = rng.choice([-1.0, 1.0], (8, 8))
    return torch.from_numpy(x), torch.from_numpy(y), cell


def test_crnn_attention_finds_the_textured_patch():
    """A CRNN with a tiny trunk (an 8 px cell -> one position of a 4 x 6 grid, not square, so a
    transposed map would show) trained 40 steps to tell whether an image has a noise patch.
    Measured over seeds 0-11: every map puts its peak on the patch. (When the label is the
    patch's orientation instead, the model may recognise one class by the patch's absence, or
    read the patch from the RNN's memory at the sequence ends: the peak lands on the patch in
    only about half the images; attention shows what the model used, not where the object is.)"""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 2, stride=2), torch.nn.ReLU())
    model = crnn_model.CRNN({"patch": 2}, trunk, hidden=8, rnn="lstm", dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        x, y, _ = patch_images(32, 100 + step)
        loss = torch.nn.functional.cross_entropy(model(x)["patch"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, cell = patch_images(48, 1, present=1.0)
    a = crnn.attention_maps(model, x)
    assert a.shape == (48, 4, 6)
    np.testing.assert_allclose(a.sum((1, 2)), 1.0, atol=1e-5)
    assert (model(x)["patch"].argmax(1) == 1).all()
    assert (a.reshape(48, -1).argmax(1) == cell).all()
    assert a.max((1, 2)).min() > 3 / 24  # well above uniform (1/24)


class LinearToy(torch.nn.Module):
    """backbone: a 1x1 conv (A = W x); head: the grid mean of A times V. Linear, so Grad-CAM
    has a closed form: d logit_c / d A_k(i, j) = V[c, k] / (h w) at every cell."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False))
        self.heads = torch.nn.ModuleDict({"style": torch.nn.Linear(4, 3)})

    def forward(self, x):
        return {"style": self.heads["style"](self.backbone(x).mean((2, 3)))}


def test_crnn_gradcam_linear_toy_equals_hand():
    torch.manual_seed(0)
    model = LinearToy().eval()
    x, h, w = torch.randn(2, 3, 5, 7), 5, 7
    cam, cls = crnn.grad_cam(model, x, "style", torch.tensor([2, 0]))
    W, V = model.backbone[0].weight[:, :, 0, 0].detach(), model.heads["style"].weight.detach()
    A = torch.einsum("kc,bchw->bkhw", W, x)
    alpha = V[[2, 0]] / (h * w)  # (2, 4): per image, per channel
    want = torch.relu((alpha[:, :, None, None] * A).sum(1))
    assert cam.shape == (2, 5, 7) and cls.tolist() == [2, 0] and want.max() > 0
    np.testing.assert_allclose(cam, want.numpy(), rtol=1e-5, atol=1e-6)
    _, top = crnn.grad_cam(model, x, "style")  # no class: the predicted one
    assert top.tolist() == model(x)["style"].argmax(1).tolist()
    assert all(p.grad is None for p in model.parameters())  # hooks removed, no grads left


@pytest.mark.xdist_group("trained")
def test_crnn_predict_explain_writes_pngs(trained, demo, tmp_path, capsys):
    src = sorted((demo / "images" / "Cubism").iterdir())[:2]
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    (pics / "a.jpg").write_bytes(src[0].read_bytes())
    (pics / "sub" / "a.jpg").write_bytes(src[1].read_bytes())  # the same name twice
    crnn.main(["--predict", str(pics), "--ckpt", str(trained / "best.pt"), "--explain",
               "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    names = sorted(os.listdir(tmp_path / "o" / "explain"))
    assert names == sorted(f"{s}_{t}.png" for s in ("a", "a-2")
                           for t in ("style", "artist", "genre"))
    for n in names:
        assert str(tmp_path / "o" / "explain" / n) in out
        with Image.open(tmp_path / "o" / "explain" / n) as im:
            assert im.width == 10 + 3 * (pages.PANEL + 10) and im.height > pages.PANEL
    assert out.count("  explained: ") == 2
    assert "--explain goes with --predict" in crnn_error(
        capsys, ["--eval", "--explain", "--ckpt", str(trained / "best.pt")])


# ---------------------------------------------------------------------------------------- bad input

def test_crnn_and_retrieve_take_both_spellings():
    """The manifest and the image folder are --data/--root in crnn.py and --manifest/--images
    in retrieve.py: each script takes the other's spelling for the same thing."""
    for parser, mode, dests in ((crnn.build_parser(), "--train", ("data", "root")),
                                (retrieve.build_parser(), "--build", ("manifest", "images"))):
        for flags in (("--data", "--root"), ("--manifest", "--images")):
            args = parser.parse_args([mode, flags[0], "m.csv", flags[1], "pics"])
            assert (getattr(args, dests[0]), getattr(args, dests[1])) == ("m.csv", "pics"), flags



def test_a_device_this_machine_lacks_is_one_line(demo, capsys, monkeypatch):
    """--device cuda on a machine without a usable GPU (a CPU runtime in Colab, a typo) used to
    end in torch's traceback at the first .to(device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for flag, said in [("cuda", "this machine has no CUDA GPU that torch can use"),
                       ("cuda:1", "this machine has no CUDA GPU that torch can use"),
                       ("mps", "MPS (Apple GPU) is not available here"),
                       ("gpu", "not a device name (cpu, cuda, cuda:N or mps)")]:
        msg = crnn_error(capsys, ["--eval", "--device", flag])
        assert msg.startswith(f"crnn.py: error: --device {flag}: {said}"), msg
        assert said in retrieve_error(["--query", str(demo / "gallery.csv"), "--device", flag])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert nets.check_device("cuda:1") == torch.device("cuda", 1)
    assert "there are 2 CUDA GPUs (cuda:0 to cuda:1)" in crnn_error(capsys, ["--eval",
                                                                         "--device", "cuda:2"])
    assert nets.check_device("cpu") == torch.device("cpu")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.xdist_group("trained")
def test_crnn_bad_input_is_one_line(trained, demo, tmp_path, capsys):
    best = str(trained / "best.pt")
    msg = crnn_error(capsys, ["--train", "--data", str(tmp_path / "nope.csv"), *CRNN_FAST])
    assert "manifest not found" in msg
    (tmp_path / "nolabels.csv").write_text("path,split\na.jpg,train\n")
    msg = crnn_error(capsys, ["--train", "--data", str(tmp_path / "nolabels.csv"), *CRNN_FAST])
    assert "no label column" in msg
    other = json.loads((demo / "classes.json").read_text())
    other["style"] = other["style"][::-1]
    (tmp_path / "classes.json").write_text(json.dumps(other))
    msg = crnn_error(capsys, ["--eval", "--ckpt", best, "--data", str(demo / "manifest.csv"),
                                  "--classes", str(tmp_path / "classes.json"), "--out",
                                  str(tmp_path)])
    assert f"style classes differ from those of checkpoint {best} (6 vs 6)" in msg
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    msg = crnn_error(capsys, ["--eval", "--ckpt", str(tmp_path / "other.pt")])
    assert "not a crnn.py checkpoint" in msg
    (tmp_path / "junk.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    msg = crnn_error(capsys, ["--eval", "--ckpt", str(tmp_path / "junk.pt")])
    assert msg.endswith("junk.pt: not a file that torch.save wrote, or one cut short or damaged")
    assert "weights_only" not in msg  # torch's hint to load it unsafely is not passed on
    assert "checkpoint not found" in crnn_error(capsys, ["--predict", best, "--ckpt",
                                                             str(tmp_path / "none.pt")])
    (tmp_path / "fake.jpg").write_text("not an image")
    msg = crnn_error(capsys, ["--predict", str(tmp_path / "fake.jpg"), "--ckpt", best])
    assert "not an image (cannot decode" in msg
    (tmp_path / "empty").mkdir()
    assert "no images in" in crnn_error(capsys, ["--predict", str(tmp_path / "empty"),
                                                 "--ckpt", best])
    png_bomb(tmp_path / "bomb.png", 12000, 12000)
    msg = crnn_error(capsys, ["--predict", str(tmp_path / "bomb.png"), "--ckpt", best])
    assert "not an image (too large to decode" in msg
    with pytest.raises(SystemExit) as e:  # argparse choices: usage + one error line, status 2
        crnn.main(["--train", "--backbone", "vgg16"])
    assert e.value.code == 2 and "invalid choice: 'vgg16'" in capsys.readouterr().err
    train = ["--train", "--data", str(demo / "manifest.csv"), *CRNN_FAST]
    assert "--epochs 0: must be >= 1" in crnn_error(capsys, [*train, "--epochs", "0"])
    assert "--lr -0.1: must be >= 0" in crnn_error(capsys, [*train, "--lr", "-0.1"])
    msg = crnn_error(capsys, [*train, "--backbone", "resnet34", "--out", str(trained)])
    assert f"{trained} holds another run (--backbone resnet18)" in msg  # nothing overwritten


# ============================================================================
# aspects: pose and face descriptors, verification, light and layout, the keypoint detector


def posed(k, scale=1.0, deg=0.0, shift=(0.0, 0.0), mirror=False):
    """Figures (.., 17, 3) turned by deg (+ clockwise as seen), scaled, shifted, and flipped
    left-right first (x -> -x, left and right joints swapped) when mirror."""
    k = aspects.mirrored(k) if mirror else np.array(k, np.float64)
    z = (k[..., 0] + 1j * k[..., 1]) * scale * np.exp(1j * math.radians(deg)) + complex(*shift)
    k = k.copy()
    k[..., 0], k[..., 1] = z.real, z.imag
    return k


def pose_gallery(rng, n_images):
    """(figures (f, 17, 3), image of each (f,)): 1 or 2 demo poses per image, in pixels."""
    figs, img = [], []
    for i in range(n_images):
        for j in range(int(rng.integers(1, 3))):
            at = (60 + 150 * j + rng.uniform(-20, 20), rng.uniform(80, 120))
            figs.append(posed(painter.demo_pose(rng), rng.uniform(20, 40), shift=at))
            img.append(i)
    return np.stack(figs), np.array(img)


def test_aspects_pose_copy_translated_scaled_mirrored_is_nearest():
    rng = np.random.default_rng(0)
    G = np.stack([posed(painter.demo_pose(rng, f, mirror=False), 30, shift=(200, 150))
                  for f in painter.POSE_FAMILIES for _ in range(40)])
    src = G[5 * 40]  # pointing: one arm out, so its mirror image is another pose
    copy = posed(src, 2.5, shift=(-400, 90))
    assert aspects.pose_similarity(copy, src[None])[0] == pytest.approx(1.0)
    for q, mirror in ((copy, False), (posed(src, 0.7, shift=(30, 5), mirror=True), True)):
        assert np.argmax(aspects.pose_similarity(q, G, mirror=mirror)) == 5 * 40
        S = aspects.query_rows(q[None], mirror, turns=(0.0,)) @ aspects.pose_vectors(G).T
        assert np.argmax(S.max(0)) == 5 * 40 and S.max() == pytest.approx(1.0, abs=1e-5)
    flipped = posed(src, 1.0, mirror=True)  # without the flag, a mirror image is another pose
    assert aspects.pose_similarity(flipped, src[None])[0] < 0.9
    assert aspects.pose_similarity(flipped, src[None], mirror=True)[0] == pytest.approx(1.0)


def test_aspects_masked_joints_do_not_pull_unrelated_poses_together():
    """A query hiding its legs must find its own pose, legs shown, before 50 other poses that
    hide their legs too: a hidden joint is masked, not a joint at 0 (zero filling, checked
    below, fails every time)."""
    legs = [13, 14, 15, 16]
    for seed in range(12):
        rng = np.random.default_rng(seed)
        family = painter.POSE_FAMILIES[seed % 6]
        own = painter.demo_pose(rng, family, mirror=False, hide=())
        others = [f for f in painter.POSE_FAMILIES if f != family]
        G = np.stack([own] + [painter.demo_pose(rng, others[i % 5], mirror=False, hide=legs)
                              for i in range(50)])
        q = posed(own, 1.3, shift=(5, 5))
        q[legs, 2] = 0
        assert np.argmax(aspects.pose_similarity(q, G)) == 0
        assert np.argmax(aspects.pose_queries(q) @ aspects.pose_vectors(G).T) == 0
        P, _ = aspects.normalise_pose(np.concatenate([q[None], G]))  # hidden joints as zeros
        assert np.argmin(((P[1:] - P[0]) ** 2).sum((1, 2))) != 0
    few = np.zeros((17, 3))
    few[[0, 1, 2], 2] = 1  # three joints in common are too few to call anything a match
    assert aspects.pose_similarity(few, own[None])[0] == -1


def test_aspects_pose_rows_stand_figures_up_but_keep_lying_apart():
    """A figure turned by any angle stands up to the same joints (so a query needs only a few
    small turns), while the rows' angle columns still rank the copy turned 15 degrees above the
    same pose lying down (90): turned within the picture is the same pose, lying is another."""
    rng = np.random.default_rng(4)
    src = posed(painter.demo_pose(rng, "pointing", mirror=False, hide=()), 30, shift=(200, 150))
    P, there = aspects.normalise_pose(src)
    up, a = aspects.upright(P, there)
    for deg in (15.0, 90.0, -140.0):
        Pt, tt = aspects.normalise_pose(posed(src, 1.4, deg, (40, -30)))
        up_t, a_t = aspects.upright(Pt, tt)
        assert np.abs(up_t - up).max() < 1e-9  # the same joints, stood up
        assert math.degrees(a_t[0] - a[0]) % 360 == pytest.approx(-deg % 360)
    G = np.stack([posed(src, 1.0, d) for d in (90.0, 15.0, -90.0, 180.0)])
    s = aspects.query_rows(src[None], turns=(0.0,)) @ aspects.pose_vectors(G).T
    assert np.argmax(s[0]) == 1 and s[0, 1] > 0.99 and s[0, 1] - s[0, [0, 2, 3]].max() > 0.1
    # the score equals the masked score and the angle's cosine, weighted
    masked = 1 - ((up - aspects.upright(*aspects.normalise_pose(G[:1]))[0]) ** 2).sum((1, 2)) \
        / (17 * aspects.POSE_TAU ** 2)
    want = (1 - aspects.ANGLE_WEIGHT) * masked[0] + aspects.ANGLE_WEIGHT * math.cos(
        math.radians(90))
    assert s[0, 0] == pytest.approx(want, abs=1e-5)


def test_figure_index_ivf_over_euclidean_rows_equals_inner_product(monkeypatch,
                                                                   one_faiss_thread):
    """by.FigureIndex's IVF form (rows made Euclidean, queries scaled): probing every list, the
    ids and scores of the flat inner-product search; at its nprobe, most of them."""
    monkeypatch.setattr(by, "POSE_IVF_FROM", 1000)
    monkeypatch.setattr(by, "POSE_NPROBE", 8)
    rng = np.random.default_rng(5)
    G, _ = pose_gallery(rng, 1200)
    raw = by.pose_index(G)
    assert isinstance(raw, faiss.IndexIVFFlat) and raw.d == aspects.POSE_DIM + 1
    ours = by.FigureIndex(raw)
    flat = faiss.IndexFlatIP(aspects.POSE_DIM)
    flat.add(aspects.pose_vectors(G))
    xq = aspects.query_rows(G[rng.choice(len(G), 20, replace=False)], mirror=True)
    D0, I0 = flat.search(xq, 20)
    D8, I8 = ours.search(xq, 20)
    assert np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(I0, I8, strict=True)]) > 0.8
    raw.nprobe = raw.nlist
    D, I = ours.search(xq, 20)
    assert (I == I0).mean() > 0.99 and D == pytest.approx(D0, abs=1e-4)
    empty = by.FigureIndex(by.pose_index(G[:0]))
    assert empty.search(xq[:2], 3)[1].shape == (2, 3)


def test_aspects_verify_recovers_a_similarity_transform():
    rng = np.random.default_rng(3)
    q = posed(painter.demo_pose(rng, "pointing", mirror=False, hide=()), 40, shift=(100, 120))
    for mirror in (False, True):
        c = posed(q, 1.7, 15, (30, -20), mirror=mirror)
        c[..., :2] += rng.normal(0, 0.5, (17, 2))  # px
        c[[3, 9, 14], :2] += [[40, 10], [-35, 30], [25, 25]]  # three joints far off
        score, T = aspects.verify(q[None], [c[None], np.zeros((0, 17, 3)), q[None]],
                                  mirror=True)
        s, deg, tx, ty, flipped = T[0]
        assert (s, deg, flipped) == (pytest.approx(1.7, abs=0.02), pytest.approx(15, abs=0.6),
                                     mirror)
        assert (tx, ty) == (pytest.approx(30, abs=3), pytest.approx(-20, abs=3))
        assert 0.75 < score[0] < 0.9 and score[1] == 0  # 14 of 17 joints on; no figures
        own = c[aspects.FLIP] if mirror else c  # a mirrored figure's left is its right
        on = np.setdiff1d(np.arange(17), aspects.FLIP[[3, 9, 14]] if mirror else [3, 9, 14])
        assert np.abs(aspects.transform_points(T[0], q[:, :2])[on] - own[on, :2]).max() < 3
        if mirror:  # not allowed to flip: no transform fits as well
            assert aspects.verify(q[None], [c[None]], mirror=False)[0][0] < score[0] - 0.3
    two = np.stack([q, posed(painter.demo_pose(rng, "sitting", hide=()), 30, shift=(300, 90))])
    c = posed(two, 0.8, -10, (-50, 40))
    decoy = posed(painter.demo_pose(rng, "arms_raised", hide=()), 25, shift=(0, 100))
    score, T = aspects.verify(two, [np.concatenate([decoy[None], c[::-1]])])
    assert score[0] == pytest.approx(1.0) and T[0, :2] == pytest.approx([0.8, -10])
    assert aspects.verify(two, [c[:1]])[0][0] == pytest.approx(0.5, abs=0.05)  # one of two


def head(nose=None, left_eye=None, right_eye=None, left_ear=None, right_ear=None):
    """A figure whose only joints are the given head points (x, y)."""
    k = np.zeros((17, 3))
    for j, p in enumerate((nose, left_eye, right_eye, left_ear, right_ear)):
        if p is not None:
            k[j] = [*p, 1]
    return k


def test_aspects_face_yaw_sign_and_class():
    """Heads drawn by hand: the figure's left eye and ear sit on the viewer's right when it
    faces us; a face turned to the viewer's right has its nose right of its ears, shows its
    right ear and hides its left."""
    heads = {"frontal": head((50, 55), (58, 45), (42, 45), (68, 50), (32, 50)),
             "three-quarter right": head((62, 55), (64, 45), (52, 45), None, (36, 50)),
             "right": head((70, 55), (62, 45), None, None, (40, 50)),
             "back": head(None, None, None, (70, 50), (30, 50)),
             "none": head((50, 55))}
    yaw, roll, names = aspects.face_orientation(np.stack(list(heads.values())))
    assert names == ["frontal", "three-quarter right", "right", "back", None]
    assert abs(yaw[0]) < 10 and 15 < yaw[1] < 60 and 60 < yaw[2] < 120 and abs(yaw[3]) > 150
    assert np.isnan(yaw[4]) and roll[0] == pytest.approx(0)
    left = posed(np.stack(list(heads.values())[:3]), mirror=True)  # the same heads, flipped
    yaw_l, _, names_l = aspects.face_orientation(left)
    assert names_l == ["frontal", "three-quarter left", "left"]
    assert yaw_l == pytest.approx(-yaw[:3])
    tilted = posed(heads["frontal"], deg=20)  # clockwise as seen: the left eye lower
    yaw_t, roll_t, _ = aspects.face_orientation(tilted)
    assert roll_t[0] == pytest.approx(20) and abs(yaw_t[0]) < 10
    v = aspects.face_vectors(np.stack([heads["three-quarter right"], heads["right"],
                                       left[2], heads["none"]]))
    sims = v[0] @ v.T
    assert sims[1] > 0.5 > sims[2] and sims[3] == 0  # the same way first; no face, no match


def test_aspects_demo_poses_query_finds_its_transformed_copy_first(one_faiss_thread):
    """The pose protocol in small: images of 1-2 demo figures; each query is one image's
    figures scaled, turned up to 20 degrees, mirrored half the time, jittered, two joints
    dropped per figure; searched as the wiring will (FAISS rows, exact re-rank, image scores,
    verification of the top 50): its source image comes first."""
    rng = np.random.default_rng(0)
    G, img = pose_gallery(rng, 150)
    index = faiss.IndexFlatIP(aspects.POSE_DIM)
    index.add(aspects.pose_vectors(G))
    for t in range(20):
        src = int(rng.integers(150))
        Q = posed(G[img == src], rng.uniform(0.6, 1.6), rng.uniform(-20, 20),
                  rng.uniform(-50, 50, 2), mirror=t % 2 == 1)
        Q[..., :2] += rng.normal(0, 0.02, Q[..., :2].shape) * \
            aspects.body_size(Q, Q[..., 2] > 0)[:, None, None]
        for k in Q:
            k[rng.choice(np.flatnonzero(k[:, 2] > 0), 2, replace=False), 2] = 0
        _, I = index.search(aspects.query_rows(Q, mirror=True), 50)
        cand = np.unique(I)
        S = np.stack([aspects.pose_similarity(q, G[cand], mirror=True) for q in Q])
        images, _ = aspects.image_scores(S, img[cand])
        score, _ = aspects.verify(Q, [G[img == i] for i in images[:50]], mirror=True)
        assert images[np.argmax(score)] == src, t


def test_aspects_image_scores_hand():
    S = np.array([[0.9, 0.2, 0.5, 0.1],
                  [0.1, 0.8, 0.3, 0.7]])  # 2 query figures x 4 figures of images 7, 7, 3, 5
    images, scores = aspects.image_scores(S, [7, 7, 3, 5])
    assert images.tolist() == [7, 3, 5] and scores == pytest.approx([0.85, 0.4, 0.4])
    images, scores = aspects.image_scores(S, [7, 7, 3, 5], weights=[1, 3])
    assert images.tolist() == [7, 5, 3] and scores == pytest.approx([0.825, 0.55, 0.35])


def lit(side, seed, size=(96, 72), gain=1.0):
    """A painting-like image lit from the left or right: smooth colour blobs under a ramp."""
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(rng.integers(40, 200, (4, 5, 3), dtype=np.uint8)).resize(
        size, Image.BICUBIC), np.float64)
    ramp = np.linspace(1.3, 0.35, size[0]) if side == "left" else np.linspace(0.35, 1.3, size[0])
    return Image.fromarray(np.clip(base * ramp[None, :, None] * gain, 0, 255).astype(np.uint8))


def test_aspects_light_left_right_and_exposure():
    left, right = aspects.light_features(lit("left", 0)), aspects.light_features(lit("right", 0))
    assert left[36] < -0.5 < 0.5 < right[36]  # the bright side's x, + right
    assert aspects.light_summary(left).startswith("light from the left")
    assert aspects.light_summary(right).startswith("light from the right")
    dark = aspects.light_features(lit("left", 0, gain=0.5))  # the same, photographed darker
    F = np.stack([left, right, dark] + [aspects.light_features(lit(s, seed))
                                        for seed in range(1, 9) for s in ("left", "right")])
    V = aspects.light_vector(F)
    assert np.linalg.norm(V, axis=1) == pytest.approx(np.ones(len(F)), abs=1e-5)
    sims = V @ V[0]
    assert np.argsort(-sims)[1] == 2 and sims[2] > 0.99 and sims[1] < 0.5
    assert np.mean(sims[3::2]) > np.mean(sims[4::2]) + 0.5  # lit from the left: the same side
    assert np.abs(dark[:36] - left[:36]).max() < 0.03  # the layout part ignores exposure
    warm = np.asarray(lit("left", 0), np.float64) * [1.2, 1.0, 0.7]
    assert aspects.light_summary(aspects.light_features(np.clip(warm, 0, 255))).endswith("warm")
    key = np.full((60, 60), 30, np.uint8)
    key[20:40, 20:40] = 230  # dark, with one bright patch: low key
    assert ", low key" in aspects.light_summary(aspects.light_features(np.stack([key] * 3, -1)))


def test_aspects_layout_vector_tells_compositions_apart():
    rng = np.random.default_rng(0)

    def horizon(y, seed):  # a light sky over dark ground, hues at random
        a = np.zeros((80, 100, 3))
        c = np.random.default_rng(seed).uniform([[140], [20]], [[240], [120]], (2, 3))
        a[:y], a[y:] = c[0], c[1]
        return (a + rng.normal(0, 4, a.shape)).clip(0, 255).astype(np.uint8)

    stripes = np.zeros((80, 100, 3), np.uint8)
    stripes[:, ::20] = stripes[:, 1::20] = 200
    V = np.stack([aspects.layout_vector(im) for im in
                  (horizon(40, 0), horizon(45, 1), stripes, horizon(40, 0) // 2)])
    assert np.linalg.norm(V, axis=1) == pytest.approx(np.ones(4), abs=1e-5)
    assert V[0] @ V[1] > V[0] @ V[2] + 0.3  # another horizon before verticals
    assert V[0] @ V[3] > 0.99  # a darker copy: the same composition


def test_aspects_detector_runs_from_a_state_dict_path(tmp_path, monkeypatch):
    """Random-init weights saved as a state_dict and passed by path, on small images: the
    figures' contract (it may find nothing real: the weights are random), and each bad
    weights argument as one line in nets.load_weights' words."""
    path = tmp_path / "kp.pth"
    torch.save(aspects.load_detector("none", min_size=64, seed=1).state_dict(), path)
    model = aspects.load_detector(str(path), min_size=64)
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (48 + 16 * i, 64, 3),
                                                             dtype=np.uint8)) for i in range(3)]
    out = aspects.detect(model, ims, torch.device("cpu"), batch=2, threshold=0.0, most=3)
    assert len(out) == 3 and 0 < sum(map(len, out)) <= 9  # threshold 0: random boxes pass
    for im, figures in zip(ims, out, strict=True):
        for f in figures:
            assert f["keypoints"].shape == (17, 3) and f["box"].shape == (4,)
            assert 0 <= f["box"][0] <= f["box"][2] <= im.width and 0 <= f["score"] <= 1
            assert ((f["keypoints"][:, 2] >= 0) & (f["keypoints"][:, 2] <= 1)).all()
    assert aspects.detect(model, ims[:1], torch.device("cpu"), threshold=1.0) == [[]]
    assert model.transform.min_size == (64,)  # the input size asked for
    with pytest.raises(files.UserError, match="--pose-weights none or --pose-weights PATH"):
        monkeypatch.setattr(torchvision.models.detection.KeypointRCNN_ResNet50_FPN_Weights
                            .COCO_V1.__class__, "get_state_dict", lambda *a, **k: (_ for _ in (
                                )).throw(urllib.error.URLError("Name or service not known")))
        aspects.load_detector("coco", min_size=64)
    with pytest.raises(files.UserError, match="--pose-weights r18.pth: not a torchvision "
                                             "keypointrcnn_resnet50_fpn state_dict"):
        aspects.load_detector_state(model, torchvision.models.resnet18().state_dict(), "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(files.UserError) as e:
        aspects.load_detector(str(tmp_path / "junk.pth"))
    assert str(e.value) == f"--pose-weights {tmp_path / 'junk.pth'}: not a state_dict"
    with pytest.raises(files.UserError, match="file not found .or use --pose-weights coco.none"):
        aspects.load_detector(str(tmp_path / "none.pth"))


# ============================================================================
# retrieve: FAISS indexes on seeded vectors (index.py), then CPU runs of main() on demo data
# (retrieve.py with embed.py and retrieve_eval.py)


# --------------------------------------------------------------------------- faiss layer (index.py)


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
    with pytest.raises(files.UserError, match="--pca"):
        retrieve.index_from_vectors(xb[:10], index_args("--pca", "16"))


@pytest.fixture
def emulated_gpu(monkeypatch):
    """faiss-cpu made to look like a GPU build with two GPUs: 'copies to a GPU' that clone (as
    FAISS's GPU cloner would, they cannot clone a NormalizationTransform). Yields what was
    copied, as (index, GPU number or 'all')."""
    copied = []

    def to_gpu(res, device, index, co):
        assert isinstance(res, Resources)  # a GpuResources, not a stray argument
        copied.append((index, device))
        return faiss.clone_index(index)

    def to_all_gpus(index, co):
        copied.append((index, "all"))
        return faiss.clone_index(index)

    class Resources:
        pass
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", types.SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", types.SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return copied


@pytest.mark.parametrize("flags", [[], ["--pca", "16"]], ids=["flat", "pca"])
def test_retrieve_gpu_copy_answers_as_the_cpu_index(emulated_gpu, capsys, flags):
    xb, xq = clustered(3000, 64, 1), clustered(50, 64, 2)
    icfg, index = retrieve.index_from_vectors(xb, index_args(*flags))
    on_gpu = retrieve.to_search_device(index, icfg, torch.device("cuda"))
    assert isinstance(on_gpu, faiss_index.OnGpu) and len(emulated_gpu) == 1
    assert not isinstance(emulated_gpu[0][0], faiss.IndexPreTransform)  # the inner index only
    for k in (10, 2500):  # 2500 > GPU_MAX: answered by the CPU index, with a note
        (D, I), (Dc, Ic) = on_gpu.search(xq, k), index.search(xq, k)
        assert (I == Ic).all()
        np.testing.assert_allclose(D, Dc, atol=1e-5)
    assert capsys.readouterr().out.count("searching on the CPU") == 1


def test_retrieve_gpu_index_on_the_device_gpu_only(emulated_gpu, built, monkeypatch, capsys):
    """--device cuda:1 on a two-GPU machine: torch's current GPU becomes 1 (the pin-memory
    thread and cuDNN open no context on GPU 0) and the index goes to GPU 1 alone, where it
    went to every GPU (index_cpu_to_all_gpus) whatever --device said; plain cuda: the current
    GPU; every GPU only with --all-gpus."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    device = nets.pick_device("cuda:1")
    assert current == [torch.device("cuda", 1)]
    parse = retrieve.build_parser().parse_args
    for flags, want in [(["--device", "cuda:1"], 1), (["--device", "cuda"], 0),
                        (["--device", "cuda:1", "--all-gpus"], "all")]:
        args = parse(["--query", "x.jpg", "--index", str(built), *flags])
        dev = torch.device(args.device)
        on_gpu = retrieve.open_for_search(args, dev)[3]
        assert isinstance(on_gpu, faiss_index.OnGpu) and emulated_gpu[-1][1] == want, flags
    assert [d for _, d in emulated_gpu] == [1, 0, "all"] and device == torch.device("cuda", 1)
    out = capsys.readouterr().out
    assert "index on GPU 1" in out and "index on all 2 GPUs" in out
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun, init_distributed sets the GPU
    nets.pick_device("cuda:1")
    assert len(current) == 1


def test_retrieve_gpu_copy_failure_stays_on_the_cpu(emulated_gpu, monkeypatch, capsys):
    icfg, index = retrieve.index_from_vectors(clustered(500, 32, 1), index_args("--pca", "8"))
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda *a: (_ for _ in ()).throw(
        RuntimeError("Error: GPU index only supports 8 bits per code (simulated)")))
    assert retrieve.to_search_device(index, icfg, torch.device("cuda")) is index
    assert "the index stays on the CPU (Error: GPU index only supports" in capsys.readouterr().out
    monkeypatch.undo()  # a copy that works again, but an nprobe the GPU refuses
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    icfg, index = retrieve.index_from_vectors(clustered(400, 16, 1), index_args(
        "--index-type", "ivf-flat", "--nlist", "8"))
    faiss_index.inner(index).nprobe = 3000
    assert retrieve.to_search_device(index, icfg, torch.device("cuda")) is index
    assert "--nprobe 3000 > 2048" in capsys.readouterr().out


def test_retrieve_ivfpq_refuses_tiny_collection():
    with pytest.raises(files.UserError, match="ivfpq cannot train"):
        retrieve.index_from_vectors(clustered(300, 32, 1), index_args("--index-type", "ivfpq"))


@pytest.mark.parametrize("flags", [["--index-type", "ivfpq"],
                                   ["--index-type", "ivf-flat", "--pca", "16"]],
                         ids=["ivfpq", "ivf-flat-pca"])
def test_retrieve_shards_merge_exactly_like_one_index(flags, tmp_path, one_faiss_thread):
    """Train once, add 3 shards to copies of the trained index (written and read back), merge:
    the same D and I as the index built in one go, at nprobe 4 of 51 lists (approximate)."""
    xb, xq = clustered(2000, 32, 1), clustered(200, 32, 2)
    args = index_args(*flags, "--nprobe", "4")
    icfg, one = retrieve.index_from_vectors(xb, args)
    trained = retrieve.new_index(icfg)
    retrieve.train_index(trained, xb, args.seed)
    faiss_index.write_faiss(trained, str(tmp_path / "trained.faiss"))
    paths = [str(tmp_path / f"index.shard-{i}.faiss") for i in range(3)]
    for i, path in enumerate(paths):
        lo, hi = nets.rank_part(len(xb), i, 3)
        shard = faiss.read_index(str(tmp_path / "trained.faiss"))
        retrieve.add_rows(shard, xb[lo:hi])
        faiss_index.write_faiss(shard, path)
    merged = retrieve.merge_indexes(str(tmp_path / "trained.faiss"), paths)
    retrieve.set_search_params(merged, icfg["index_params"])
    p = icfg["index_params"]
    assert merged.ntotal == 2000 and (p["nlist"], p["nprobe"]) == (51, 4)
    (D1, I1), (D2, I2) = one.search(xq, 10), merged.search(xq, 10)
    assert (I1 == I2).all()
    # PQ codes are equal bit for bit; PCA-projected full vectors may differ in the last bit,
    # since BLAS projects 3 shards and 1 whole in blocks of other sizes
    np.testing.assert_allclose(D1, D2, atol=1e-6)
    assert faiss_index.trained_digest(merged) == faiss_index.trained_digest(one)


# -------------------------------------------------------------------------------------- --where

WHERE_META = [{"path": f"{i}.jpg", "style": s, "year": y, "artist": a}
              for i, (s, y, a) in enumerate([("Baroque", "1650", "Rembrandt"),
                                            ("baroque", "c. 1690", "Vermeer"),
                                            ("Rococo", "1720", "Watteau"),
                                            ("Baroque", "", "Rubens"),
                                            ("Impressionism", "1874", "Monet")])]


def test_where_rows_numbers_text_alternatives_and_errors(capsys):
    rows = lambda *w: filters.where_rows(WHERE_META, list(w)).tolist()  # noqa: E731
    assert rows("style=Baroque") == [0, 1, 3]  # text: any case
    assert rows("year<1700") == [0, 1]  # 'c. 1690' reads as 1690; an empty cell has no number
    assert rows("year>=1720") == [2, 4] and rows("year!=1650") == [1, 2, 3, 4]
    assert rows("artist=rembrandt|VERMEER|nobody") == [0, 1]
    assert rows("style=Baroque", "year<1700", "artist!=vermeer") == [0]
    assert rows(" style = Rococo|Impressionism ") == [2, 4]
    assert filters.where_rows(WHERE_META, None) is None
    with pytest.raises(files.UserError, match=r"no column 'yaer' in meta.csv \(columns: path, "
                       "style, year, artist\\)"):
        rows("yaer<1700")
    with pytest.raises(files.UserError, match=r"keeps none of the 5 rows \(style=Baroque keeps "
                       r"3; year>1800 keeps 1; together 0\)"):
        rows("style=Baroque", "year>1800")
    for bad in ("style", "=Baroque", "year<>1700x"[:0] or "year"):
        with pytest.raises(files.UserError, match="expected COLUMN OP VALUE"):
            rows(bad)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat", "pca"])
@pytest.mark.parametrize("share", [0.03, 0.6])
def test_where_filtered_search_equals_bruteforce_over_kept_rows(kind, share, monkeypatch,
                                                                one_faiss_thread):
    """Both ways: the exact one over the kept rows, and FAISS with an IDSelector (EXACT_MAX 0);
    ids, then scores, as numpy over the kept rows in the index's own space."""
    xb, xq = clustered(2000, 32, 1), clustered(20, 32, 2)
    flags = ["--pca", "16"] if kind == "pca" else ["--index-type", kind, "--ef-search", "2000",
                                                  "--nlist", "16", "--nprobe", "16"]
    _, index = retrieve.index_from_vectors(xb, index_args(*flags))
    keep = np.sort(np.random.default_rng(3).choice(2000, int(2000 * share), replace=False))
    zb, zq = filters.transformed(index, xb), filters.transformed(index, xq)
    S = zq @ zb[keep].T
    want = keep[np.argsort(-S, 1, kind="stable")[:, :10]]
    for exact_max in (filters.EXACT_MAX, 0):
        monkeypatch.setattr(filters, "EXACT_MAX", exact_max)
        D, I = filters.Filtered(index, xb, keep).search(xq, 10)
        assert (I == want).all(), (kind, share, exact_max)
        np.testing.assert_allclose(D, np.take_along_axis(zq @ zb.T, I, 1), atol=1e-4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat"])
def test_where_returns_k_hits_whenever_k_rows_match(kind, monkeypatch):
    """7 kept rows spread over the collection, k 7: an ivf probing 1 list of 16 (or a graph
    search with a beam of 8) finds only some of them; the short queries are answered again
    exactly, so all 7 come back, and a subset counts from 0."""
    monkeypatch.setattr(filters, "EXACT_MAX", 0)
    xb, xq = clustered(2000, 32, 1), clustered(20, 32, 2)
    _, index = retrieve.index_from_vectors(xb, index_args(
        "--index-type", kind, "--nlist", "16", "--nprobe", "1", "--ef-search", "8"))
    keep = np.arange(5, 2000, 285)
    assert len(keep) == 7
    D, I = filters.Filtered(index, xb, keep).search(xq, 7)
    assert (np.sort(I, 1) == keep).all() and np.isfinite(D).all()
    _, P = filters.Filtered(index, xb, keep, positions=True).search(xq, 7)
    assert (keep[P] == I).all()


def test_where_on_query_id_eval_and_map(built, tmp_path, capsys):
    args = ["--index", str(built), "--workers", "0"]
    meta = files.read_csv(built / "gen-1" / "meta.csv") if (built / "gen-1").is_dir() else \
        faiss_index.open_index(str(built))[1]
    cubism = [r["path"] for r in meta if r["style"] == "Cubism"]
    q = meta[0]["path"]
    D, I = found(["--query-id", q, "-k", "5", "--where", "style=Cubism", *args])
    assert I.shape == (1, 5) and all(meta[i]["style"] == "Cubism" for i in I[0])
    assert q not in [meta[i]["path"] for i in I[0]]
    assert f"where: {len(cubism)} of {len(meta)} rows kept" in capsys.readouterr().out
    years = sorted(int(r["displaydate"]) for r in meta)
    mid = years[len(years) // 2]
    res = retrieve.main(["--eval", "--eval-queries", "8", "--where", f"displaydate<{mid}",
                         *args])
    assert res["n"] == sum(y < mid for y in years)
    xy = retrieve.main(["--map", "--html", str(tmp_path / "m.html"), "--where",
                        "style=Cubism", *args])["xy"]
    assert len(xy) == len(cubism)
    msg = retrieve_error(["--query-id", q, "--where", "colour=red", *args])
    assert "no column 'colour' in meta.csv (columns: path," in msg
    assert "keeps none of the" in retrieve_error(["--query-id", q, "--where", "style=Baroque",
                                                  *args])
    assert "--where goes with" in retrieve_error(["--build", "--where", "style=Cubism", *args])


# -------------------------------------------------------------------------------------- main() runs


def test_retrieve_build_save_load_roundtrip(built, demo, capsys):
    cfg, meta, xb, index = retrieve.open_index(str(built))
    assert cfg["version"] == faiss_index.VERSION and cfg["pool"] == "grid" and cfg["n"] == 120
    assert xb.shape == (120, cfg["dim"]) == (120, 512 * 4) and xb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, atol=1e-4)
    gallery = files.read_csv(str(demo / "gallery.csv"))
    assert [r["path"] for r in meta] == [r["path"] for r in gallery]
    assert meta[7]["title"] == gallery[7]["title"]
    D, I = index.search(np.ascontiguousarray(xb[:10]), 3)
    assert (I[:, 0] == np.arange(10)).all()
    # a query rebuilds the same (seeded) model from config.json: the image finds itself
    img = demo / "images" / meta[7]["path"]
    D, I = found(["--query", str(img), "--index", str(built), "-k", "3", "--workers", "0"])
    assert I[0, 0] == 7 and D[0, 0] > 0.99


def test_retrieve_query_prints_k_rows_and_sheet(built, demo, tmp_path, capsys):
    meta = files.read_csv(os.path.join(retrieve.generation(built), "meta.csv"))
    imgs = [str(demo / "images" / meta[i]["path"]) for i in (3, 40)]
    sheet = tmp_path / "sheet.png"
    retrieve.main(["--query", *imgs, "--index", str(built), "-k", "4", "--sheet", str(sheet)])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if re.match(r" +\d+  -?[01]\.\d{3}  \S", ln)]
    assert len(rows) == 8 and out.count("query: ") == 2
    assert "Synthetic" in rows[0]  # title and attribution from gallery.csv
    with Image.open(sheet) as im:
        assert im.width > 5 * pages.THUMB and 2 * pages.THUMB < im.height < 3 * im.width


def test_retrieve_query_id_excludes_itself(built):
    meta = files.read_csv(os.path.join(retrieve.generation(built), "meta.csv"))
    D, I = found(["--query-id", meta[5]["path"], meta[6]["path"], "--index", str(built),
                  "-k", "5", "--sheet", str(built / "qid.png")])
    assert I.shape == (2, 5) and 5 not in I[0] and 6 not in I[1]
    xb = retrieve.open_index(built)[2]
    for row, q in enumerate((5, 6)):  # numpy brute force over the stored vectors, minus itself
        s = xb @ xb[q]
        order = [i for i in np.argsort(-s, kind="stable") if i != q][:5]
        assert I[row].tolist() == order
        np.testing.assert_allclose(D[row], s[order], atol=1e-5)


def test_retrieve_eval_copy_detection_above_chance(built):
    """Random resnet18 + grid pooling at 64 px: measured copy-detection Top-1 0.65, chance
    1/120 = 0.008. The self-retrieval sanity check is exactly 1."""
    res = retrieve.main(["--eval", "--index", str(built), "--workers", "0"])
    assert res["self"]["top1"] == 1.0
    assert res["copy"]["queries"] == 120 and res["copy"]["top1"] >= 0.4
    style = res["labels"]["style"]  # texture: even random conv features beat a random ranking
    assert style["map@10"] > 2 * style["random_map@10"]
    assert set(res["labels"]) == {"style", "genre", "attribution"}  # gallery has no artist
    for r in res["labels"].values():
        assert 0 < r["random_map@10"] < 1 and 0 < r["random_p@5"] < 1
    saved = json.loads((built / "eval.json").read_text())
    assert saved["copy"] == res["copy"]


def test_retrieve_add_equals_build_at_once(built, demo, tmp_path, capsys):
    """Build on the first 80 gallery rows, --add the rest: the same as `built` (all 120 at
    once); fp32 (--no-amp) so that batch composition cannot change a vector. The map drawn
    before the --add is stale after it, and --add says so."""
    rows = files.read_csv(str(demo / "gallery.csv"))
    head = tmp_path / "first80.csv"
    files.write_csv(str(head), list(rows[0]), [list(r.values()) for r in rows[:80]])
    part = str(tmp_path / "part")
    retrieve.main(["--build", "--images", str(demo / "images"), "--manifest", str(head),
                   "--index", part, *RETRIEVE_FAST])
    assert retrieve.open_index(part)[0]["n"] == 80
    retrieve.main(["--map", "--index", part, "-k", "2", "--color-by", "none"])
    capsys.readouterr()
    retrieve.main(["--add", "--manifest", str(demo / "gallery.csv"), "--index", part,
                   "--workers", "0", "--no-amp"])
    assert f"note: {part}/map.html draws gen-1, the index is now gen-2" in capsys.readouterr().out
    a, b = retrieve.open_index(part), retrieve.open_index(str(built))
    assert a[1] == b[1]  # meta rows
    np.testing.assert_allclose(a[2], b[2], atol=1e-5)
    xq = np.ascontiguousarray(b[2][::7])
    (Da, Ia), (Db, Ib) = a[3].search(xq, 10), b[3].search(xq, 10)
    assert (Ia == Ib).all()
    np.testing.assert_allclose(Da, Db, atol=1e-5)
    retrieve.main(["--add", "--index", part, "--workers", "0"])  # nothing new: a no-op
    assert retrieve.open_index(part)[0]["n"] == 120


def test_retrieve_center_spreads_scores_and_queries_alike(built, demo, tmp_path):
    """--center: the collection's mean is taken off every vector (kept in index.faiss, so
    queries are centred the same way) before normalising; embeddings.npy keeps the raw
    vectors. Random features bunch near 1; centred, the nearest other painting's score
    spreads (on the 360-image demo: median 0.999 -> 0.72)."""
    index = str(tmp_path / "centred")
    res = retrieve.main(["--build", "--images", str(demo / "images"), "--manifest",
                         str(demo / "gallery.csv"), "--index", index, *RETRIEVE_FAST, "--center"])
    assert res["config"]["center"] and repr(res) == "<index: 120 images, flat, 2048-d, centred>"
    raw, cen = retrieve.open_index(built), retrieve.open_index(index)
    np.testing.assert_allclose(cen[2], raw[2], atol=1e-5)
    Dr = faiss_index.search(raw[3], raw[2], 2)[0][:, 1]
    Dc = faiss_index.search(cen[3], cen[2], 2)[0][:, 1]
    assert np.median(Dr) > 0.9 and np.median(Dc) < np.median(Dr) - 0.1, (Dr, Dc)
    xc = unit(np.asarray(raw[2], np.float64) - np.asarray(raw[2], np.float64).mean(0))
    s = xc @ xc[3]  # by hand: cosine of the centred vectors
    order = [i for i in np.argsort(-s, kind="stable") if i != 3][:3]
    D, I = found(["--query-id", cen[1][3]["path"], "--index", index, "-k", "3"])
    assert I[0].tolist() == order
    np.testing.assert_allclose(D[0], s[order], atol=1e-4)
    msg = retrieve_error(["--query-id", raw[1][3]["path"], "--index", str(built), "--center"])
    assert "built with --center False" in msg


def test_retrieve_build_from_zip_equals_folder(built, demo, tmp_path):
    """--images a zip read in place, scanned (no manifest): the same vectors as the folder's;
    the query sheet's thumbnails come out of the zip."""
    _, built_meta, ref, _ = retrieve.open_index(built)
    rows = built_meta[:12]
    members = {r["path"]: (demo / "images" / r["path"]).read_bytes() for r in rows}
    members.update({"notes.txt": b"hello", "Cubism/broken.jpg": b"not a jpeg"})
    zpath = write_zip(tmp_path / "g.zip", members, prefix="gallery/")
    index = tmp_path / "idx"
    retrieve.main(["--build", "--images", str(zpath), "--index", str(index), *RETRIEVE_FAST,
                   "--no-amp"])
    _, got, xb, _ = retrieve.open_index(index)
    meta = [r["path"] for r in got]
    assert meta == sorted(r["path"] for r in rows)
    assert [r["path"] for r in files.read_csv(index / "skipped.csv")] == ["Cubism/broken.jpg"]
    at = {r["path"]: i for i, r in enumerate(built_meta)}
    np.testing.assert_allclose(xb, ref[[at[p] for p in meta]], atol=1e-5)
    retrieve.main(["--query-id", meta[0], "--index", str(index), "-k", "2"])
    with Image.open(index / "query_sheet.png") as im:  # query cell, then the first result
        assert {im.getpixel((90, 90)), im.getpixel((270, 90))}.isdisjoint(
            {pages.GREY, (255, 255, 255)})


def test_retrieve_precision_fp32_unchanged_bf16_agrees_and_recorded(demo, small_builds, tmp_path,
                                                                   monkeypatch):
    """--no-amp embeds exactly as before low-precision weights existed (BN-folded fp32 trunk,
    channels_last); bf16 weights, forced here whatever this CPU would pick, agree with fp32 to a
    cosine >= 0.999, are recorded in config.json, and a query embeds the same way."""
    manifest, folders = small_builds
    cfg, meta, xb32, _ = retrieve.open_index(folders[0])
    assert cfg["precision"] == "fp32"
    old = embed.Embedder(nets.fuse_for_inference(nets.backbone("resnet18", "none", 0)[0]))
    x = torch.stack([nets.make_transform(64)(files.load_image(demo / "images" / r["path"], 64))
                     for r in meta[:8]])
    with torch.inference_mode():
        want = torch.nn.functional.normalize(old.eval()(x.contiguous(
            memory_format=torch.channels_last)), dim=1).numpy()
    assert np.array_equal(want, embed.forward(embed.load_model(dict(cfg), torch.device(
        "cpu")), x, torch.device("cpu")))  # bit for bit
    monkeypatch.setattr(nets, "inference_precision", lambda device, enabled=True: (
        "bf16", "forced by the test"))
    index = tmp_path / "bf16"
    retrieve.main(["--build", "--images", str(demo / "images"), "--manifest", str(manifest),
                   "--index", str(index), "--weights", "none", "--backbone", "resnet18",
                   "--img-size", "64", "--workers", "0"])
    cfg16, _, xb16, _ = retrieve.open_index(index)
    assert cfg16["precision"] == "bf16"
    assert (np.sum(np.asarray(xb16) * np.asarray(xb32), 1)).min() >= 0.999
    monkeypatch.undo()  # the query itself would pick fp32 on this machine: the index says bf16
    D, I = found(["--query", str(demo / "images" / meta[3]["path"]), "--index",
                  str(index), "-k", "1", "--workers", "0"])
    assert I[0, 0] == 3 and D[0, 0] > 0.9999


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_retrieve_jpegs_decoded_on_the_device_agree_with_pil(demo, tmp_path):
    """The CUDA route (JPEG bytes decoded in batches on the device, nets.decode_jpegs), run on
    the CPU here: the same images as the PIL route, to a cosine >= 0.99 through a network; a
    PNG, a CMYK JPEG and a broken file go the PIL way (the broken one is reported once)."""
    root = tmp_path / "mixed"
    write_odd_images(root)  # cmyk.jpg, gray16.png, palette.png, rotated.jpg, trunc.jpg, ...
    for i, src in enumerate(sorted((demo / "images" / "Cubism").iterdir())[:5]):
        shutil.copy(src, root / f"demo{i}.jpg")
    paths = sorted(os.listdir(root))
    args = argparse.Namespace(batch_size=4, workers=0)
    cpu, model = torch.device("cpu"), nets.backbone("resnet18", "none", seed=0)[0].eval()

    def batches(on_device):
        out, failed = {}, []
        for x, idx, bad in embed.image_batches(paths, str(root), 64, args, cpu, on_device):
            failed += bad
            if x is not None:
                with torch.no_grad():
                    out.update(zip(idx.tolist(), model(x).flatten(1), strict=True))
        return out, failed
    (a, fa), (b, fb) = batches(False), batches(True)
    assert sorted(a) == sorted(b) and fa == fb == [(paths.index("trunc.jpg"), fa[0][1])]
    cos = [torch.nn.functional.cosine_similarity(a[i], b[i], 0).item() for i in a]
    assert min(cos) >= 0.99, cos
    ag = bench.agreement(*(torch.stack([e[i] for i in sorted(a)]).numpy() for e in (b, a)))
    assert bench.agrees(ag), ag  # and not merely alike: each image nearest its own PIL twin


def test_jpegs_on_the_device_only_where_torchvision_still_decodes(monkeypatch):
    """torchvision.io's decoders are deprecated (0.29) for TorchCodec: once they are gone,
    retrieve.py must take the PIL route on CUDA instead of failing at import. Both sides are
    played with a stand-in module, whatever this torchvision has."""
    io_module = types.ModuleType("torchvision.io")
    monkeypatch.setitem(sys.modules, "torchvision.io", io_module)
    assert not nets.can_decode_jpegs()  # decoders gone
    io_module.decode_jpeg = lambda *a, **kw: None
    assert nets.can_decode_jpegs()  # still there


def test_retrieve_hnsw_pca_build_then_query(demo, tmp_path):
    index = str(tmp_path / "hnsw")
    retrieve.main(["--build", "--images", str(demo / "images"), "--index", index, "--pool", "gem",
                   "--index-type", "hnsw", "--pca", "32", *RETRIEVE_FAST])
    cfg = retrieve.open_index(tmp_path / "hnsw")[0]
    assert cfg["index_params"]["ef_search"] == 128 and cfg["index_dim"] == 32
    assert cfg["manifest"] is None and cfg["n"] == 120  # no manifest: the folder was scanned
    meta = retrieve.open_index(tmp_path / "hnsw")[1]
    D, I = found(["--query-id", meta[0]["path"], "--index", index, "--ef-search", "16"])
    assert I.shape == (1, 5) and 0 not in I[0]


def test_retrieve_skips_bad_files_and_uses_local_weights(demo, tmp_path, capsys):
    """A folder with a corrupt JPEG and a text file, embedded with a local state_dict."""
    import torchvision
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((demo / "images" / "Cubism").iterdir())[:3]):
        (root / "sub" / f"ok{i}.jpg").write_bytes(src.read_bytes())
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("hello")
    os.symlink("loop.jpg", root / "loop.jpg")  # a symlink loop: not "missing"
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)  # any fc size
    index = tmp_path / "idx"
    flags = ["--backbone", "resnet18", "--img-size", "64", "--workers", "0"]
    retrieve.main(["--build", "--images", str(root), "--index", str(index), "--weights",
                   str(weights), *flags])
    out = capsys.readouterr().out
    assert "skipped 1 non-image files" in out
    assert [(r["path"], r["reason"][:14]) for r in files.read_csv(str(index / "skipped.csv"))] \
        == [("loop.jpg", "symlink loop"), ("broken.jpg", "cannot decode ")]
    assert [r["path"] for r in retrieve.open_index(index)[1]] == \
        ["sub/ok0.jpg", "sub/ok1.jpg", "sub/ok2.jpg"]
    assert retrieve.open_index(index)[2].shape[0] == 3
    D, I = found(["--query", str(root / "sub" / "ok1.jpg"), "--index", str(index),
                  "-k", "1"])
    assert I[0, 0] == 1 and D[0, 0] > 0.99  # the model came back from the weights file
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # other random weights
    assert "changed since" in retrieve_error(["--query", str(root / "sub" / "ok1.jpg"),
                                              "--index", str(index)])


def test_retrieve_bad_input_is_one_line(built, demo, tmp_path):
    bad = tmp_path / "fake.jpg"
    bad.write_text("this is not an image")
    img = str(next((demo / "images" / "Cubism").iterdir()))
    idx = ["--index", str(built)]
    assert "not a readable image" in retrieve_error(["--query", str(bad), *idx])
    assert "not found" in retrieve_error(["--query", str(tmp_path / "nope.jpg"), *idx])
    assert "built with --backbone resnet18" in retrieve_error(
        ["--query", img, *idx, "--backbone", "resnet50"])
    assert "built with --img-size 64" in retrieve_error(["--query", img, *idx, "--img-size", "96"])
    assert "-k 500" in retrieve_error(["--query", img, *idx, "-k", "500"])
    assert "no index" in retrieve_error(["--eval", "--index", str(tmp_path / "none")])
    (tmp_path / "empty").mkdir()
    assert "no images" in retrieve_error(["--build", "--images", str(tmp_path / "empty"),
                                          "--index", str(tmp_path / "i"), *RETRIEVE_FAST])
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": faiss_index.FORMAT, "version": 0}))
    assert "version" in retrieve_error(["--eval", "--index", str(old)])
    assert "empty path" in retrieve_error(["--query-id", "", *idx])
    msg = retrieve_error(["--build", "--shard", "", "--index", str(tmp_path / "s"),
                          *RETRIEVE_FAST])  # not a whole build, silently
    assert "--shard : expected I/N" in msg and not (tmp_path / "s").exists()
    assert "--shard I/N goes with --build" in retrieve_error(["--eval", "--shard", "", *idx])
    png_bomb(tmp_path / "bomb.png", 20000, 20000)
    assert "too large" in retrieve_error(["--query", str(tmp_path / "bomb.png"), *idx])
    refused = tmp_path / "refused"  # refused before anything is written: no folder left
    retrieve_error(["--build", "--images", str(demo / "images"), "--index", str(refused),
                    *RETRIEVE_FAST, "--pca", "5000"])
    assert not refused.exists()


@pytest.fixture(scope="module")
def small_builds(demo):
    """24 demo paintings indexed twice into separate folders with other random models (seed 0
    and 1): the same size and dimension, other vectors. Returns (manifest, {seed: folder})."""
    base = demo.parent / "small"
    base.mkdir(exist_ok=True)
    rows = files.read_csv(demo / "gallery.csv")[:24]
    files.write_csv(base / "m.csv", list(rows[0]), [list(r.values()) for r in rows])
    folders = {}
    for seed in (0, 1):
        folders[seed] = base / f"seed{seed}"
        retrieve.main(small_build_args(demo, base / "m.csv", folders[seed], seed))
    return base / "m.csv", folders


def small_build_args(demo, manifest, index, seed):
    return ["--build", "--images", str(demo / "images"), "--manifest", str(manifest), "--index",
            str(index), *RETRIEVE_FAST, "--seed", str(seed)]


def answers(index):
    """What a reader of the folder gets: the stored vectors and every row's 3 neighbours."""
    cfg, meta, xb, ix = retrieve.open_index(index)
    return np.array(xb), ix.search(np.ascontiguousarray(xb), 3)[1]


def test_retrieve_crash_at_every_write_step_leaves_old_or_new(demo, small_builds, tmp_path,
                                                               monkeypatch):
    """A rebuild with another model fails at the 1st, 2nd, ... rename, and once inside
    faiss.write_index: each time a reader gets exactly the old index, and in the end the new."""
    manifest, folders = small_builds
    index = tmp_path / "idx"
    shutil.copytree(folders[0], index)
    old, new = answers(folders[0]), answers(folders[1])
    real_replace, real_write = os.replace, faiss.write_index
    outcomes = []
    for step in range(1, 12):
        calls = []

        def failing(*a, step=step, calls=calls):
            calls.append(a)
            if len(calls) == step:
                raise OSError(28, "No space left on device (simulated)")
            return real_replace(*a)
        monkeypatch.setattr(os, "replace", failing)
        try:
            retrieve.main(small_build_args(demo, manifest, index, 1))
            outcomes.append("new")
        except SystemExit as e:  # one line, no traceback
            assert str(e.code).startswith("retrieve.py: error: no space left on device (")
            outcomes.append("crash")
        monkeypatch.setattr(os, "replace", real_replace)
        got = answers(index)
        same = [all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
                for want in (old, new)]
        assert same == ([False, True] if outcomes[-1] == "new" else [True, False]), step
        assert len([g for g in os.listdir(index) if g.startswith("gen-")]) == 1
        if outcomes[-1] == "new":
            break
        shutil.rmtree(index)
        shutil.copytree(folders[0], index)
    assert outcomes[-1] == "new" and outcomes.count("crash") >= 3, outcomes
    monkeypatch.setattr(faiss, "write_index", lambda *a: (_ for _ in ()).throw(
        RuntimeError("Error: write failed (simulated)")))
    with pytest.raises(RuntimeError):
        retrieve.main(small_build_args(demo, manifest, index, 0))
    monkeypatch.setattr(faiss, "write_index", lambda *a: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))  # as the issue injected it: one line now
    msg = retrieve_error(small_build_args(demo, manifest, index, 0))
    assert "no space left on " in msg and msg.endswith("index.faiss"), msg
    monkeypatch.setattr(faiss, "write_index", real_write)
    assert all(np.array_equal(a, b) for a, b in zip(answers(index), new, strict=True))
    assert [g for g in os.listdir(index) if g.startswith("gen-")] == ["gen-2"]  # no gen-3
    assert not [f for _, _, fs in os.walk(index) for f in fs if ".tmp" in f]


def test_retrieve_full_disk_is_one_line_and_the_old_index_stays(demo, small_builds, tmp_path,
                                                                 monkeypatch):
    """ENOSPC where the embeddings' memory map is reserved (injected: fallocate fails as on a
    full disk): one line naming the file, the old generation answers as before, no temp file
    left, the lock free; into a new folder: no folder left. test_retrieve_build_on_a_full_tmpfs
    does it on a real full disk where the machine lets the tests mount one."""
    manifest, folders = small_builds
    index = tmp_path / "idx"
    shutil.copytree(folders[0], index)
    before = sorted(os.listdir(index))
    monkeypatch.setattr(os, "posix_fallocate", enospc, raising=False)
    msg = retrieve_error(small_build_args(demo, manifest, index, 1))
    assert msg == (f"retrieve.py: error: no space left on {files.mount_point(index)} while "
                   f"writing {index / 'gen-2' / 'embeddings.npy.tmp.npy'}")
    assert sorted(os.listdir(index)) == before
    assert all(np.array_equal(a, b) for a, b in zip(answers(index), answers(folders[0]),
                                                    strict=True))
    with retrieve.IndexWriter(str(index)):  # the lock was released
        pass
    assert "no space left" in retrieve_error(small_build_args(demo, manifest, tmp_path / "new",
                                                              1))
    assert not (tmp_path / "new").exists()


def test_retrieve_build_on_a_full_tmpfs_is_one_line_not_sigbus(demo, small_builds, small_disk):
    """On a real full disk (a tmpfs with 16 KB left), --build over an index there, in a child
    (a SIGBUS would kill pytest): exit 1 with one line, the old generation answers, no temp
    file, the lock free. And a FAISS index that does not fit: faiss's own writer fails its
    last write at close, says so on stderr only and leaves a short file; ours raises."""
    manifest, folders = small_builds
    index = small_disk / "idx"
    shutil.copytree(folders[0], index)
    fill_disk(small_disk, 16 << 10)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "retrieve.py", *small_build_args(demo, manifest, index, 1)],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])  # -7: SIGBUS
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1] == (
        f"retrieve.py: error: no space left on {small_disk} while writing "
        f"{index / 'gen-2' / 'embeddings.npy.tmp.npy'}")
    assert sorted(os.listdir(index)) == sorted(os.listdir(folders[0]))
    assert all(np.array_equal(a, b) for a, b in zip(answers(index), answers(folders[0]),
                                                    strict=True))
    with retrieve.IndexWriter(str(index)):
        pass
    os.remove(small_disk / "filler")
    fill_disk(small_disk, 8 << 10)
    ix = faiss.IndexFlatIP(64)
    ix.add(np.ones((40, 64), np.float32))  # 10 KB
    with pytest.raises(OSError) as e:
        faiss_index.write_faiss(ix, str(small_disk / "x.faiss"))
    assert files.disk_full(e.value) and e.value.filename.startswith(str(small_disk / "x.faiss"))
    assert sorted(os.listdir(small_disk)) == ["filler", "idx"]


def test_retrieve_killed_after_the_switch_then_next_write_cleans(demo, small_builds, tmp_path):
    """kill -9 (os._exit) right after CURRENT names the new generation, before the old one is
    removed: readers get the new index; the next build removes what was left."""
    manifest, folders = small_builds
    index = tmp_path / "idx"
    shutil.copytree(folders[0], index)
    argv = small_build_args(demo, manifest, index, 1)
    code = ("import os, retrieve\nreal = os.replace\n"
            "def replace(a, b):\n    real(a, b)\n"
            "    if b.endswith('CURRENT'):\n        os._exit(9)\n"
            f"os.replace = replace\nretrieve.main({argv!r})\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True)
    assert child.returncode == 9, child.stderr[-500:]
    assert len([g for g in os.listdir(index) if g.startswith("gen-")]) == 2  # old one left
    assert all(np.array_equal(a, b) for a, b in
               zip(answers(index), answers(folders[1]), strict=True))
    retrieve.main(["--add", "--index", str(index), "--workers", "0"])  # any write cleans up
    assert len([g for g in os.listdir(index) if g.startswith("gen-")]) == 1


def test_retrieve_add_keeps_one_image_root(demo, small_builds, tmp_path):
    """--add --images: accepted where the indexed images moved to (and remembered), refused in
    one line for another folder while the index's own root is still there."""
    manifest, _ = small_builds
    rows = files.read_csv(manifest)
    for r in rows:
        (tmp_path / "a" / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / "images" / r["path"], tmp_path / "a" / r["path"])
    index = str(tmp_path / "idx")
    retrieve.main(["--build", "--images", str(tmp_path / "a"), "--manifest", str(manifest),
                   "--index", index, *RETRIEVE_FAST])
    os.rename(tmp_path / "a", tmp_path / "b")  # the collection moved
    retrieve.main(["--add", "--images", str(tmp_path / "b"), "--index", index, "--workers", "0"])
    assert retrieve.open_index(index)[0]["images"] == str(tmp_path / "b")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    msg = retrieve_error(["--add", "--images", str(tmp_path / "c"), "--index", index])
    assert f"{tmp_path / 'b'} is this index's image root" in msg
    res = retrieve.main(["--eval", "--index", index, "--workers", "0", "--eval-queries", "5"])
    assert res["copy"]["queries"] == 5  # copies made from the images under the root it keeps


def test_retrieve_second_writer_refused_readers_never_wait(demo, small_builds, tmp_path):
    manifest, folders = small_builds
    index = tmp_path / "idx"
    shutil.copytree(folders[0], index)
    with retrieve.IndexWriter(str(index)):  # a build in progress, holding the lock
        msg = retrieve_error(small_build_args(demo, manifest, index, 1))
        assert f"being written by another process (pid {os.getpid()})" in msg
        got = answers(index)  # a reader reads the last finished generation
    assert all(np.array_equal(a, b) for a, b in zip(got, answers(folders[0]), strict=True))
    assert sorted(g for g in os.listdir(index) if g.startswith("gen-")) == ["gen-1"]


def test_retrieve_config_must_describe_its_files(small_builds, tmp_path):
    _, folders = small_builds
    for seed in (0, 1):
        shutil.copytree(folders[seed], tmp_path / str(seed))
    gen = retrieve.generation(tmp_path / "0")
    shutil.copy(os.path.join(retrieve.generation(tmp_path / "1"), "config.json"), gen)
    assert "does not describe the embeddings.npy, index.faiss beside" in retrieve_error(
        ["--eval", "--index", str(tmp_path / "0")])
    cfg = json.loads(open(os.path.join(gen, "config.json")).read())
    del cfg["dim"]
    files.atomic_write(os.path.join(gen, "config.json"), json.dumps(cfg))
    assert "config.json lacks dim" in retrieve_error(["--eval", "--index", str(tmp_path / "0")])
    (tmp_path / "0" / "CURRENT").write_text("gen-99\n")
    assert "names no generation" in retrieve_error(["--eval", "--index", str(tmp_path / "0")])


def test_retrieve_old_layout_opens_and_moves_into_a_generation(demo, small_builds, tmp_path):
    """An index written before generations (files at the top, config version 1) still answers;
    the next --add moves it into a generation."""
    manifest, folders = small_builds
    index = tmp_path / "old"
    shutil.copytree(folders[0], index)
    gen = retrieve.generation(index)
    for f in faiss_index.FILES:
        os.replace(os.path.join(gen, f), index / f)
    shutil.rmtree(gen)  # and the aspects' files: a version-1 index had none
    os.remove(index / "CURRENT")
    cfg = json.loads((index / "config.json").read_text())
    cfg["version"] = 1
    del cfg["files"], cfg["aspects"], cfg["aspect_files"]
    (index / "config.json").write_text(json.dumps(cfg))
    assert all(np.array_equal(a, b) for a, b in
               zip(answers(index), answers(folders[0]), strict=True))
    retrieve.main(["--add", "--manifest", str(demo / "gallery.csv"), "--index", str(index),
                   "--workers", "0"])
    assert (index / "CURRENT").read_text().strip() == "gen-1"
    assert not any((index / f).exists() for f in faiss_index.FILES)
    assert retrieve.open_index(index)[0]["n"] == 120


def test_retrieve_query_html_cards(built, demo, tmp_path, capsys):
    meta = retrieve.open_index(built)[1]
    imgs = [str(demo / "images" / meta[i]["path"]) for i in (3, 40)]
    page = tmp_path / "results.html"
    D, I = found(["--query", *imgs, "--index", str(built), "-k", "4", "--html", str(page),
                  "--sheet", str(tmp_path / "s.png")])
    p = check_page(page)
    text = page.read_text(encoding="utf-8")
    assert p.classes["query"] == 2 and p.classes["hit"] == 2 + 2 * 4 and p.tags["img"] == 10
    assert p.classes["bad"] == 0 and "no longer decode" not in text
    q = meta[3]  # an indexed painting as the query: its own labels, under it and in the terminal
    cards = text.split('<div class="card hit query">')[1].split('<div class="card hit">')[0]
    assert f"<b>{html.escape(q['title'])}</b>" in cards and f"<td>{q['style']}</td>" in cards
    out = capsys.readouterr().out
    assert f"query: {imgs[0]}  [style {q['style']}, genre {q['genre']}]" in out, out
    hit = meta[I[0, 0]]
    assert f"  [style {hit['style']}, genre {hit['genre']}]\n" in out
    at = -1
    for i, s in zip(I[1], D[1], strict=True):  # the second query's cards in rank order
        at = text.index(f"score {s:.3f}</div><div><b>{html.escape(meta[i]['title'])}</b>", at + 1)
        for col, v in meta[i].items():  # every non-empty manifest column (title: bold, above)
            assert not v or col == "title" or f'<td class="k">{col}</td><td>{html.escape(v)}' \
                '</td>' in text
    assert f"html: {page}" in out


def test_retrieve_query_id_html_unreadable_is_a_grey_card(built, demo, tmp_path, capsys):
    """An indexed image that no longer decodes shows as a grey card, counted, not a crash."""
    moved = tmp_path / "images"
    shutil.copytree(demo / "images", moved)
    meta = retrieve.open_index(built)[1]
    D, I = found(["--query-id", meta[5]["path"], "--index", str(built), "-k", "3",
                  "--images", str(moved), "--sheet", str(tmp_path / "s.png")])
    (moved / meta[I[0, 1]]["path"]).write_bytes(b"no longer a jpeg")
    page = built / "results.html"  # --html alone: beside the index, not in the working folder
    retrieve.main(["--query-id", meta[5]["path"], "--index", str(built), "-k", "3", "--images",
                   str(moved), "--html", "--sheet", str(tmp_path / "s.png")])
    p = check_page(page)
    assert p.classes["hit"] == 4 and p.classes["bad"] == 1
    assert "1 image(s) no longer decode" in page.read_text(encoding="utf-8")
    assert "1 images no longer decode: grey" in capsys.readouterr().out


def test_retrieve_map_html_points_neighbours_sprites(built, capsys, one_blas_thread,
                                                    one_faiss_thread):
    xy = retrieve.main(["--map", "--index", str(built), "-k", "4"])["xy"]
    page = built / "map.html"
    p = check_page(page)
    (d,) = p.json
    meta = retrieve.open_index(built)[1]
    assert d["n"] == len(d["rows"]) == len(d["nn"]) == 120 and len(d["xy"]) == 240
    assert xy.shape == (120, 2) and np.isfinite(xy).all()
    assert d["cols"] == list(meta[0]) and d["rows"][7] == list(meta[7].values())
    xb = np.asarray(retrieve.open_index(built)[2])
    for q in (0, 50, 119):  # precomputed neighbours = numpy brute force, minus the painting itself
        s = xb @ xb[q]
        order = [i for i in np.argsort(-s, kind="stable") if i != q][:4]
        assert d["nn"][q] == order
        np.testing.assert_allclose(d["ns"][q], s[order], atol=2e-3)
    sp = np.array(d["sp"]).reshape(120, 5)
    assert len(d["sheets"]) == 1 and p.tags["img"] == 0  # one sprite sheet, no <img> per point
    assert (sp[:, 3:] <= d["cell"]).all() and (sp[:, 3:].max(1) == d["cell"]).all()
    assert len({(x, y) for _, x, y, _, _ in sp}) == 120  # each thumbnail its own place
    assert f"map: {page}" in capsys.readouterr().out
    # short names (the title, else the file's stem), coloured by style by default, a legend
    assert d["names"][7] == meta[7]["title"] and d["generation"] == "gen-1"
    assert d["colour_by"] == "style" and len(d["legend"]) == len({r["style"] for r in meta})
    style = [d["legend"][c][0] for c in d["cat"]]
    assert style == [r["style"] for r in meta] and p.classes["legend"] == 1
    assert sum(d["legend_n"]) == 120 and p.classes["item"] == len(d["legend"])
    rows = [{"path": f"a/b/p{i}.jpg", "c": "xyz"[i % 3] if i < 39 else str(i)}
            for i in range(48)] + [{"path": "x.png", "c": ""}]
    ids, legend = pages.colour_classes(rows, "c")  # 12 values: 10 coloured, 2 share 'other'
    assert len(legend) == len(pages.MAP_COLOURS) + 1 and legend[-1] == ("(empty)", pages.NONE, 1)
    assert legend[-2] == ("other (2 values)", pages.OTHER, 2) and legend[0][2] == 13
    assert pages.short_title(rows[3]) == "p3" and ids[-1] == len(legend) - 1
    assert "--color-by nope: not a column" in retrieve_error(["--map", "--index", str(built),
                                                             "--color-by", "nope"])


def test_retrieve_map_layout_keeps_clusters_apart(one_blas_thread, one_faiss_thread):
    """Six clusters on a 32-d subspace of 512-d unit vectors: the 2-D layout keeps each
    painting's 10 nearest neighbours in its cluster (the first two principal components alone
    mix them: 0.79 of the neighbours share the cluster)."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((512, 32)))[0]
    lab = rng.integers(0, 6, 300)
    x = unit(((rng.standard_normal((6, 32))[lab] + 0.6 * rng.standard_normal((300, 32)))
              @ basis.T).astype(np.float32))
    y = layout.layout_2d(x, seed=0)
    nn = layout.knn_graph(y.astype(np.float32), 10)
    assert (lab[nn] == lab[:, None]).mean() > 0.95
    np.testing.assert_array_equal(y, layout.layout_2d(x, seed=0))  # seeded
    z = layout.pca_project(x, 50)
    assert z.shape == (300, 50) and abs(float(z[:, 0] @ z[:, 1])) < 1e-2 * float(z[:, 0] @ z[:, 0])


def test_map_layout_keeps_more_neighbours_than_pca_on_the_demo(built, one_blas_thread,
                                                               one_faiss_thread):
    """The share of each painting's 15 nearest (cosine) that stay among its 15 nearest on the
    map: the layout against the first two principal components, on the demo's vectors."""
    xb = np.asarray(retrieve.open_index(built)[2])
    ours = layout.map_kept(xb, layout.layout_2d(xb, seed=0))
    pca = layout.map_kept(xb, layout.pca_project(xb, 2))
    assert ours > pca + 0.05, (ours, pca)
    assert layout.map_kept(xb, xb) == 1.0 and layout.map_kept(xb, np.random.default_rng(
        0).standard_normal((len(xb), 2))) < 0.25  # random positions: about 15 / 120


def test_retrieve_eval_html_copy_failures(built, tmp_path, capsys):
    page = tmp_path / "eval.html"
    res = retrieve.main(["--eval", "--index", str(built), "--workers", "0", "--eval-queries", "24",
                         "--html", str(page)])
    p = check_page(page)
    text = page.read_text(encoding="utf-8")
    misses = round(24 * (1 - res["copy"]["top1"]))
    assert misses > 0 and p.classes["fail"] == misses and p.tags["img"] == 3 * misses
    assert f"{misses} failure(s)" in text and f"<td>{res['copy']['top1']:.3f}</td>" in text
    ranks = [int(r) for r in re.findall(r"ranked (\d+)", text)]
    assert len(ranks) + text.count("not in the top 10") == misses and all(r > 1 for r in ranks)
    assert f"html: {page} ({misses} copy-detection failures)" in capsys.readouterr().out


def test_retrieve_html_bad_input(built, tmp_path):
    img = str(next((built.parent / "images" / "Cubism").iterdir()))
    nowhere = str(tmp_path / "no" / "such" / "folder" / "r.html")
    assert "does not exist" in retrieve_error(["--query", img, "--index", str(built), "--html",
                                               nowhere])
    assert "does not exist" in retrieve_error(["--map", "--index", str(built), "--html", nowhere])
    assert "--html goes with" in retrieve_error(["--build", "--html", str(tmp_path / "x.html")])
    # a folder or a device (a fifo stands in for /dev/full): one line, and it is still there
    # (--html DIR ended in IsADirectoryError; the atomic rename replaced a device node)
    os.mkfifo(tmp_path / "fifo")
    q = ["--query", img, "--index", str(built)]
    for flag, path in itertools.product(("--html", "--sheet"), (tmp_path, tmp_path / "fifo")):
        msg = retrieve_error([*q, flag, str(path)])
        assert msg.endswith("exists and is not a regular file (a folder, a device)"), msg
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    with pytest.raises(files.UserError, match="not a regular file"):  # whoever writes
        files.atomic_write(tmp_path / "fifo", "x")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    assert "does not exist" in retrieve_error([*q, "--sheet", nowhere])  # as --html: refused
    assert not (tmp_path / "no").exists()
    bare = tmp_path / "bare"
    shutil.copytree(built, bare)
    os.remove(os.path.join(retrieve.generation(bare), "embeddings.npy"))
    assert "embeddings.npy is missing" in retrieve_error(["--map", "--index", str(bare)])


# ------------------------------------------------------------------------ aspects: --aspects, --by

ALL_ASPECTS = ["--aspects", "content,layout,light,pose,face"]


@pytest.fixture(scope="module")
def demo_figs(tmp_path_factory):
    """48 demo paintings with stick figures (data.py demo --figures) and their poses.json."""
    out = tmp_path_factory.mktemp("shared") / "demo-figs"
    data.main(["demo", "--figures", "--out", str(out), "--n", "48"])
    return out


@pytest.fixture(scope="module")
def built_figs(demo_figs):
    index = demo_figs / "index"
    retrieve.main(["--build", "--images", str(demo_figs / "images"), "--manifest",
                   str(demo_figs / "gallery.csv"), "--index", str(index), *RETRIEVE_FAST,
                   *ALL_ASPECTS, "--poses", str(demo_figs / "poses.json")])
    return index


def stored(index, name):
    return np.load(os.path.join(faiss_index.generation(str(index)), name))


def test_demo_figures_leave_the_paintings_without_figures_as_they_were(demo_figs, tmp_path):
    plain = tmp_path / "plain"
    data.main(["demo", "--out", str(plain), "--n", "48"])
    figs = poses.read_poses(demo_figs / "poses.json")
    assert len(figs) == 48 and 10 < sum(map(len, figs.values())) < 96
    for rel, fs in figs.items():
        same = (plain / "images" / rel).read_bytes() == (demo_figs / "images" / rel).read_bytes()
        assert same == (not fs), rel
    assert (plain / "manifest.csv").read_bytes() == (demo_figs / "manifest.csv").read_bytes()


def test_retrieve_aspects_stored_fingerprinted_and_kept_by_add(demo_figs, built_figs,
                                                               tmp_path):
    cfg = retrieve.open_index(built_figs)[0]
    assert cfg["aspects"] == ["content", "layout", "light", "pose", "face"]
    assert cfg["figures"]["source"] == "poses" and set(cfg["aspect_files"]) == {
        "sizes.npy", "layout.npy", "light.npy", "faces.npy", "poses.faiss", *by.FIGURE_FILES}
    figs = poses.read_poses(demo_figs / "poses.json")
    meta = retrieve.open_index(built_figs)[1]
    want = [f["keypoints"] for r in meta for f in figs[r["path"]]]
    K, start = stored(built_figs, "figures.npy"), stored(built_figs, "figure_start.npy")
    assert cfg["figures"]["n"] == len(K) == len(want) and np.allclose(K, want)
    assert [start[i + 1] - start[i] for i in range(48)] == [len(figs[r["path"]]) for r in meta]
    assert (stored(built_figs, "sizes.npy") == 160).any(1).all()  # the painter's shorter side
    part = tmp_path / "part"
    rows = files.read_csv(demo_figs / "gallery.csv")
    files.write_csv(tmp_path / "m.csv", list(rows[0]), [list(r.values()) for r in rows[:30]])
    base = ["--images", str(demo_figs / "images"), "--index", str(part), *RETRIEVE_FAST]
    retrieve.main(["--build", "--manifest", str(tmp_path / "m.csv"), *base, *ALL_ASPECTS,
                   "--poses", str(demo_figs / "poses.json")])
    msg = retrieve_error(["--add", "--manifest", str(demo_figs / "gallery.csv"), *base,
                          "--aspects", "content"])
    assert "built with --aspects content,layout,light,pose,face: --add keeps them" in msg
    retrieve.main(["--add", "--manifest", str(demo_figs / "gallery.csv"), *base])
    for name in retrieve.open_index(built_figs)[0]["aspect_files"]:
        if name.endswith(".npy"):
            np.testing.assert_allclose(stored(part, name), stored(built_figs, name), atol=1e-6,
                                       err_msg=name)


def mirrored_query(demo_figs, tmp_path, rel, scale=0.7):
    """The painting rel flipped left-right and shrunk, with its figures' poses file."""
    im = ImageOps.mirror(Image.open(demo_figs / "images" / rel).convert("RGB"))
    im = im.resize((round(im.width * scale), round(im.height * scale)))
    path = tmp_path / "q.jpg"
    im.save(path, quality=90)
    fs = []
    for f in poses.read_poses(demo_figs / "poses.json")[rel]:
        k = aspects.mirrored(f["keypoints"])
        k[:, 0] += im.width / scale - 1
        k[:, :2] *= scale
        fs.append({"box": np.zeros(4), "keypoints": k, "score": 1.0})
    poses.write_poses(tmp_path / "q.json", {"q.jpg": fs})
    return path, tmp_path / "q.json"


def test_retrieve_by_pose_finds_the_mirrored_source_first(demo_figs, built_figs, tmp_path,
                                                         capsys):
    """Each painting with figures, flipped and shrunk to 70%, --by pose --mirror: the source
    comes first (verification recovers the mirrored similarity transform)."""
    meta = retrieve.open_index(built_figs)[1]
    figs = poses.read_poses(demo_figs / "poses.json")
    sources = [r["path"] for r in meta if figs[r["path"]]][:6]
    for rel in sources:
        q, qp = mirrored_query(demo_figs, tmp_path, rel)
        D, I = found(["--query", str(q), "--index", str(built_figs), "--by", "pose",
                              "--mirror", "--poses", str(qp), "-k", "3", "--workers", "0"])
        assert meta[I[0, 0]]["path"] == rel and D[0, 0] > 0.9, rel
    D, I = found(["--query", str(demo_figs / "images" / rel), "--index", str(built_figs),
                          "--by", "pose", "-k", "1", "--workers", "0"])  # the index's poses file
    assert meta[I[0, 0]]["path"] == rel and D[0, 0] > 0.99
    assert re.search(r"  1  (0\.9|1\.0)\d\d  .*\n        by pose (0\.9|1\.0)",
                     capsys.readouterr().out)


def test_retrieve_by_pose_on_an_index_with_older_figure_rows(built_figs, tmp_path, capsys):
    """A generation whose poses.faiss holds the 68-column rows of the first version: the figure
    index is rebuilt in memory from figures.npy, with a line, and answers as a new one."""
    meta = retrieve.open_index(built_figs)[1]
    q = meta[3]["path"]
    args = ["--query-id", q, "--by", "pose", "-k", "5", "--workers", "0"]
    D_new, I_new = found([*args, "--index", str(built_figs)])
    old = tmp_path / "old"
    shutil.copytree(built_figs, old)
    gen = faiss_index.generation(str(old))
    faiss.write_index(faiss.IndexFlatIP(68), os.path.join(gen, "poses.faiss"))
    with open(os.path.join(gen, "config.json")) as f:
        cfg = json.load(f)
    cfg["aspect_files"]["poses.faiss"] = faiss_index.fingerprint(os.path.join(gen, "poses.faiss"))
    with open(os.path.join(gen, "config.json"), "w") as f:
        json.dump(cfg, f)
    capsys.readouterr()
    D, I = found([*args, "--index", str(old)])
    assert "rows from an older ArtExtract, rebuilt in memory" in capsys.readouterr().out
    assert (I == I_new).all() and D == pytest.approx(D_new)


def test_aspect_arrays_split_in_parts_join_back(built_figs):
    """The parts of --add, of shards and of torchrun ranks: a generation's aspect arrays cut at
    a row join back to the same arrays (figure rows renumbered, figure starts shifted)."""
    gen = faiss_index.generation(str(built_figs))
    cfg = retrieve.open_index(built_figs)[0]
    whole = {k: np.asarray(v) for k, v in by.load_arrays(gen, cfg, by.index_aspects(cfg)).items()}
    start = whole["figure_start.npy"]
    cut = int(np.flatnonzero(np.diff(start) > 0)[len(start) // 3])  # a row with figures
    a, b = {}, {}
    for k, v in whole.items():
        if k == "figure_start.npy":
            a[k], b[k] = v[:cut + 1], v[cut:] - v[cut]
        elif k == "figure_image.npy":
            f = start[cut]
            a[k], b[k] = v[:f], v[f:] - cut
        elif k in by.FIGURE_FILES or k == "faces.npy":
            a[k], b[k] = v[:start[cut]], v[start[cut]:]
        else:
            a[k], b[k] = v[:cut], v[cut:]
    joined = by.join_arrays([a, b])
    assert joined.keys() == whole.keys() and len(a["figures.npy"]) and len(b["figures.npy"])
    for k in whole:
        np.testing.assert_array_equal(joined[k], whole[k])


def test_aspect_part_is_kept_only_for_the_same_rows_and_source(demo, tmp_path):
    """A torchrun build run again keeps a rank's aspects part only when it holds the same rows
    (an image that now reads, or does not, shifts them) and aspects."""
    rows = [{"path": p} for p in sorted(painter.scan_files(demo / "images"))[:3]]
    args = argparse.Namespace(aspects=None, workers=0, batch_size=4, poses=None,
                              pose_weights=None, seed=0)
    dst, root, light = str(tmp_path / "aspects.part-0-of-1"), str(demo / "images"), \
        ["content", "light"]
    assert by.compute_part(dst, root, rows, light, args, torch.device("cpu"))
    assert not by.compute_part(dst, root, rows, light, args, torch.device("cpu"))
    assert by.compute_part(dst, root, rows[:2], light, args, torch.device("cpu"))
    assert by.compute_part(dst, root, rows[:2], ["content", "layout"], args,
                           torch.device("cpu"))
    arrays, _ = by.read_parts([dst], ["content", "layout"], None)
    assert len(arrays["layout.npy"]) == 2


def test_aspect_parts_interrupted_keep_the_old_and_leave_no_temp(tmp_path, monkeypatch):
    old = tmp_path / "aspects.part-0-of-2"
    old.mkdir()
    (old / "aspects.json").write_text('{"aspects": ["content", "layout"]}\n')

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(by, "compute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        by.compute_part(str(old), str(tmp_path), [{"path": "a.jpg"}], ["content", "light"],
                        argparse.Namespace(aspects=None), None)
    assert os.listdir(tmp_path) == ["aspects.part-0-of-2"] and os.listdir(old) == ["aspects.json"]


def test_retrieve_by_aspects_scores_where_and_what_the_index_lacks(built, built_figs, capsys):
    meta = retrieve.open_index(built_figs)[1]
    q = meta[3]["path"]
    args = ["--index", str(built_figs), "--workers", "0", "-k", "5"]
    D, I = found(["--query-id", q, "--by", "light", *args])
    L = aspects.light_vector(stored(built_figs, "light.npy"))
    s = L @ L[3]
    s[3] = -np.inf
    assert (I[0] == np.argsort(-s, kind="stable")[:5]).all()
    np.testing.assert_allclose(D[0], s[I[0]], atol=1e-5)
    D, I = found(["--query-id", q, "--by", "layout=1,light=0.5", "--where",
                          "genre=portrait", *args])
    assert all(meta[i]["genre"] == "portrait" for i in I[0] if i >= 0) and 3 not in I[0]
    out = capsys.readouterr().out
    assert "by layout 0." in out and " x0.5" in out
    msg = retrieve_error(["--query-id", retrieve.open_index(built)[1][0]["path"], "--index",
                          str(built), "--by", "pose"])
    assert "has no pose aspect (built with --aspects content,layout,light): rebuild" in msg
    assert "unknown aspect 'colour'" in retrieve_error(["--query-id", q, "--by", "colour",
                                                        *args])


def test_retrieve_map_colours_by_an_aspect(built_figs, tmp_path, one_faiss_thread):
    """--color-by figures|key|light|face: each painting's class from the stored aspect (equal to
    the classes worked out here from the stored arrays), with a legend; with --where too; an
    index without the aspect is one line."""
    args = ["--index", str(built_figs), "--workers", "0", "-k", "3"]
    counts = np.diff(stored(built_figs, "figure_start.npy"))
    light = stored(built_figs, "light.npy")
    meta = retrieve.open_index(built_figs)[1]
    want = {"figures": [f"{c} figure" if c == 1 else f"{min(c, 3)}{'+' if c > 2 else ''} "
                        "figures" for c in counts],
            "key": [aspects.light_summary(f).split(", ")[1] for f in light],
            "light": [aspects.light_summary(f).split(", ")[0] for f in light]}
    assert len(set(want["figures"])) > 1 and "0 figures" in want["figures"]
    for name in ("figures", "key", "light", "face"):
        page = tmp_path / f"{name}.html"
        retrieve.main(["--map", "--html", str(page), "--color-by", name, *args])
        (d,) = check_page(page).json
        got = [d["legend"][c][0] for c in d["cat"]]
        assert d["colour_by"] == name and sum(d["legend_n"]) == len(meta)
        if name in want:
            assert got == want[name], name
        else:  # the first figure's orientation, 'no face' for the paintings without one
            figs, start = stored(built_figs, "figures.npy"), stored(built_figs, "figure_start.npy")
            first = [aspects.face_orientation(figs[s:s + 1])[2][0] if c else None
                     for s, c in zip(start[:-1], counts, strict=True)]
            assert got == [f or "no face" for f in first]
            assert len(set(got) - {"no face"}) >= 2  # the demo's figures face several ways
    page = tmp_path / "some.html"
    keep = [i for i, r in enumerate(meta) if r["style"] == meta[0]["style"]]
    retrieve.main(["--map", "--html", str(page), "--color-by", "figures", "--where",
                   f"style={meta[0]['style']}", *args])
    (d,) = check_page(page).json
    assert [d["legend"][c][0] for c in d["cat"]] == [want["figures"][i] for i in keep]


def test_retrieve_map_colour_by_an_aspect_the_index_lacks_is_one_line(built):
    msg = retrieve_error(["--map", "--index", str(built), "--color-by", "figures"])
    assert "--color-by figures:" in msg and "has no pose aspect" in msg


def test_retrieve_by_pages_draw_the_figures_and_say_why(demo_figs, built_figs, tmp_path):
    meta = retrieve.open_index(built_figs)[1]
    figs = poses.read_poses(demo_figs / "poses.json")
    q = next(r["path"] for r in meta if figs[r["path"]])
    retrieve.main(["--query-id", q, "--index", str(built_figs), "--by", "pose=1,light=0.3",
                   "-k", "4", "--workers", "0", "--html", str(tmp_path / "r.html"), "--sheet",
                   str(tmp_path / "s.png")])
    p = check_page(tmp_path / "r.html")
    assert p.classes["why"] == 4
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "score: 1 pose + 0.3 light over 1.3; pose: the share of the query" in text
    assert re.search(r'class="why">by pose \d\.\d\d x1 \+ light -?\d\.\d\d x0\.3<', text)
    i = meta.index(next(r for r in meta if r["path"] == q))
    info = {"figures": np.array([f["keypoints"] for f in figs[q]]),
            "size": stored(built_figs, "sizes.npy")[i]}
    plain = pages.thumbnail(str(demo_figs / "images" / q))
    drawn = pages.thumbnail(by.sketch(str(demo_figs / "images" / q), info))
    a, b = np.asarray(plain, np.int16), np.asarray(drawn, np.int16)
    assert a.shape == b.shape and (np.abs(a - b).sum(2) > 60).mean() > 0.01  # skeletons drawn
    assert by.sketch("x.jpg", {"figures": np.zeros((0, 17, 3)), "size": (1, 1)}) == "x.jpg"
    sheet = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    assert (sheet == pages.FIGURE_COLOURS[0]).all(2).sum() > 20  # on the sheet too


def test_retrieve_eval_by_pose_beats_random_and_content(demo_figs, built_figs, capsys):
    """Transformed figures find their painting: --by pose far above random; the table has the
    three rows; the transform carries the figures with the picture (each joint lands on its
    own painted colour in the turned, scaled, maybe mirrored image)."""
    res = retrieve.main(["--eval", "--by", "pose=1,light=1,face=1", "--index", str(built_figs),
                         "--workers", "0", "--eval-queries", "12"])
    p, light = res["pose"], res["aspect_copies"]["light"]
    assert light["queries"] == 12 and light["top1"] > 0.3  # copies found by light alone (1/48)
    rng = np.random.default_rng(0)  # the copies' ids, as --eval draws them (seed 0)
    rng.choice(48, 48, replace=False)
    cids = rng.choice(48, 12, replace=False)
    with_figures = (np.diff(stored(built_figs, "figure_start.npy")) > 0)[cids].sum()
    pose, face = res["aspect_copies"]["pose"], res["aspect_copies"]["face"]
    assert pose["queries"] == with_figures >= face["queries"] > 0
    assert pose["top1"] > 0.5 and pose["top1"] > face["top1"]  # carried figures: the pose holds
    assert p["queries"] == 12 and p["pose"]["top1"] >= 0.75 and p["pose"]["mrr"] >= 0.8
    assert p["pose"]["top1"] > 5 * p["random"]["top1"] and p["random"]["top1"] == 1 / 48
    out = capsys.readouterr().out
    assert re.search(r"pose: by pose +12 +\d\.\d{3}", out) and "pose: by content" in out
    assert re.search(r"copy detection by light +12 +\d\.\d{3}", out)
    assert re.search(r"copy detection by pose +\d+ +\d\.\d{3}", out) and "carried" in out
    figs = poses.read_poses(demo_figs / "poses.json")
    rel, fs = next((r, f) for r, f in figs.items() if len(f) == 1)
    im = Image.open(demo_figs / "images" / rel).convert("RGB")
    K = np.array([f["keypoints"] for f in fs], np.float64)
    torso = K[0, [5, 6, 11, 12], :2].mean(0)
    before = np.asarray(im)[int(torso[1]), int(torso[0])]
    for seed in range(4):
        im2, K2 = retrieve_eval.transformed_painting(im, K, np.random.default_rng(seed))
        x, y = K2[0, [5, 6, 11, 12], :2].mean(0)  # jitter moves joints, not the torso centre
        assert np.abs(np.asarray(im2)[int(y), int(x)].astype(int) - before).max() < 60, seed


def test_copy_of_carries_the_figures_with_the_picture():
    """copy_of with figures: the same copy as without (the same draws), and each joint lands
    where its dot went in the cropped, turned, resized copy; joints cut off are hidden."""
    rng = np.random.default_rng(9)
    K = np.zeros((1, 17, 3))
    K[0, :, :2], K[0, :, 2] = rng.uniform(10, 190, (17, 2)) * [1.2, 1.0], 1
    for seed in range(6):
        for j in (0, 7):
            im = Image.new("RGB", (240, 200))
            ImageDraw.Draw(im).ellipse([*(K[0, j, :2] - 3), *(K[0, j, :2] + 3)], fill="white")
            plain = retrieve_eval.copy_of(im, np.random.default_rng(seed))
            copy, K2 = retrieve_eval.copy_of(im, np.random.default_rng(seed), K)
            assert (np.asarray(plain) == np.asarray(copy)).all()
            if not len(K2):
                continue
            a = np.asarray(copy.convert("L"), np.float64)
            ys, xs = np.nonzero(a > 0.5 * a.max())
            if K2[0, j, 2] == 0:  # cut off: no dot left in the copy, or only a sliver at an edge
                edge = np.minimum.reduce([xs, ys, a.shape[1] - 1 - xs, a.shape[0] - 1 - ys])
                assert a.max() < 100 or edge.max() <= 4, (seed, j)
                continue
            w = a[ys, xs]
            assert np.hypot((xs * w).sum() / w.sum() - K2[0, j, 0],
                            (ys * w).sum() / w.sum() - K2[0, j, 1]) < 1.5, (seed, j)


def test_retrieve_detector_build_stores_what_it_finds_and_a_crash_keeps_the_old(
        demo, tmp_path, monkeypatch, capsys):
    """--pose-weights none (random init) at 64 px with every box let through: whatever it
    finds is stored, the detector recorded; a crash in the next pose build's detector pass
    leaves the old generation answering as before."""
    monkeypatch.setattr(aspects, "DETECT_SIZE", 64)
    monkeypatch.setattr(aspects, "DETECT_THRESHOLD", 0.0)
    rows = files.read_csv(demo / "gallery.csv")[:6]
    files.write_csv(tmp_path / "m.csv", list(rows[0]), [list(r.values()) for r in rows])
    argv = ["--build", "--images", str(demo / "images"), "--manifest", str(tmp_path / "m.csv"),
            "--index", str(tmp_path / "i"), *RETRIEVE_FAST, "--aspects", "content,pose",
            "--pose-weights", "none", "--batch-size", "3"]
    retrieve.main(argv)
    cfg = retrieve.open_index(tmp_path / "i")[0]
    assert cfg["figures"]["source"] == "detector" and cfg["figures"]["weights"] == "none"
    K = stored(tmp_path / "i", "figures.npy")
    assert cfg["figures"]["n"] == len(K) > 0 and "aspects (pose detector): 6/6" in \
        capsys.readouterr().out
    sizes = stored(tmp_path / "i", "sizes.npy")
    img = stored(tmp_path / "i", "figure_image.npy")
    assert (K[..., 0] <= sizes[img, 0][:, None] + 2).all()  # the original's pixels (160 px
    assert K[..., 0].max() > 140  # wide): the detector saw 128 px, keypoints were scaled back
    old = answers(tmp_path / "i"), K
    calls = []

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    real = aspects.detect
    monkeypatch.setattr(aspects, "detect", dies)
    with pytest.raises(KeyboardInterrupt):
        retrieve.main([*argv, "--seed", "1"])
    got = answers(tmp_path / "i")
    assert all(np.array_equal(a, b) for a, b in zip(got, old[0], strict=True))
    assert np.array_equal(stored(tmp_path / "i", "figures.npy"), old[1])
    assert retrieve.open_index(tmp_path / "i")[0] == cfg


# ----------------------------------------------------------------------------- torchrun and shards


def test_retrieve_torchrun_resumes_a_dead_rank_and_equals_one_process(built, demo, tmp_path,
                                                                       monkeypatch):
    """`torchrun --nproc-per-node 2 retrieve.py --build` after a run whose rank 1 died: rank 0's
    finished part is kept, only rank 1's is embedded, and the index equals the 1-process build
    `built` row for row. The dead run is played in this process as rank 0 of 2 (a torchrun
    launch costs ~8 s of CPU in imports): it finishes its part and is killed while it waits
    for rank 1, which left a half-written file."""
    index = tmp_path / "idx"
    argv = ["--build", "--images", str(demo / "images"), "--manifest", str(demo / "gallery.csv"),
            "--index", str(index), *RETRIEVE_FAST, "--no-amp", "--device", "cpu"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(nets, "init_distributed", lambda device, hours=None: device)

    def killed_waiting(obj):
        raise KeyboardInterrupt
    monkeypatch.setattr(nets, "all_gather_objects", killed_waiting)
    with pytest.raises(KeyboardInterrupt):
        retrieve.main(argv)
    monkeypatch.undo()
    (folder,) = (index / "parts").iterdir()
    assert sorted(os.listdir(folder)) == ["aspects.part-0-of-2", "embeddings.part-0-of-2.json",
                                          "embeddings.part-0-of-2.npy"]
    (folder / "embeddings.part-1-of-2.npy").write_bytes(b"\x93NUMPY half a part")
    rc, out = torchrun("retrieve.py", *argv)
    assert rc == 0, out[-3000:]
    assert "rank 0: 60 images kept from an earlier run; its aspects kept" in out, out[-3000:]
    assert "rank 1: embedded 60 images" in out and out.count("indexed 120 images") == 1
    assert sorted(os.listdir(index)) == ["CURRENT", "gen-1", "lock", "log.jsonl", "skipped.csv"]
    (cfg, meta, xb, ix), ref = retrieve.open_index(index), retrieve.open_index(built)
    assert meta == ref[1] and cfg["n"] == 120
    np.testing.assert_allclose(xb, ref[2], atol=1e-5)
    xq = np.ascontiguousarray(ref[2][::7])
    assert (ix.search(xq, 10)[1] == ref[3].search(xq, 10)[1]).all()
    for f in ("sizes.npy", "light.npy", "layout.npy"):  # each rank its rows' aspects, joined
        np.testing.assert_array_equal(stored(index, f), stored(built, f))


def test_retrieve_torchrun_figures_per_rank_equal_one_process(demo_figs, built_figs, tmp_path):
    """Under torchrun each rank finds its own rows' figures (here from --poses; the detector
    runs the same way, on every rank's device) and rank 0 joins them: the generation's figure
    arrays and figure index equal the one-process build's."""
    index = tmp_path / "idx"
    rc, out = torchrun("retrieve.py", "--build", "--images", str(demo_figs / "images"),
                       "--manifest", str(demo_figs / "gallery.csv"), "--index", str(index),
                       *RETRIEVE_FAST, "--device", "cpu", *ALL_ASPECTS, "--poses",
                       str(demo_figs / "poses.json"))
    assert rc == 0, out[-3000:]
    n = len(stored(built_figs, "figures.npy"))
    assert out.count(f"figures: {n} in ") == 1  # rank 0's line, after the join
    for f in by.FIGURE_FILES + ("faces.npy", "light.npy", "sizes.npy"):
        np.testing.assert_array_equal(stored(index, f), stored(built_figs, f))
    cfg = retrieve.open_index(index)[0]
    assert cfg["aspects"] == ALL_ASPECTS[1].split(",") and cfg["figures"]["n"] == n
    assert not (index / "parts").exists()


def shard_args(demo, manifest, index, *flags):
    return ["--train-only", "--images", str(demo / "images"), "--manifest", str(manifest),
            "--index", str(index), *RETRIEVE_FAST, "--no-amp", "--index-type", "ivf-flat",
            *flags]


@pytest.fixture(scope="module")
def sharded(demo, small_builds):
    """small_builds' 24 paintings, seed-0 model, as a sharded ivf-flat build: --train-only,
    then --build --shard 0/3, 1/3 and 2/3, not merged. Returns the index folder."""
    index = demo.parent / "sharded"
    retrieve.main(shard_args(demo, small_builds[0], index, "--nlist", "4", "--nprobe", "2"))
    for i in range(3):
        retrieve.main(["--build", "--shard", f"{i}/3", "--index", str(index), "--workers", "0",
                       "--no-amp"])
    return index


def ref_folder(small_builds):
    return small_builds[1][0]


@pytest.mark.xdist_group("sharded")
def test_retrieve_sharded_build_merges_into_one_index(sharded, small_builds, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(sharded, index)
    retrieve.main(["--merge-shards", str(index)])
    cfg, meta, xb, ix = retrieve.open_index(index)
    assert cfg["index_type"] == "ivf-flat" and cfg["n"] == 24
    assert cfg["index_params"] == {"nlist": 4, "nprobe": 2}
    ref = retrieve.open_index(small_builds[1][0])  # the same rows and model, flat, in one go
    assert meta == ref[1]
    np.testing.assert_allclose(xb, ref[2], atol=1e-5)
    one = faiss.read_index(str(index / "shards" / "trained.faiss"))  # all 24 added at once
    one.add(np.ascontiguousarray(xb))
    retrieve.set_search_params(one, cfg["index_params"])
    xq = np.ascontiguousarray(xb)
    (D1, I1), (D2, I2) = ix.search(xq, 5), one.search(xq, 5)
    assert (I1 == I2).all() and (D1 == D2).all() and (I1[:, 0] == np.arange(24)).all()
    lists = faiss.extract_index_ivf(ix).invlists
    assert sorted(lists.list_size(i) for i in range(4))[-2] > 0  # lists are really in use
    D, I = found(["--query-id", meta[0]["path"], "--index", str(index), "-k", "3"])
    assert I.shape == (1, 3) and 0 not in I[0]
    assert cfg["aspects"] == ["content", "layout", "light"]  # the default, through the plan
    for name in ("sizes.npy", "layout.npy", "light.npy"):  # each shard's, joined in order
        np.testing.assert_allclose(stored(index, name), stored(ref_folder(small_builds), name),
                                   atol=1e-6, err_msg=name)


@pytest.mark.xdist_group("sharded")
def test_retrieve_merge_refuses_bad_shards(sharded, demo, small_builds, tmp_path):
    """Each bad shard set: one line naming the file, exit 1, no generation written."""
    def shard_1_of(name, *flags):  # shard 1/3 of another --train-only
        idx = tmp_path / name
        retrieve.main(shard_args(demo, small_builds[0], idx, *flags))
        retrieve.main(["--build", "--shard", "1/3", "--index", str(idx), "--workers", "0",
                       "--no-amp"])
        return idx / "shards"
    quantizer = shard_1_of("nlist3", "--nlist", "3", "--nprobe", "2")  # other centroids
    model = shard_1_of("avg", "--pool", "avg", "--nlist", "4", "--nprobe", "2")  # 512-d
    files = ("index.shard-1.faiss", "embeddings.shard-1.npy", "meta.shard-1.csv", "shard-1.json")
    cases = {"missing": ((), "index.shard-1.faiss: missing (shard 1/3"),
             "quantizer": ([(quantizer, f) for f in files], "another trained index"),
             "model": ([(model, f) for f in files], "made with pool avg, the trained index with"),
             "mixed": ([(quantizer, files[0])], "index.shard-1.faiss is not the file")}
    for name, (copies, msg) in cases.items():
        index = tmp_path / f"bad-{name}"
        shutil.copytree(sharded, index)
        if name == "missing":
            (index / "shards" / files[0]).unlink()
        for src, f in copies:
            shutil.copy(src / f, index / "shards" / f)
        err = retrieve_error(["--merge-shards", str(index)])
        assert msg in err and "shard-1" in err, (name, err)
        assert sorted(os.listdir(index)) == ["shards"], name  # no generation, no CURRENT
    assert "--shard 3/3: expected I/N" in retrieve_error(
        ["--build", "--shard", "3/3", "--index", str(tmp_path / "x")])
    assert "plan.json not found" in retrieve_error(
        ["--build", "--shard", "0/3", "--index", str(tmp_path / "x")])
    assert "--train-only needs --index-type ivfpq or ivf-flat" in retrieve_error(
        ["--train-only", "--index", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_retrieve_offline_imagenet_is_one_line(demo, tmp_path, monkeypatch):
    def offline(*a, **kw):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", offline)
    msg = retrieve_error(["--build", "--images", str(demo / "images"), "--index",
                          str(tmp_path / "i"), "--backbone", "resnet18", "--weights", "imagenet"])
    assert "--weights none" in msg and "ImageNet" in msg


def test_retrieve_ckpt_embeds_with_crnn_model(demo, tmp_path, capsys):
    """--ckpt: a (untrained) crnn.py checkpoint; dim = 2 * hidden, img size from its args."""

    a = {"backbone": "resnet18", "hidden": 16, "rnn": "gru", "dropout": 0.0, "img_size": 64}
    classes = {"style": ["A", "B"]}
    ckpt = tmp_path / "best.pt"
    torch.save({"arch": crnn_model.ARCH, "args": a, "classes": classes,
                "model": crnn_model.build_model(a, classes).state_dict()}, ckpt)
    rows = files.read_csv(str(demo / "gallery.csv"))[:20]
    files.write_csv(str(tmp_path / "m.csv"), list(rows[0]), [list(r.values()) for r in rows])
    index = str(tmp_path / "idx")
    cfg = retrieve.main(["--build", "--ckpt", str(ckpt), "--images", str(demo / "images"),
                         "--manifest", str(tmp_path / "m.csv"), "--index", index, "--workers", "0"])
    assert repr(cfg) == "<index: 20 images, flat, 32-d>"  # a notebook cell: one line
    assert capsys.readouterr().out.count("model: ") == 1  # the checkpoint is named once
    cfg = cfg["config"]
    assert cfg["dim"] == 32 and cfg["img_size"] == 64 and cfg["pool"] is None
    img = str(demo / "images" / rows[4]["path"])
    D, I = found(["--query", img, "--index", index, "-k", "2"])
    assert I[0, 0] == 4 and D[0, 0] > 0.99
    assert "--pool" in retrieve_error(["--query", img, "--index", index, "--pool", "avg"])


# ============================================================================
# bench: the tiny setting runs in seconds and writes a well-formed bench.json (no speed asserts)


ROW_KEYS = {"section", "name", "naive", "ours", "unit", "ratio", "target", "met"}


def test_bench_row_ratio_points_to_better():
    faster = bench.row("s", "throughput", 10.0, 40.0, "img/s", target=3)
    assert faster["ratio"] == pytest.approx(4.0) and faster["met"] is True
    slower = bench.row("s", "latency", 2.0, 8.0, "ms", target=1, higher_better=False)
    assert slower["ratio"] == pytest.approx(0.25) and slower["met"] is False
    assert bench.row("s", "x", 1.0, 2.0, "ms", recall_at_5=0.5)["recall_at_5"] == 0.5


def test_bench_tiny_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--tiny", "--out", str(out), "--tmp", str(tmp_path)]) == 0
    table = capsys.readouterr().out.split("\nsection ")[1]
    assert "not measured at this size" in table and " NO" not in table  # targets: real sizes
    res = json.loads(out.read_text())
    assert res["machine"]["tiny"] is True and res["machine"]["cores"] >= 1
    rows = res["rows"]
    assert {r["section"] for r in rows} == {"load", "search", "memory", "aspects"}
    for r in rows:
        assert ROW_KEYS <= set(r), r
        for k in ("naive", "ours", "ratio"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["met"] is None  # not judged at --tiny sizes
    search = {r["name"]: r for r in rows if r["section"] == "search"}
    assert search["n=2k faiss flat (exact)"]["recall_at_5"] == 1.0  # exact search is exact
    memory = next(r for r in rows if r["section"] == "memory")
    assert memory["unit"] == "MB" and memory["naive"] > memory["vectors_mb"]
    figure = next(r for r in rows if r["name"].startswith("figure search, 2k figures"))
    assert figure["recall_at_100"] == 1.0  # a flat figure index below POSE_IVF_FROM: exact


def test_bench_training_times_the_feature_cache(demo, tmp_path):
    """The train section's harness on crnn.py as it is: one frozen epoch, its log record and
    the seconds the feature cache took (the section failed once a refactor moved the function
    it times)."""
    recs, spent = bench.crnn_epochs(str(demo), str(tmp_path / "f"), [
        "--backbone", "resnet18", "--img-size", "64", "--epochs", "1", "--workers", "0",
        "--freeze-backbone"])
    assert len(recs) == 1 and recs[0]["img_per_s"] > 0 and spent > 0


def test_bench_unknown_section_is_one_line_error():
    with pytest.raises(SystemExit, match="unknown section 'gpu'"):
        bench.main(["--tiny", "--only", "gpu"])


def test_bench_one_gpu_machine_skips_two_ranks_and_keeps_rows(tmp_path, monkeypatch, capsys):
    """On an emulated one-GPU machine the full bench crashed in its torchrun section (rank 1
    asked for cuda:1) and, writing bench.json only at the end, lost every row before it. Now
    that section is skipped with a line, bench.json is rewritten after each section, and a
    section that raises leaves the rows before it on disk (exit status 1)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: (
        types.SimpleNamespace(name="Emulated T4", total_memory=15 * 2**30)))
    out, seen = tmp_path / "b.json", []

    def search(args, tmp):  # what was on disk when the next section began
        seen.append(json.loads(out.read_text()))
        raise RuntimeError("CUDA error: an illegal memory access (simulated)")
    monkeypatch.setitem(bench.SECTIONS, "load", lambda args, tmp: [
        bench.row("load", "measured", 1.0, 2.0, "img/s")])
    monkeypatch.setitem(bench.SECTIONS, "search", search)
    rc = bench.main(["--tiny", "--only", "load,processes,search", "--out", str(out),
                     "--tmp", str(tmp_path)])
    said = capsys.readouterr().out
    assert rc == 1 and "[processes] skipped: 2 torchrun ranks need 2 GPUs" in said
    assert "[search] FAILED after 0 s: CUDA error: an illegal memory access" in said
    assert [r["name"] for r in seen[0]["rows"]] == ["measured"] and "processes" in seen[0][
        "skipped"]
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["rows"]] == ["measured"]
    assert res["machine"]["gpu"] == "Emulated T4" and res["machine"]["precision"].startswith(
        "fp16 CUDA sm 7.5")
    assert set(res["failed"]) == {"search"} and set(res["skipped"]) == {"processes"}


def test_bench_agreement_is_judged_on_centred_vectors():
    """Embeddings that share one big direction (as a random-init network's do: two different
    images at a raw cosine of ~0.995) pass a raw 'cosine >= 0.99' check even when the rows are
    other images. The centred check passes the same images with small noise and fails
    mismatched rows."""
    rng = np.random.default_rng(0)
    x = unit(np.ones(64) + 0.07 * rng.standard_normal((40, 64)))
    assert (x @ x.T).min() > 0.98  # different images, nearly parallel
    close = bench.agreement(unit(x + 4e-4 * rng.standard_normal(x.shape)), x)
    assert bench.agrees(close) and close["centred"] > 0.99 > close["others"]
    swapped = bench.agreement(np.roll(x, 1, axis=0), x)  # every row another image
    assert swapped["cos"] > 0.99 and not bench.agrees(swapped) and swapped["top1"] == 0.0


# ============================================================================
# colab.ipynb: the notebook a Colab user runs, executed top to bottom on the CPU


# The smallest settings that still run every cell: the test runs inside this checkout (no clone,
# no install), 64 px, 1 epoch, no worker processes. Injected after the "parameters" cell, as
# papermill injects its "injected-parameters" cell.
NOTEBOOK_CI = """CLONE = False
DEMO_N = 48
BACKBONE = "resnet18"
WEIGHTS = "none"
IMG_SIZE = 64
EPOCHS = 1
WORKERS = 0"""


def test_colab_notebook_runs_on_the_cpu(tmp_path, monkeypatch):
    """colab.ipynb through nbclient in a fresh kernel, in tmp_path with this checkout on the
    path: no error output from any cell, the pages it shows written, and the GPU check cell
    saying the device and the precision it chose."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(os.path.join(HERE, "colab.ipynb"), as_version=4)
    at = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(at) == 1 and nb.cells[0].cell_type == "markdown"  # runtime advice comes first
    nb.cells.insert(at[0] + 1, nbformat.v4.new_code_cell(
        NOTEBOOK_CI, metadata={"tags": ["injected-parameters"]}))
    monkeypatch.setenv("PYTHONPATH", HERE)  # the kernel imports this checkout's scripts
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the one_thread fixture, for the kernel
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr" and
              re.search(r"Traceback|error:", o.text)]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs)
    assert "device: cpu" in text and "no GPU: Runtime > Change runtime type" in text
    assert re.search(r"precision: \w+ weights, training: ", text)
    for page in ("runs/demo/report.html", "demo/index/results.html", "demo/index/map.html"):
        check_page(tmp_path / page)
    assert not (tmp_path / "results.html").exists()  # beside the index, not in the clone's root
    shown = [o["data"]["text/plain"] for c in nb.cells if "retrieve.main" in c.source
             for o in c.outputs if "text/plain" in o.get("data", {})]
    assert shown and all("\n" not in t and len(t) < 200 for t in shown), shown  # one line
    assert sum("text/html" in o.get("data", {}) for o in outputs) == 3  # shown inline


# ============================================================================
# README.md: the quick start and "Your own paintings" run as written, at the smallest settings


# Appended to each README command (argparse keeps a flag's last value): the tests' settings.
README_TINY = {("data.py", "demo"): ["--n", "48"],
               ("crnn.py", "--train"): [*CRNN_FAST, "--epochs", "1"],
               ("crnn.py", "--eval"): ["--workers", "0"],
               ("crnn.py", "--predict"): ["--workers", "0"],
               ("retrieve.py", "--build"): RETRIEVE_FAST,
               ("retrieve.py", "--eval"): ["--workers", "0", "--eval-queries", "8"]}


def readme_commands(section):
    """The commands of a README section's ```bash blocks: continuation lines joined, `&&`
    chains split, comments, installs and the test run left out."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for cmd in line.split(" && "):
                cmd = cmd.strip()
                if cmd.startswith("python ") and not cmd.startswith("python -m pytest"):
                    out.append(cmd)
    return out


def run_readme_command(cmd, cwd):
    """One README line: bash expands it (quotes, $(...), # comments) into argv, then the
    script's main runs here, in-process, with README_TINY's flags after the README's."""
    argv = subprocess.run(["bash", "-c", f'printf "%s\\0" {cmd}'], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.split("\0")[:-1]
    assert argv[0] == "python", cmd
    script, args = argv[1], argv[2:]
    tiny = next((v for (s, flag), v in README_TINY.items() if s == script and flag in args), [])
    main = {"data.py": data.main, "crnn.py": crnn.main, "retrieve.py": retrieve.main}[script]
    main([*args, *tiny])


def test_readme_quick_start_and_own_paintings_run_as_written(tmp_path, monkeypatch, capsys):
    quick, own = readme_commands("Quick start"), readme_commands("Your own paintings")
    assert any("crnn.py --train" in c for c in quick) and any("--eval" in c for c in quick)
    assert any("data.py folder" in c for c in own) and any("--predict" in c for c in own)
    monkeypatch.chdir(tmp_path)
    for cmd in quick + own:
        run_readme_command(cmd, tmp_path)
    out = capsys.readouterr().out
    assert os.path.isfile("runs/demo/report.html") and os.path.isfile("runs/mine/report.html")
    assert "predictions.csv" in out and files.read_csv("mine/manifest.csv")
