"""Benchmarks: ArtExtract's paths against the naive way, side by side in one run.

Holds timing harnesses and naive baselines only: what it measures is the scripts' own code,
imported, never a copy of it. The model-side sections (loading, embedding, training) and the
command line are here; the index-side ones (search, memory, scale, layout, aspects) and the
row/timing helpers in bench_index.py.

Shell:
    python bench.py --quick                 # about 5 minutes on 2 CPU cores
    python bench.py                         # the full run behind the README's table
    python bench.py --only load,search --out bench.json   # load embed train search memory
    python bench.py --only processes,merge               # torchrun build, sharded-index merge
    python bench.py --only layout            # the map's layout against PCA and sklearn t-SNE
    python bench.py --only aspects          # figure search, verification, --where
    python bench.py --only detect           # the keypoint detector's images/s (pose, face)
    python bench.py --tiny                  # seconds: a smoke test, numbers mean little

Notebook:
    import bench; bench.main(["--quick"])

Each section times the naive way and ours in the same process on the same inputs, and prints
one table (naive, ours, ratio, target) that also goes to bench.json. "Naive" is what published
art-classification code tends to do: decode full-size JPEGs every epoch, embed one image at a
time in fp32, train the whole CNN every epoch, search a flat index one query at a time, and
stack per-image vectors from a Python list before indexing them. The scripts call
nets.tune_malloc() at start; so does this process (both sides of every comparison run under it,
as the table says), and the embedding section also reruns ours in a child process without it to
show what it buys.
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import faiss
import numpy as np
import torch
from PIL import Image

import aspects
import crnn
import crnn_data
import data
import embed
import files
import metrics
import nets
import painter
import retrieve
from bench_index import (
    HERE,
    Skipped,
    bench_aspects,
    bench_build_processes,
    bench_device,
    bench_layout,
    bench_memory,
    bench_merge,
    bench_search,
    by_mode,
    peak_rss_mb,
    quiet,
    row,
    timed,
)

# ----------------------------------------------------------------------------- 1. image loading

def make_big_jpegs(folder, n, size=(2400, 1800), seed=0):
    """Painting-like JPEGs of WikiArt/NGA original size: a demo painting upscaled, plus grain
    for a scan's entropy: about 1.2 bits/pixel (650 KB at 2400x1800, q90). Entropy matters:
    draft mode skips IDCT work, never Huffman decoding, which grows with the file's bits."""
    rng = np.random.default_rng(seed)
    hands = painter.demo_artists(rng)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        style = painter.DEMO_STYLES[i % len(painter.DEMO_STYLES)]
        genre = painter.DEMO_GENRES[i % len(painter.DEMO_GENRES)]
        im = painter.demo_painting(style, genre, hands[i % len(hands)], rng, short=240)
        im = im.resize(size, Image.BICUBIC)
        a = np.asarray(im, np.int16) + rng.normal(0, 2, (size[1], size[0], 1)).astype(np.int16)
        p = os.path.join(folder, f"big{i}.jpg")
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(f"big{i}.jpg")
    return paths


def bench_loading(args, tmp):
    src, cache = os.path.join(tmp, "big"), os.path.join(tmp, "cache")
    paths = make_big_jpegs(src, by_mode(args, 2, 6, 24))
    tf = nets.make_transform(224)
    mb = np.mean([os.path.getsize(os.path.join(src, p)) for p in paths]) / 2**20

    def full():  # the naive way: decode every pixel, then shrink
        for p in paths:
            with Image.open(os.path.join(src, p)) as im:
                tf(im.convert("RGB"))

    def draft():
        for p in paths:
            tf(files.load_image(os.path.join(src, p), 224))

    def cached():
        for p in paths:
            tf(files.load_image(os.path.join(cache, p), 224))

    files.write_csv(os.path.join(tmp, "big.csv"), ["path"], [[p] for p in paths])
    t_resize = timed(lambda: data.main(["resize", "--manifest", os.path.join(tmp, "big.csv"),
                                        "--root", src, "--out", cache, "--size", "256",
                                        "--workers", "1"]))
    n, rep = len(paths), 2
    t_full, t_draft, t_cache = timed(full, rep), timed(draft, rep), timed(cached, rep)
    note = f"{n} JPEGs 2400x1800, {mb:.2f} MB each, to a 224 px tensor, 1 thread"
    return [
        row("load", "draft-mode decode vs full decode", n / t_full, n / t_draft, "img/s", 3,
            note=note),
        row("load", "resized cache (256 px) vs full decode", n / t_full, n / t_cache, "img/s",
            10, note=f"one-off cache build: {n / t_resize:.1f} img/s with 1 thread"),
    ]


