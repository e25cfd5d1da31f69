"""The FAISS index and its folder: index types and their parameters, training, adding, search,
the GPU copy, the crash-consistent generation store, and a sharded build's files (the plan, the
shards, their checks) merged into one index.

Holds no embedding, no model and no command line (retrieve.py): faiss and numpy only (torch
only to name the current GPU when a bare `cuda` device asks for one), so it reads and tests
without torch.

    import index
    cfg, meta, xb, ix = index.open_index("demo/index")   # checked: version, sizes, fingerprints
    D, I = index.search(ix, xq, k=5)                      # xq (nq, dim) float32 unit rows
    with index.IndexWriter("demo/index") as w:            # locked; a new generation in w.dir
        ...                                                # write the four FILES there
        w.commit()                                         # CURRENT names it: one rename
"""

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
import time

import faiss
import numpy as np

import files
from files import UserError, one_line

try:  # the index lock: fcntl on POSIX, msvcrt on Windows
    import fcntl
except ImportError:
    fcntl = None
    import msvcrt

# FAISS names used below: xb (n, d) float32 database vectors, xq (nq, d) query vectors, k results
# per query. index.search(xq, k) returns D (nq, k) scores, here inner products of unit vectors
# (= cosine similarity, best first), and I (nq, k) ids = row numbers of embeddings.npy and
# meta.csv (-1 where an approximate index found fewer than k).

FORMAT, VERSION = "artextract-retrieve-index", 2  # 2: generations, fingerprints
FILES = ("config.json", "embeddings.npy", "meta.csv", "index.faiss")
INDEX_DEFAULTS = {"index_type": "flat", "hnsw_m": 32, "ef_construction": 200, "ef_search": 128,
                  "nprobe": 16}
CHUNK = 65536  # rows per copy between .npy files: bounded RAM at any n
CHUNK_BYTES = 64 << 20  # per index.add: 8k rows of 2048-d float32
TRAIN_MAX = 100_000  # ivfpq / pca training sample, rows
GPU_PQ_M = (64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 3, 2, 1)  # m that GPU IVFPQ accepts


# ----------------------------------------------------------------------------- faiss index

def default_nlist(n_train, args):
    """--nlist, else ~ 4 sqrt(n) inverted lists with >= 39 training points per list."""
    return args.nlist or max(1, min(round(4 * math.sqrt(n_train)), n_train // 39))


def ivfpq_params(d, n_train, args):
    """nlist as default_nlist; m the largest GPU-friendly divisor of d up to 64 (bytes per
    code); nbits 8, fewer when n_train is under 39 * 256."""
    nlist = default_nlist(n_train, args)
    m = args.pq_m or next(m for m in GPU_PQ_M if d % m == 0)
    nbits = args.nbits or min(8, int(math.log2(max(n_train / 39, 1))))
    if d % m:
        raise UserError(f"--pq-m {m} must divide the vector size {d}")
    if nbits < 4 or n_train < 2 ** nbits or n_train < nlist:
        raise UserError(f"ivfpq cannot train on {n_train} vectors (nbits={nbits}, "
                        f"nlist={nlist}; needs >= 624): use --index-type flat (exact)")
    nprobe = min(args.nprobe or INDEX_DEFAULTS["nprobe"], nlist)
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}


def index_params(kind, d, n, args):
    if kind == "hnsw":  # efSearch 128: recall@5 0.997 (64: 0.985) on 100k x 256 synthetic
        d = INDEX_DEFAULTS
        return {"M": args.hnsw_m or d["hnsw_m"],
                "ef_construction": args.ef_construction or d["ef_construction"],
                "ef_search": args.ef_search or d["ef_search"]}
    if kind == "ivfpq":
        return ivfpq_params(d, min(n, TRAIN_MAX), args)
    if kind == "ivf-flat":  # full vectors in the lists: exact distances, 4 * d bytes each
        nlist = default_nlist(min(n, TRAIN_MAX), args)
        return {"nlist": nlist, "nprobe": min(args.nprobe or INDEX_DEFAULTS["nprobe"], nlist)}
    return {}


def check_pca(pca, dim, n):
    """The vector size the index sees: pca, or dim without it."""
    if pca is None:
        return dim
    if not 1 <= pca < min(dim, n):
        raise UserError(f"--pca {pca}: needs 1 <= D < min(embedding size {dim}, images {n})")
    return pca


def index_from_vectors(xb, args):
    """(index config, trained and filled index) for xb (n, dim) under the flags in args."""
    n, dim = xb.shape
    kind = args.index_type or INDEX_DEFAULTS["index_type"]
    d = check_pca(args.pca, dim, n)
    icfg = {"metric": "inner_product", "dim": dim, "index_type": kind, "pca": args.pca,
            "index_dim": d, "index_params": index_params(kind, d, n, args),
            "center": bool(getattr(args, "center", None)) and not args.pca}  # pca centres too
    return icfg, fill_index(new_index(icfg), xb, args.seed)


def new_index(cfg):
    """Empty FAISS index from cfg: [PCA-whitening, re-normalisation,] then the index type."""
    d, p, ip = cfg["index_dim"], cfg["index_params"], faiss.METRIC_INNER_PRODUCT
    if cfg["index_type"] == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["M"], ip)
        index.hnsw.efConstruction = p["ef_construction"]
    elif cfg["index_type"] == "ivfpq":
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, p["nlist"], p["m"], p["nbits"], ip)
    elif cfg["index_type"] == "ivf-flat":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p["nlist"], ip)
    else:
        index = faiss.IndexFlatIP(d)
    if cfg["pca"] or cfg.get("center"):  # inside the saved index: queries, --add and
        index = faiss.IndexPreTransform(index)  # --eval get the same transform for free
        index.prepend_transform(faiss.NormalizationTransform(d, 2.0))  # back on the sphere
        index.prepend_transform(faiss.PCAMatrix(cfg["dim"], d, -0.5) if cfg["pca"] else
                                faiss.CenteringTransform(d))  # -0.5: whitening; the mean
    set_search_params(index, p)
    return index