# ----------------------------------------------------------------------------- 2. embedding

def demo_tensors(n, size=224, seed=0):
    """n painting-like images (data.py's synthetic painter) as a normalised (n, 3, S, S) batch."""
    rng = np.random.default_rng(seed)
    hands, tf = painter.demo_artists(rng), nets.make_transform(size)
    ims = [painter.demo_painting(painter.DEMO_STYLES[i % 6], painter.DEMO_GENRES[i % 4],
                                 hands[i % 6], rng, short=size) for i in range(n)]
    return torch.stack([tf(im) for im in ims])


def embed_config(precision, pool="avg"):
    """retrieve.py's config for a seeded random ResNet50 at 224 px."""
    return {"ckpt": None, "backbone": "resnet50", "weights": "none", "init_seed": 0,
            "pool": pool, "grid": 2, "img_size": 224, "precision": precision}


def naive_model():
    """What published code tends to run: torchvision resnet50 as it comes, fc dropped, fp32."""
    trunk = nets.backbone("resnet50", "none", seed=0)[0]
    return torch.nn.Sequential(trunk, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def rate(fn, n, repeat=2):
    """(img/s, the last result): best of `repeat` timed calls after one warm-up call (oneDNN
    primitive creation, allocator growth)."""
    out = fn()
    return n / timed(fn, repeat), out


def embed_ways(x, device, batch=32, rounds=2):
    """{way: (img/s, (n, d) embeddings)} for the naive loop (1 by 1, fp32, no_grad) and ours
    (retrieve.py's embedder, batched, BN folded, channels_last, inference_mode) in fp32, under
    autocast, and with low-precision weights, whichever of the last two apply on device. Each
    way is warmed once, then the ways take turns for `rounds` rounds and keep their best: a
    machine that speeds up or slows down during the run favours none of them."""
    naive = naive_model().to(device)

    def run_naive():
        with torch.no_grad():
            return np.concatenate([naive(x[i:i + 1].to(device)).float().cpu().numpy()
                                   for i in range(len(x))])
    runs = {"naive": run_naive}
    low, amp = nets.inference_precision(device)[0], nets.autocast_dtype(device)
    ways = [("fp32", "fp32", None)] + ([("autocast", "fp32", amp)] if amp else []) + \
        ([(f"{low} weights", low, None)] if low != "fp32" else [])
    for way, precision, dtype in ways:
        with quiet():
            model = embed.load_model(embed_config(precision), device)

        def run_ours(model=model, dtype=dtype):
            with nets.autocast(device, dtype):
                return np.concatenate([embed.forward(model, x[i:i + batch], device)
                                       for i in range(0, len(x), batch)])
        runs[way] = run_ours
    out = {way: fn() for way, fn in runs.items()}  # warm-up: oneDNN primitives, allocator
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for way, fn in runs.items():
            best[way] = min(best[way], timed(fn))
    return {way: (len(x) / best[way], out[way]) for way in runs}


def agreement(a, b, k=5):
    """How well embeddings a agree with reference embeddings b of the same images (row i of
    both: image i; at least 2 rows): {cos: mean cosine of matching rows; centred, centred_min:
    the same after subtracting the reference's mean from both; others: the largest centred
    cosine of an image in a to a different image in b; top1: the fraction of images whose
    nearest centred reference is their own; top5_overlap: top-k neighbours within each set}.

    Why centred: a network maps every image near one shared direction (two different images
    from a random-init ResNet50 meet at a cosine of 0.998 on average), so a raw cosine near 1
    proves little. Take that shared part away and an image must sit far closer to its own
    reference than to any other image (bf16 against fp32 weights, ResNet50: 0.995 against
    others at most 0.81)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    mu = b.mean(0)
    ca, cb = ((v - mu) / np.linalg.norm(v - mu, axis=1, keepdims=True) for v in (a, b))
    c = ca @ cb.T  # (n, n): image i of a against image j of the reference
    same, n = np.diag(c), len(c)
    k = min(k, n - 1)
    na = np.argsort(-(a @ a.T), axis=1)[:, 1:k + 1]
    nb = np.argsort(-(b @ b.T), axis=1)[:, 1:k + 1]
    return {"cos": float(np.mean(np.sum(a * b, axis=1))), "centred": float(same.mean()),
            "centred_min": float(same.min()),
            "others": float(c[~np.eye(n, dtype=bool)].max()) if n > 1 else -1.0,
            "top1": float(np.mean(c.argmax(1) == np.arange(n))),
            "top5_overlap": metrics.neighbours_kept(na, nb)}


def agrees(ag, floor=0.99):
    """The verdict on agreement(): a mean centred cosine >= floor, and every image nearest to
    its own reference (the top-5 overlap is reported, not judged: near-ties swap places)."""
    return ag["centred"] >= floor and ag["top1"] == 1.0


def embed_target(device):
    """>= 6x naive where low-precision matrix units exist (AMX / Zen 4 bf16, CUDA), else 1.5x:
    on two AVX2/AVX-512 cores in fp32 the naive loop already runs at a third of peak."""
    return 6 if nets.inference_precision(device)[0] != "fp32" else 1.5


def bench_embedding(args, tmp):
    device = bench_device(args)
    # a GPU embeds 32 images in tens of ms: too short a call to time once warm (lazy kernel
    # loading, cuDNN/cuBLAS handles, the caching allocator's growth), so it gets 8x the batches
    n = by_mode(args, 8, 32, 128) * (8 if device.type == "cuda" and not args.tiny else 1)
    ways = embed_ways(demo_tensors(n), device)
    r_naive, e_fp32 = ways["naive"][0], ways["fp32"][1]
    best = max((w for w in ways if w != "naive"), key=lambda w: ways[w][0])
    rows = []
    for way, (r, e) in ways.items():
        if way == "naive":
            continue
        ag = agreement(e, e_fp32)
        rows.append(row("embed", f"ResNet50 224 px: ours {way} vs 1-by-1 fp32", r_naive, r,
                        "img/s", embed_target(device) if way == best else None,
                        note=f"{n} images on {device.type}, batch 32; against ours fp32: "
                        f"centred cosine {ag['centred']:.4f} (min {ag['centred_min']:.4f}; "
                        f"other images <= {ag['others']:.2f}), raw {ag['cos']:.5f}, top-5 "
                        f"overlap {ag['top5_overlap']:.2f}"
                        f"{'' if agrees(ag) else ' (DISAGREES: see bench.agrees)'}",
                        cosine=ag["cos"], centred_cosine=ag["centred"],
                        top5_overlap=ag["top5_overlap"], agrees=agrees(ag)))
    if nets.inference_precision(device)[0] == "fp32":
        rows[-1]["note"] += ("; no low precision here: " + nets.inference_precision(device)[1])
    malloc = malloc_rows(n, ways["fp32"][0], r_naive) if device.type == "cpu" else []  # host
    return rows + malloc + pipeline_rows(args, tmp, device)


def malloc_rows(n, r_ours, r_naive):
    """ours and naive under glibc's default allocator (a child process with
    ARTEXTRACT_MALLOC_TUNING=0) against this process, which tunes as the scripts do here."""
    child = subprocess.run(
        [sys.executable, "-c", f"import bench; bench.embed_child({n})"], capture_output=True,
        text=True, env={**os.environ, "ARTEXTRACT_MALLOC_TUNING": "0"}, cwd=HERE)
    if child.returncode:
        print(f"note: the default-malloc child failed: {child.stderr.strip()[-300:]}")
        return []
    d_naive, d_ours = json.loads(child.stdout.strip().splitlines()[-1])
    tuned, why = nets.malloc_tuning_wanted()
    return [row("embed", "malloc as the scripts set it vs glibc default, ours",
                d_ours, r_ours, "img/s", note=f"scripts here: {'tuned' if tuned else 'default'} "
                f"({why}); naive: {d_naive:.1f} default vs {r_naive:.1f} img/s here")]


def embed_child(n):
    """Run in a child process (ARTEXTRACT_MALLOC_TUNING=0): glibc malloc as it comes."""
    nets.tune_malloc()
    ways = embed_ways(demo_tensors(n), torch.device("cpu"))
    print(json.dumps([ways["naive"][0], ways["fp32"][0]]))


def pipeline_rows(args, tmp, device):
    """`retrieve.py --build`'s embedding loop (embed_to_npy: decode in worker processes, the
    model, the rows to disk) as a fraction of the model alone on ready tensors, from the 256 px
    resize cache and from 500 px originals. Both warm: the loop's first batch (worker start,
    oneDNN primitive creation: 1-2 s once per run) is timed apart, in the note."""
    n = by_mode(args, 64, 96, 256)
    src, cache = os.path.join(tmp, "orig500"), os.path.join(tmp, "cache256")
    paths = make_big_jpegs(src, n, size=(667, 500))
    files.write_csv(os.path.join(tmp, "orig500.csv"), ["path"], [[p] for p in paths])
    with quiet():
        data.main(["resize", "--manifest", os.path.join(tmp, "orig500.csv"), "--root", src,
                   "--out", cache, "--size", "256"])
        model = embed.load_model(embed_config(nets.inference_precision(device)[0], "grid"),
                                    device)
    x = demo_tensors(128 if device.type == "cuda" else 32)  # a GPU: more than one batch
    r_model = rate(lambda: embed.forward(model, x, device), len(x))[0]
    rows, workers = [], retrieve.build_parser().get_default("workers")
    for name, root, target in (("256 px cache", cache, 0.85), ("500 px originals", src, 0.75)):
        warm, first, whole = max(loop_rates(model, paths, root, device, workers, tmp)
                                 for _ in range(2))  # best of 2: the box is shared
        rows.append(row("embed", f"--build loop from the {name} vs model alone", r_model, warm,
                        "img/s", target if device.type == "cpu" else None,  # CPU-calibrated
                        note=f"{n} images, resnet50 224 px grid pooling, "
                        f"--workers {workers}; ratio = fraction of the model-only rate; first "
                        f"batch {first:.1f} s, whole loop {whole:.1f} img/s"))
    return rows


def loop_rates(model, paths, root, device, workers, tmp, batch=32):
    """(img/s after the first batch, the first batch's seconds, img/s of the whole loop) of
    embed.embed_to_npy, timed batch by batch at its calls of embed.forward."""
    cfg = {**embed_config("fp32", "grid"), "dim": real_dim(model, device)}
    stamps, real = [time.perf_counter()], embed.forward

    def stamped(*a):
        out = real(*a)
        stamps.append(time.perf_counter())
        return out
    args = argparse.Namespace(batch_size=batch, workers=workers)
    embed.forward = stamped
    try:
        with quiet():
            embed.embed_to_npy(model, paths, root, cfg, args, device,
                                  os.path.join(tmp, "loop.npy"))
    finally:
        embed.forward = real
    d = np.diff(stamps)
    return float(batch * (len(d) - 1) / d[1:].sum()), float(d[0]), float(len(paths) / d.sum())


def real_dim(model, device):
    return embed.forward(model, torch.zeros(1, 3, 224, 224), device).shape[1]


# ----------------------------------------------------------------------------- 3. training

@contextlib.contextmanager
def stopwatch(module, name, spent):
    """Appends the wall seconds of every call of module.<name> to the list spent, in the block:
    crnn.py logs epoch times, not how long building its feature cache took."""
    fn = getattr(module, name)

    def timed_fn(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t0)

    setattr(module, name, timed_fn)
    try:
        yield spent
    finally:
        setattr(module, name, fn)


def crnn_epochs(demo, out, flags):
    """Train with crnn.py on the demo data, quietly: (log.jsonl records, seconds building the
    feature cache). Each record's img_per_s counts training only (crnn.py stops its clock before
    validation); time_s is the whole epoch: training, validation and checkpoint."""
    spent = []
    with quiet(), stopwatch(crnn_data, "build_cache", spent):
        crnn.main(["--train", "--data", os.path.join(demo, "manifest.csv"), "--out", out,
                   "--weights", "none", *flags])
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()], sum(spent)


def bench_training(args, tmp):
    """End-to-end epochs (decode, augment, backbone forward and backward) vs --freeze-backbone
    epochs from the cached backbone maps (RNN and heads only). Both use crnn.py's defaults,
    --workers included: decoding in worker processes is what end-to-end users run."""
    device = bench_device(args)
    gpu = device.type == "cuda"  # 3 steps an epoch would time the GPU's start, not its work
    n, backbone, size, epochs = by_mode(args, (96, "resnet18", 64, 1),
                                        (360 if gpu else 96, "resnet18", 128, 3 if gpu else 2),
                                        (360, "resnet50", 224, 3 if gpu else 2))
    demo = os.path.join(tmp, "demo")
    with quiet():
        data.main(["demo", "--out", demo, "--n", str(n)])
    flags = ["--backbone", backbone, "--img-size", str(size), "--epochs", str(epochs),
             "--device", device.type]
    e2e, _ = crnn_epochs(demo, os.path.join(tmp, "e2e"), flags)
    frozen, t_cache = crnn_epochs(demo, os.path.join(tmp, "frozen"), [*flags, "--freeze-backbone"])
    best = {k: max(recs, key=lambda r: r["img_per_s"]) for k, recs in
            (("e2e", e2e), ("frozen", frozen))}  # the warmest epoch of each
    n_cached = len(files.read_manifest(os.path.join(demo, "manifest.csv")))  # train + val
    amp = nets.autocast_dtype(device)  # what crnn.py trained under on this device
    workers = crnn.build_parser().get_default("workers")
    note = (f"{backbone} {size} px on {device.type}, demo n={n}, best of {epochs} epoch(s), "
            f"train img/s without validation; whole epoch with val + checkpoint: "
            f"{best['e2e']['time_s']:.1f} s vs {best['frozen']['time_s']:.2f} s; one-off cache "
            f"build: {t_cache:.1f} s for {n_cached} images "
            f"({nets.inference_precision(device)[0]} weights); training autocast "
            f"{str(amp).replace('torch.', '')}{' + GradScaler' if amp == torch.float16 else ''}, "
            f"workers {workers}")
    return [row("train", f"CRNN {backbone}: --freeze-backbone vs end-to-end",
                best["e2e"]["img_per_s"], best["frozen"]["img_per_s"], "img/s",
                20 if device.type == "cpu" else None, note=note,  # 20x: a CPU's target
                epoch_s_e2e=best["e2e"]["time_s"], epoch_s_frozen=best["frozen"]["time_s"],
                cache_build_s=t_cache)]


def bench_detector(args, tmp):
    """The keypoint detector behind the pose and face aspects, as --build runs it (batches of
    4): images/s at aspects.DETECT_SIZE against torchvision's default 800 px, on the same
    pictures. Random weights (nothing can be downloaded here) with the score threshold at 0,
    so that the keypoint head runs on its most boxes (aspects.MAX_FIGURES an image): a real
    model's worst case, as it keeps only the boxes that are people."""
    device = bench_device(args)
    n, side = by_mode(args, (2, 160), (8, 640), (16, 1024))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side * 4 // 3, 3), np.uint8))
              for _ in range(n)]
    rate = {}
    for size in (800, aspects.DETECT_SIZE):
        model = aspects.load_detector("none", size)
        aspects.detect(model, images[:1], device, threshold=0.0)  # warm: allocations, kernels
        dt = timed(lambda m=model: aspects.detect(m, images, device, threshold=0.0))
        rate[size] = n / dt
    threads = torch.get_num_threads() if device.type == "cpu" else None
    note = (f"{n} pictures of {side * 4 // 3}x{side} on {device.type}"
            f"{f' ({threads} threads)' if threads else ''}, random weights, keypoint head on "
            f"{aspects.MAX_FIGURES} boxes an image; the build's pass also decodes (workers)")
    return [row("detect", f"pose detector {aspects.DETECT_SIZE} px vs torchvision's 800 px",
                rate[800], rate[aspects.DETECT_SIZE], "img/s", None, note=note)]


# ----------------------------------------------------------------------------- command line

SECTIONS = {"load": bench_loading, "embed": bench_embedding, "train": bench_training,
            "search": bench_search, "memory": bench_memory, "processes": bench_build_processes,
            "merge": bench_merge, "layout": bench_layout, "aspects": bench_aspects,
            "detect": bench_detector}
TINY_SECTIONS = "load,search,memory,aspects"  # --tiny: seconds, for tests; the numbers mean little


def machine(device):
    """What the numbers were measured on: CPU (and whether it has AMX), GPU, versions, and the
    precision and allocator choices the scripts make here."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "amx": "amx_bf16" in nets.cpu_flags_text(), "cores": os.cpu_count(),
            "torch": torch.__version__, "faiss": faiss.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "device": str(device), "precision": " ".join(nets.inference_precision(device)),
            "thp": nets.transparent_hugepages()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    gpu_faiss=getattr(faiss, "get_num_gpus", lambda: 0)())
    return info


def fmt(v, unit):
    if v is None:
        return "-"
    return f"{v:.2f}" if unit in ("ms", "x") or v < 100 else f"{v:.0f}"


def print_table(rows, tiny=False):
    print(f"\n{'section':<8} {'comparison':<56} {'naive':>9} {'ours':>9} {'unit':<7} "
          f"{'ratio':>7} {'target':>7}  met")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.{2 if r['ratio'] < 10 else 1}f}x"
        target = "-" if r["target"] is None else f">={r['target']}x"
        met = "not measured at this size" if tiny and r["target"] is not None else \
            {None: "", True: "yes", False: "NO"}[r["met"]]
        print(f"{r['section']:<8} {r['name']:<56} {fmt(r['naive'], r['unit']):>9} "
              f"{fmt(r['ours'], r['unit']):>9} {r['unit']:<7} {ratio:>7} {target:>7}  {met}")
        if r["note"]:
            print(f"{'':<8}   {r['note']}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=files.Help)
    p.add_argument("--quick", action="store_true", help="small sizes: about 5 min on 2 cores")
    p.add_argument("--tiny", action="store_true",
                   help=f"smoke-test sizes, seconds; sections {TINY_SECTIONS} unless --only")
    p.add_argument("--only", help=f"comma-separated sections (default: {','.join(SECTIONS)})")
    p.add_argument("--out", default="bench.json", help="JSON results")
    p.add_argument("--tmp", help="scratch folder (default: a fresh temp dir)")
    p.add_argument("--device", help="cpu or cuda for the embed and train sections (default: "
                   "cuda when there is one)")
    return p


def run_sections(only, args, info):
    """Runs each section; bench.json is rewritten after each (temp file + rename), so a crash
    or Ctrl-C keeps every row measured before it. A section that raises is a failure: its
    traceback goes to stderr, one line to the table, and the next section runs."""
    rows, skipped, failed = [], {}, {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for s in only:
            t0 = time.time()
            try:
                new = SECTIONS[s](args, tmp)
                for r in new if args.tiny else ():  # the targets are set for real sizes
                    r["met"] = None
                rows += new
                print(f"[{s}] done in {time.time() - t0:.0f} s", flush=True)
            except Skipped as e:
                skipped[s] = str(e)
                print(f"[{s}] skipped: {e}", flush=True)
            except (Exception, SystemExit) as e:  # SystemExit: a child process's error
                if files.disk_full(e):  # no later section can write either: stop, one line
                    raise SystemExit(f"bench.py: error: {files.os_error_line(e)}") from None
                if not isinstance(e, SystemExit):
                    traceback.print_exc()
                failed[s] = files.one_line(e)
                print(f"[{s}] FAILED after {time.time() - t0:.0f} s: {failed[s]}", flush=True)
            write_results(args.out, info, rows, skipped, failed)
    return rows, skipped, failed


def write_results(path, info, rows, skipped, failed):
    info = {**info, "peak_rss_mb": peak_rss_mb()}
    files.atomic_write(path, json.dumps({"machine": info, "rows": rows, "skipped": skipped,
                                        "failed": failed}, indent=1) + "\n")


def main(argv=None):
    """0 when every section ran (or was skipped as this machine cannot run it), else 1."""
    args = build_parser().parse_args(argv)
    args.only = args.only or (TINY_SECTIONS if args.tiny else ",".join(SECTIONS))
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench.py: error: unknown section {unknown[0]!r} "
                         f"(known: {', '.join(SECTIONS)})")
    try:
        device = bench_device(args)
    except files.UserError as e:
        raise SystemExit(f"bench.py: error: {e}") from None
    tuned = nets.tune_malloc()
    info = {**machine(device), "malloc_tuned": tuned, "quick": args.quick,
            "tiny": args.tiny}
    print(f"bench: {json.dumps(info)}")
    rows, skipped, failed = run_sections(only, args, info)
    print_table(rows, args.tiny)
    for s, why in {**skipped, **failed}.items():
        print(f"{s}: {'FAILED' if s in failed else 'skipped'}: {why}")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