def inner(index):
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) \
        else index


def set_search_params(index, p):
    """efSearch (hnsw) and nprobe (ivf): search-time knobs, stored, overridable per query."""
    idx = inner(index)
    if hasattr(idx, "hnsw") and p.get("ef_search"):
        idx.hnsw.efSearch = p["ef_search"]
    if hasattr(idx, "nprobe") and p.get("nprobe"):
        idx.nprobe = p["nprobe"]


def fill_index(index, xb, seed=0):
    """Train on a seeded sample of <= TRAIN_MAX rows when needed, then add xb in chunks."""
    train_index(index, xb, seed)
    add_rows(index, xb)
    return index


def train_index(index, xb, seed=0):
    """Train (PCA, coarse quantizer, PQ) on a seeded sample of <= TRAIN_MAX rows of xb, in
    row order; a no-op for an index that needs no training."""
    if not index.is_trained:
        pick = np.random.default_rng(seed).choice(len(xb), min(len(xb), TRAIN_MAX), replace=False)
        index.train(np.ascontiguousarray(xb[np.sort(pick)], dtype=np.float32))


def add_rows(index, xb, start=0):
    """index.add(xb[start:]), CHUNK_BYTES at a time. A flat index is sized once and filled in
    place: faiss's own add grows its buffer by doubling, holding old and new copies at once
    (bench.py memory: peak RSS 2.6 GB -> 1.4 GB for 100k x 2048, 0.8 GB of them the vectors)."""
    n0, n_new, d = index.ntotal, len(xb) - start, xb.shape[1]
    step = max(1, CHUNK_BYTES // (4 * d))
    flat = type(index) in (faiss.IndexFlatIP, faiss.IndexFlatL2)  # not hnsw, ivf, pca
    if flat:
        index.codes.resize((n0 + n_new) * d * 4)
        dst = faiss.rev_swig_ptr(index.codes.data(), index.codes.size()).view(np.float32)
        dst = dst.reshape(n0 + n_new, d)
    prog = files.Progress(n_new, "index", unit="vec")
    for i in range(start, len(xb), step):
        chunk = read_chunk(xb, i, i + step)
        if flat:
            dst[n0 + i - start:n0 + i - start + len(chunk)] = chunk
        else:
            index.add(chunk)
        prog.update(len(chunk))
    if flat:
        index.ntotal = n0 + n_new


def read_chunk(xb, i, j):
    """xb[i:j] as float32. From a memmap, through a short-lived map of its file: pages read
    through a long-lived map stay resident (in RSS) until it is closed."""
    if isinstance(xb, np.memmap) and xb.filename and xb.filename.endswith(".npy"):
        m = np.load(xb.filename, mmap_mode="r")
        if m.shape == xb.shape and m.dtype == xb.dtype:  # the whole file, not a view of it
            out = np.array(m[i:j], dtype=np.float32)
            del m
            return out
    return np.ascontiguousarray(xb[i:j], dtype=np.float32)


def search(index, xq, k, chunk=4096):
    """D, I for xq, chunk queries at a time (bounded RAM for many queries)."""
    parts = [index.search(np.ascontiguousarray(xq[i:i + chunk], dtype=np.float32), k)
             for i in range(0, len(xq), chunk)]
    return np.concatenate([D for D, _ in parts]), np.concatenate([I for _, I in parts])


GPU_MAX = 2048  # the largest k (and nprobe) FAISS's GPU kernels take


def to_search_device(index, cfg, device, all_gpus=False):
    """A GPU copy for search when faiss has GPU support and we run on cuda (hnsw: CPU only):
    on the one GPU that device names (cuda:N; plain cuda: torch's current GPU), or with
    all_gpus (--all-gpus) a replica on every GPU, the queries split over them.

    Only the inner index goes to the GPU; --pca's transforms (PCA, re-normalisation) run on the
    host: FAISS cannot clone a NormalizationTransform, and a failed clone of the whole index
    leaves its inner part on the GPU, memory that a notebook never gets back."""
    if device.type != "cuda" or cfg["index_type"] == "hnsw" or \
            not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    body = inner(index)
    if getattr(body, "nprobe", 0) > GPU_MAX:
        print(f"note: the index stays on the CPU (--nprobe {body.nprobe} > {GPU_MAX}, the GPU's "
              "limit)")
        return index
    try:
        gpu, res, where = clone_to_gpus(body, cfg, device, all_gpus)
    except RuntimeError as e:  # e.g. IVFPQ with nbits < 8, or sub-vectors the kernels lack
        print(f"note: the index stays on the CPU ({one_line(e)})")
        return index
    print(f"index on {where}")
    chain = [index.chain.at(i) for i in range(index.chain.size())] \
        if isinstance(index, faiss.IndexPreTransform) else []
    return OnGpu(index, gpu, chain, res)


def clone_to_gpus(body, cfg, device, all_gpus):
    """(GPU index, its GpuResources or None, where in words). FAISS numbers GPUs as torch
    does (both follow CUDA_VISIBLE_DEVICES)."""
    fp16 = cfg["index_type"] == "ivfpq"  # m=64 lookup tables fit shared memory in fp16
    if all_gpus:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = fp16
        return faiss.index_cpu_to_all_gpus(body, co), None, f"all {faiss.get_num_gpus()} GPUs"
    if device.index is not None:
        gpu_id = device.index
    else:  # a bare cuda device: torch's current GPU (torch is loaded: it made the device)
        import torch
        gpu_id = torch.cuda.current_device()
    if gpu_id >= faiss.get_num_gpus():
        raise RuntimeError(f"FAISS sees {faiss.get_num_gpus()} GPUs, not cuda:{gpu_id}")
    co = faiss.GpuClonerOptions()
    co.useFloat16 = fp16
    res = faiss.StandardGpuResources()  # scratch memory and streams: must outlive the index
    return faiss.index_cpu_to_gpu(res, gpu_id, body, co), res, f"GPU {gpu_id}"


class OnGpu:
    """Search on a GPU copy of an index's inner part, its transforms applied on the host first.
    A k above GPU_MAX searches the CPU index instead (GPU FAISS refuses it)."""

    def __init__(self, cpu, gpu, chain, res=None):
        self.cpu, self.gpu, self.chain, self.ntotal = cpu, gpu, chain, cpu.ntotal
        self.res = res  # the GpuResources the copy runs on, kept alive with it

    def search(self, xq, k):
        if k > GPU_MAX:
            if not getattr(self, "said", False):
                print(f"note: {k} neighbours are more than GPU FAISS returns ({GPU_MAX}): "
                      "searching on the CPU")
                self.said = True
            return self.cpu.search(xq, k)
        for vt in self.chain:  # PCA-whitening, then back onto the unit sphere
            xq = vt.apply(xq)
        return self.gpu.search(xq, k)


def drop_self(I, ids, k):
    """Mask keeping k results per row: all but the query's own id (or, absent, the last)."""
    keep = I != ids[:, None]
    keep[keep.all(1), -1] = False
    return keep & (np.cumsum(keep, 1) <= k)


# ----------------------------------------------------------------------------- index folder

# INDEX/CURRENT names the generation in use ("gen-4"); INDEX/gen-4/ holds its four FILES. A
# writer, holding INDEX/lock, builds gen-5 beside it, fsyncs it, then replaces CURRENT with one
# rename (as LevelDB's CURRENT file): a reader sees gen-4 or gen-5, never a mix, wherever the
# writer dies. Old generations are removed only after the switch. An index from before
# generations (the four files at the top of INDEX) reads as generation 0; the next --build or
# --add moves it into a generation. Logs and pictures (log.jsonl, eval.json, skipped.csv,
# query_sheet.png) stay at the top: they describe runs, not one generation.


POINTER, LOCK = "CURRENT", "lock"
# Work that outlives a failed write: torchrun ranks' finished parts (INDEX/parts; INDEX/slices
# before issue 22) and a sharded build's trained index and shards (INDEX/shards); never read
# by a query.
WORK_DIRS = ("parts", "slices", "shards")
CONFIG_FIELDS = ("dim", "n", "index_type", "index_params", "pca", "index_dim", "backbone",
                 "weights", "ckpt", "img_size", "pool", "grid", "init_seed", "images",
                 "manifest")


def generation(folder):
    """The folder holding the current generation's files: INDEX/gen-N, or INDEX (generation 0)."""
    path = os.path.join(folder, POINTER)
    try:
        with open(path, encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return folder
    if not re.fullmatch(r"gen-\d+", name) or not os.path.isdir(os.path.join(folder, name)):
        raise UserError(f"{path} names no generation ({name[:40]!r}): rebuild with --build")
    return os.path.join(folder, name)


def fingerprint(path, block=1 << 20):
    """'size:sha256 of the first, middle and last MiB' of a file: cheap at any size, and it
    differs between two builds' files (vectors of other models, another order)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for at in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            f.seek(at)
            h.update(f.read(block))
    return f"{size}:{h.hexdigest()[:32]}"


class IndexWriter:
    """`with IndexWriter(folder) as w:` holds folder's lock and a fresh generation folder w.dir;
    w.commit() makes it current. Leaving without commit removes w.dir (and the whole folder
    when it held no index before), so a refused or failed write leaves what was there."""

    def __init__(self, folder):
        self.folder, self.committed = folder, False

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        self.fd = lock_file(os.path.join(self.folder, LOCK), self.folder)
        try:
            try:
                current = generation(self.folder)
            except UserError:  # a corrupt CURRENT: this write replaces it
                current = None
            self.fresh = current is not None and \
                not os.path.isfile(os.path.join(current, "config.json"))
            remove_generations(self.folder, keep=current)  # what killed writers left
            gens = [int(g[4:]) for g in os.listdir(self.folder) if re.fullmatch(r"gen-\d+", g)]
            self.dir = os.path.join(self.folder, f"gen-{max(gens, default=0) + 1}")
            os.makedirs(self.dir)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def commit(self):
        sync_folder(self.dir)
        files.atomic_write(os.path.join(self.folder, POINTER), os.path.basename(self.dir) + "\n",
                          durable=True)
        self.committed = True
        remove_generations(self.folder, keep=self.dir)
        for name in FILES:  # a generation-0 index, now moved into this generation
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, name))

    def __exit__(self, *exc):
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.fresh:  # no index before: none after, but resumable work stays
                clear_folder(self.folder, keep=WORK_DIRS)
        os.close(self.fd)  # releases the lock
        return False


def clear_folder(folder, keep):
    """Remove everything in folder but the names in keep; the folder too when nothing is kept."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name in keep:
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if not os.listdir(folder):
        os.rmdir(folder)


def lock_file(path, folder):
    """An open fd holding an exclusive lock on path (fcntl on POSIX, msvcrt on Windows), with
    this pid written in it; a second writer gets one line naming the holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{folder} is being written by another process (pid {holder}): wait "
                        "for it to finish, or write another --index") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def remove_generations(folder, keep):
    """Every gen-N folder but keep (None: all of them)."""
    for g in os.listdir(folder):
        path = os.path.join(folder, g)
        if re.fullmatch(r"gen-\d+", g) and (keep is None or
                                            os.path.abspath(path) != os.path.abspath(keep)):
            shutil.rmtree(path, ignore_errors=True)  # a reader's open maps keep their data


def sync_folder(folder):
    """fsync every file in folder, then the folder itself: on disk before CURRENT names it."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    if os.name == "posix":  # a directory fd can be fsynced on POSIX only
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_generation(gen, index, header, rows, cfg):
    """index.faiss, meta.csv and config.json (with the fingerprints of all three data files)
    into the generation folder gen, which already holds embeddings.npy (and meta.csv when
    rows is None: --merge-shards streams it there)."""
    write_index_file(index, os.path.join(gen, "index.faiss"))
    if rows is not None:
        files.write_csv(os.path.join(gen, "meta.csv"), header,
                       [[r.get(c) or "" for c in header] for r in rows])
    cfg["n"] = index.ntotal if rows is None else len(rows)
    cfg["version"] = VERSION  # an --add to a version-1 index migrates it
    cfg["files"] = {f: fingerprint(os.path.join(gen, f)) for f in FILES if f != "config.json"}
    files.atomic_write(os.path.join(gen, "config.json"), json.dumps(cfg, indent=1) + "\n")


def read_config(gen, folder):
    path = os.path.join(gen, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"no index in {folder} (config.json missing): build one with --build")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({one_line(e)}): rebuild with --build") from None
    version = cfg.get("version") if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or version not in (1, VERSION) \
            or version == 1 and gen != folder:
        raise UserError(f"{folder} is not a version-{VERSION} retrieve.py index (found "
                        f"version {version}): rebuild it with --build")
    missing = [k for k in CONFIG_FIELDS + (("files",) if version > 1 else ()) if k not in cfg]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: rebuild with --build")
    cfg.setdefault("precision", legacy_precision(cfg))  # queries embed as the index was built
    return cfg


def legacy_precision(cfg):
    """The precision of an index built before config.json recorded one (it had autocast)."""
    return {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.get("amp"), "fp32")


def open_index(folder):
    """(cfg, meta rows, xb memmap, index) of the current generation, checked for version, sizes
    and fingerprints. A writer that removes the generation meanwhile: read the new one."""
    try:
        return open_generation(generation(folder), folder)
    except FileNotFoundError:
        return open_generation(generation(folder), folder)


def open_generation(gen, folder):
    cfg = read_config(gen, folder)
    missing = [f for f in FILES if not os.path.isfile(os.path.join(gen, f))]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: rebuild with --build")
    changed = [f for f, fp in cfg.get("files", {}).items()
               if fingerprint(os.path.join(gen, f)) != fp]
    if changed:
        raise UserError(f"{os.path.join(gen, 'config.json')} does not describe the "
                        f"{', '.join(changed)} beside it (another build's?): rebuild with --build")
    try:
        xb = np.load(os.path.join(gen, "embeddings.npy"), mmap_mode="r")
        index = faiss.read_index(os.path.join(gen, "index.faiss"))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{folder}: corrupt index files ({one_line(e)}): rebuild with --build") \
            from None
    meta = files.read_csv(os.path.join(gen, "meta.csv"), required=("path",), what="meta.csv")
    if not len(xb) == len(meta) == index.ntotal == cfg["n"] or xb.shape[1] != cfg["dim"]:
        raise UserError(f"{folder} is inconsistent ({len(xb)} embeddings, {len(meta)} "
                        f"meta rows, {index.ntotal} indexed): rebuild with --build")
    return cfg, meta, xb, index


# ----------------------------------------------------------------------------- rows of .npy files

def compact_rows(dst, src, keep):
    """dst = the rows `keep` (ascending) of the .npy src, CHUNK rows at a time."""
    a = np.load(src, mmap_mode="r")
    out = files.open_memmap(dst, np.float32, (len(keep), a.shape[1]))
    for i in range(0, len(keep), CHUNK):
        out[i:i + CHUNK] = a[keep[i:i + CHUNK]]
    out.flush()


# ----------------------------------------------------------------------------- shard files

def shard_dir(index):
    return os.path.join(index, "shards")


def shard_files(index, i):
    d = shard_dir(index)
    return {"index": os.path.join(d, f"index.shard-{i}.faiss"),
            "embeddings": os.path.join(d, f"embeddings.shard-{i}.npy"),
            "meta": os.path.join(d, f"meta.shard-{i}.csv"),
            "json": os.path.join(d, f"shard-{i}.json")}


def trained_digest(index):
    """sha256 of what training produced: PCA, coarse centroids, PQ codebooks, and the sizes.
    Two shards with equal digests come from the same trained index."""
    h = hashlib.sha256()
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            t = faiss.downcast_VectorTransform(index.chain.at(i))
            for name in ("A", "b", "mean"):
                if hasattr(t, name):
                    h.update(faiss.vector_to_array(getattr(t, name)).tobytes())
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    h.update(faiss.vector_to_array(faiss.downcast_index(ivf.quantizer).codes).tobytes())
    if hasattr(ivf, "pq"):
        h.update(faiss.vector_to_array(ivf.pq.centroids).tobytes())
    h.update(f"{type(ivf).__name__} {index.d} {ivf.nlist} {ivf.code_size}".encode())
    return h.hexdigest()[:32]


def write_faiss(index, path):
    """faiss.write_index to a temp file, then rename: never a half index under path."""
    with files.replaced(path) as tmp:
        write_index_file(index, tmp)


def write_index_file(index, path):
    """faiss.write_index(index, path) through a Python file: a full disk is an OSError naming
    path. faiss's own file writer reports a failed close on stderr only and leaves a short
    file, and a failed write as a RuntimeError."""
    failed = []

    def write(b):
        try:
            return f.write(b)
        except OSError as e:
            failed.append(e)
            raise
    with files.writing(path), open(path, "wb") as f:
        try:
            faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        except RuntimeError:
            if failed:  # faiss says "py err": the OSError is the news
                raise failed[0] from None
            raise


def read_faiss(path, flags=0):
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:
        raise UserError(f"{path}: not a FAISS index ({one_line(e)})") from None


def join_meta(paths, dst):
    """The shards' meta.csv rows, in order, under one header: streamed, row by row."""
    with open(dst, "w", encoding="utf-8", errors="surrogateescape", newline="") as out:
        w = csv.writer(out, lineterminator="\n")
        for k, path in enumerate(paths):
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                rows = csv.reader(f)
                header = next(rows)
                if k == 0:
                    w.writerow(header)
                w.writerows(rows)


def rows_sha256(rows):
    """sha256 of a collection's paths in order: the rows a plan, a shard or a part is for."""
    h = hashlib.sha256()
    for r in rows:
        h.update(r["path"].encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def write_plan(index_dir, index, cfg, header, rows, n_sample):
    """INDEX/shards/trained.faiss (the trained empty index) and plan.json: the config the
    merged index will have, and what every shard must share with it."""
    d = shard_dir(index_dir)
    os.makedirs(d, exist_ok=True)
    write_faiss(index, os.path.join(d, "trained.faiss"))
    plan = {"config": cfg, "header": header, "rows": len(rows), "rows_sha256": rows_sha256(rows),
            "sample": n_sample, "trained": trained_digest(index),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    files.atomic_write(os.path.join(d, "plan.json"), json.dumps(plan, indent=1) + "\n")
    return plan


def read_plan(index):
    d = shard_dir(index)
    path, trained = os.path.join(d, "plan.json"), os.path.join(d, "trained.faiss")
    for f in (path, trained):
        if not os.path.isfile(f):
            raise UserError(f"{f} not found: train the index once with --train-only --index "
                            f"{index} --index-type ivfpq (or ivf-flat)")
    try:
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({one_line(e)}): run --train-only again") \
            from None
    if not isinstance(plan, dict) or not isinstance(plan.get("config"), dict) or \
            "dim" not in plan["config"]:
        raise UserError(f"{path} is not a --train-only plan: run --train-only again")
    return plan


def write_shard(index_dir, info, good, skipped, header):
    """Shard info["shard"], its vectors (of the rows `good`) already in its embeddings file:
    their index (a copy of trained.faiss with them added) and meta rows, then the json that
    records all three, last. skipped: [(path, why)] of the shard's rows that have no vector."""
    f, i = shard_files(index_dir, info["shard"]), info["shard"]
    index = faiss.read_index(os.path.join(shard_dir(index_dir), "trained.faiss"))
    add_rows(index, np.load(f["embeddings"], mmap_mode="r"))
    write_faiss(index, f["index"])
    files.write_csv(f["meta"], header, [[r.get(c) or "" for c in header] for r in good])
    info.update(n=len(good), skipped=skipped, trained=trained_digest(index),
                files={k: fingerprint(f[k]) for k in ("index", "embeddings", "meta")})
    files.atomic_write(f["json"], json.dumps(info) + "\n")
    if skipped:
        print(f"shard {i}: skipped {len(skipped)} missing or unreadable images (listed in "
              f"{f['json']}, and in skipped.csv after --merge-shards)")
    return info


def check_shards(index, plan, part):
    """The shards' json records in shard order, once every check passed; else one line naming
    the first bad file. Reads only: nothing is written before all shards are known good.
    part(i, n): (start, stop) of shard i of n in the plan's rows (nets.rank_part's rule)."""
    d = shard_dir(index)
    found = sorted(int(m[1]) for name in os.listdir(d)
                   if (m := re.fullmatch(r"shard-(\d+)\.json", name)))
    if not found:
        raise UserError(f"no shards in {d}: build them with --build --shard I/N --index {index}")
    infos = {i: read_shard_json(index, i) for i in found}
    n = infos[found[0]]["of"]
    for i, info in infos.items():
        if info["of"] != n or i >= n:
            raise UserError(f"{shard_files(index, i)['json']}: shard {i}/{info['of']}, but "
                            f"shard {found[0]} is one of {n}: shards of one --shard I/N split only")
    for i in range(n):
        for path in shard_files(index, i).values():
            if not os.path.isfile(path):
                raise UserError(f"{path}: missing (shard {i}/{n} not built, or not copied here:"
                                f" --build --shard {i}/{n})")
    check_trained(index, plan)
    for i in range(n):
        check_shard(index, plan, infos[i], part(i, n))
    return [infos[i] for i in range(n)]


def read_shard_json(index, i):
    path = shard_files(index, i)["json"]
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        ok = isinstance(info, dict) and {"of", "start", "stop", "n", "config", "files",
                                         "rows_sha256", "skipped"} <= set(info)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({one_line(e)})") from None
    if not ok:
        raise UserError(f"{path} is not a shard record: build the shard again")
    return info


def check_trained(index, plan):
    path = os.path.join(shard_dir(index), "trained.faiss")
    if trained_digest(read_faiss(path)) != plan["trained"]:
        raise UserError(f"{path} is not the trained index plan.json describes: run "
                        "--train-only again, then the shards")


def check_shard(index, plan, info, rows):
    """One shard against the plan: its files, model (the config keys its json records), rows
    ((start, stop) it must hold) and trained quantizer."""
    i, n, cfg, f = info["shard"], info["of"], plan["config"], shard_files(index, info["shard"])
    for k in ("index", "embeddings", "meta"):
        if fingerprint(f[k]) != info["files"][k]:
            raise UserError(f"{f[k]} is not the file {f['json']} describes (another run's?): "
                            f"build shard {i}/{n} again")
    for k in info["config"]:
        if info["config"].get(k) != cfg.get(k):
            raise UserError(f"{f['index']}: made with {k} {info['config'].get(k)}, the trained "
                            f"index with {cfg.get(k)}: shards of another model")
    if info["rows_sha256"] != plan["rows_sha256"] or \
            (info["start"], info["stop"]) != tuple(rows):
        raise UserError(f"{f['index']}: made for other rows than shard {i}/{n} of the plan's "
                        f"{plan['rows']} images")
    ix = read_faiss(f["index"], faiss.IO_FLAG_MMAP)  # lists stay on disk: a cheap read
    if ix.d != cfg["dim"]:
        raise UserError(f"{f['index']}: {ix.d}-d vectors, the trained index {cfg['dim']}-d")
    if trained_digest(ix) != plan["trained"]:
        raise UserError(f"{f['index']}: added to another trained index (other coarse centroids "
                        f"or PQ codebooks) than {shard_dir(index)}/trained.faiss: build it again")
    shape = np.load(f["embeddings"], mmap_mode="r").shape
    if ix.ntotal != info["n"] or shape != (info["n"], cfg["dim"]):
        raise UserError(f"{f['index']}: {ix.ntotal} vectors indexed, {shape} embedded, "
                        f"{info['n']} recorded: build shard {i}/{n} again")


def merge_indexes(trained, paths):
    """The trained empty index with each shard's inverted lists appended, in order, ids shifted
    by the vectors before it. One shard is in RAM at a time (merge_from empties it)."""
    index, prog = faiss.read_index(trained), files.Progress(len(paths), "merge", unit="shard")
    for path in paths:
        index.merge_from(faiss.read_index(path), index.ntotal)
        prog.update(1)
    return index
