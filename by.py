"""Search by aspect: layout, light, figures' poses and faces beside the content embedding. The
aspects' pass at --build/--add (their files in the index generation) and --query --by.

Holds no descriptor maths (aspects.py), no FAISS index type or generation store of the
embeddings (index.py), no --where (filters.py) and no command line (retrieve.py). Sits above
embed.py and filters.py, below retrieve_eval.py.

    import by
    by.build_aspects(gen, root, rows, cfg, args, device)  # --build: files into generation gen
    store = by.open_aspects("demo/index", cfg, ["pose"])   # checked against config.json
    hits = by.rank(store, query, weights={"pose": 1, "light": 0.3}, k=5)

Files of a generation, beside embeddings.npy (row i = meta.csv's row i):
    sizes.npy    (n, 2) int32   each image's width, height (upright, px): figures' coordinates
    layout.npy   (n, 112) f32   aspects.layout_vector of a small decode (unit rows)
    light.npy    (n, 41) f32    aspects.light_features, raw (weights applied at query time)
    figures.npy  (F, 17, 3) f32 keypoints (x, y in the image's px; confidence), by image, best
                                first; figure_boxes.npy (F, 4), figure_scores.npy (F,),
                                figure_image.npy (F,) int64 row of each, figure_start.npy (n+1,)
    faces.npy    (F, 4) f32     aspects.face_vectors
    poses.faiss                 aspects.pose_vectors, id = figure: a flat inner-product index,
                                IVF-Flat over the rows made Euclidean from POSE_IVF_FROM figures
                                (FigureIndex); never HNSW: the pose score is asymmetric, a graph
                                built from row-to-row products is meaningless for it (recall@100
                                0.085 measured; 0.57-0.74 on the Euclidean rows)
config.json records them: "aspects", "aspect_files" (fingerprints), "figures" (the detector and
its weights, or the --poses file).
"""

import hashlib
import io
import json
import math
import os
import shutil

import faiss
import numpy as np
import torch
from faiss.contrib.inspect_tools import get_invlist
from PIL import Image

import aspects
import files
import pages
import poses
from files import UserError
from index import fingerprint, generation, write_index_file

ASPECTS = ("content", "layout", "light", "pose", "face")
FIGURE_ASPECTS = ("pose", "face")
DEFAULT_ASPECTS = "content,layout,light"  # the cheap ones: ~2 ms per image beside embedding
THUMB_SIDE = 128  # px, the shorter side light and layout are computed at (rgb_array: 64 px)
POSE_IVF_FROM = 10_000  # figures from which poses.faiss is IVF-Flat (nprobe POSE_NPROBE):
# flat takes 1 ms per query figure there, IVF 0.37 ms at recall@100 0.99 (1 FAISS thread)
POSE_NPROBE = 32  # IVF1265 at 100k figures: recall@100 of flat 0.97 (bench.py --only aspects)
FIGURE_FILES = ("figures.npy", "figure_boxes.npy", "figure_scores.npy", "figure_image.npy",
                "figure_start.npy")


def aspect_files(names):
    """The files a generation holds for the aspects in names."""
    out = ["sizes.npy"] if set(names) - {"content"} else []
    out += [f"{a}.npy" for a in ("layout", "light") if a in names]
    if set(names) & set(FIGURE_ASPECTS):
        out += list(FIGURE_FILES)
    out += ["faces.npy"] if "face" in names else []
    out += ["poses.faiss"] if "pose" in names else []
    return out


def parse_aspects(text):
    """['content', ...] from 'content,layout,light,pose,face' (content always: the index is
    built on it), in ASPECTS order."""
    names = [a.strip() for a in (text or "").split(",") if a.strip()]
    bad = [a for a in names if a not in ASPECTS]
    if bad:
        raise UserError(f"--aspects {text}: unknown {', '.join(bad)} (choose from "
                        f"{','.join(ASPECTS)})")
    return [a for a in ASPECTS if a in names or a == "content"]


def index_aspects(cfg):
    return cfg.get("aspects") or ["content"]  # an index from before aspects: content only


# ----------------------------------------------------------------------------- the build pass

def upright_size(f):
    """(width, height) as load_image returns the image, from the header alone."""
    with Image.open(f) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def thumb_of(im):
    """The small image light and layout are computed on (as at query time)."""
    f = min(im.size) // THUMB_SIDE
    return im.reduce(f) if f >= 2 else im


class AspectImages(files.ImageDataset):
    """Item i: ((light (41,), layout (112,), size (w, h), pixels for the detector or None), i),
    decoded at THUMB_SIDE px (or the detector's size) in the loader's worker processes."""

    def __init__(self, paths, root, detect_size=None):
        super().__init__(paths, root, size=max(THUMB_SIDE, detect_size or 0))
        self.detect = detect_size is not None

    def __getitem__(self, i):
        try:
            size = upright_size(self.source.loadable(self.paths[i]))
            im = files.load_image(self.source.loadable(self.paths[i]), self.size)
        except files.DECODE_ERRORS as e:
            return None, i, files.decode_error(e)
        small = thumb_of(im)
        return (aspects.light_features(small), aspects.layout_vector(small), size,
                np.asarray(im) if self.detect else None), i


def as_list(batch):
    return batch


def figure_source(args, cfg_figures=None):
    """('poses', {path: figures}, record) from --poses FILE, or ('detector', model, record);
    cfg_figures: the index's record, for --add (the same source again)."""
    rec = cfg_figures or {}
    path = getattr(args, "poses", None) or (rec.get("file") if rec.get("source") == "poses"
                                            else None)
    if path:
        return "poses", poses.read_poses(path), {"source": "poses", "file": path,
                                                 "sha256": files.file_sha256(path)}
    weights = getattr(args, "pose_weights", None) or rec.get("weights") or "coco"
    size = rec.get("min_size", aspects.DETECT_SIZE)
    model = aspects.load_detector(weights, size, rec.get("seed", args.seed))
    return "detector", model, {
        "source": "detector", "name": aspects.DETECTOR, "weights": weights,
        "weights_sha256": files.file_sha256(weights) if os.path.isfile(weights) else None,
        "min_size": size, "threshold": aspects.DETECT_THRESHOLD, "most": aspects.MAX_FIGURES,
        "seed": rec.get("seed", args.seed)}


def compute(rows, root, names, source, args, device):
    """The aspects `names` of rows (meta dicts): {file name: array}. Figures from source
    (figure_source's), keypoints in each image's own pixels."""
    n = len(rows)
    light, layout = np.zeros((n, aspects.LIGHT_DIM), np.float32), \
        np.zeros((n, aspects.LAYOUT_DIM), np.float32)
    sizes, figs = np.zeros((n, 2), np.int32), [[] for _ in range(n)]
    kind, what, rec = source or (None, None, None)
    detector = kind == "detector"
    ds = AspectImages([r["path"] for r in rows], root, what.transform.min_size[0]
                      if detector else None)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=as_list,
                                         num_workers=args.workers)
    prog = files.Progress(n, "aspects" + (" (pose detector)" if detector else ""))
    for batch in loader:
        good = [b for b in batch if len(b) == 2]
        for (lf, lv, wh, _), i in good:
            light[i], layout[i], sizes[i] = lf, lv, wh
        if detector and good:
            found = aspects.detect(what, [b[0][3] for b in good], device, args.batch_size,
                                   rec["threshold"], rec["most"])
            for ((*_, px), i), f in zip(good, found, strict=True):
                figs[i] = scaled(f, sizes[i][0] / px.shape[1])
        prog.update(len(batch))
    if kind == "poses":
        figs = [what.get(r["path"], []) for r in rows]
    out = {"sizes.npy": sizes, "layout.npy": layout, "light.npy": light, **figure_arrays(figs)}
    if "face" in names:
        K = out["figures.npy"]
        out["faces.npy"] = aspects.face_vectors(K) if len(K) else np.zeros((0, 4), np.float32)
    return {k: v for k, v in out.items() if k in aspect_files(names)}


def scaled(figures, s):
    """Detector figures from the decoded image's pixels to the original's (s = ratio)."""
    out = []
    for f in figures:
        k = f["keypoints"].copy()
        k[:, :2] *= s
        out.append({"box": f["box"] * s, "keypoints": k, "score": f["score"]})
    return out


def figure_arrays(figs):
    """The FIGURE_FILES arrays from per-image lists of figures (each image's best first)."""
    figs = [sorted(f, key=lambda x: -x["score"])[:aspects.MAX_FIGURES] for f in figs]
    K = np.array([f["keypoints"] for fs in figs for f in fs], np.float32).reshape(-1, 17, 3)
    return {"figures.npy": K,
            "figure_boxes.npy": np.array([f["box"] for fs in figs for f in fs],
                                         np.float32).reshape(-1, 4),
            "figure_scores.npy": np.array([f["score"] for fs in figs for f in fs], np.float32),
            "figure_image.npy": np.repeat(np.arange(len(figs)), [len(f) for f in figs]),
            "figure_start.npy": np.r_[0, np.cumsum([len(f) for f in figs])].astype(np.int64)}


def pose_index(K):
    """The FAISS figure index over aspects.pose_vectors(K), searched through FigureIndex: flat
    inner product; from POSE_IVF_FROM figures IVF-Flat (L2) over the rows with one more column,
    sqrt(R^2 - |x|^2), R the longest row's length."""
    xb = aspects.pose_vectors(K) if len(K) else np.zeros((0, aspects.POSE_DIM), np.float32)
    if len(xb) < POSE_IVF_FROM:
        index = faiss.IndexFlatIP(aspects.POSE_DIM)
        index.add(xb)
        return index
    sq = (xb.astype(np.float64) ** 2).sum(1)
    xb = np.hstack([xb, np.sqrt(sq.max() - sq)[:, None]]).astype(np.float32)
    nlist = min(round(4 * math.sqrt(len(xb))), len(xb) // 39)  # k-means: 39 points a list
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(xb.shape[1]), xb.shape[1], nlist)
    sample = np.random.default_rng(0).choice(len(xb), min(len(xb), 100_000), replace=False)
    index.train(xb[np.sort(sample)])
    index.add(xb)
    return index


class FigureIndex:
    """Searches poses.faiss with aspects.query_rows: (scores, ids) as an inner-product search
    would. The IVF form holds the rows made Euclidean (Bachrach et al. 2014, "Speeding up the
    Xbox recommender system using a Euclidean transformation for inner-product spaces"): every
    row has length R, a query scaled to length R with a 0 in the extra column has its nearest
    by distance exactly its best by inner product, and the coarse step then ranks lists by the
    distance to their centroid, where inner product would rank them by the centroid's score,
    its members' mean, which hides the best of them (at 100k figures IVF-IP needed nprobe 64
    for the recall this gets at 32)."""

    def __init__(self, index):
        self.index, self.radius = index, None
        if index.d == aspects.POSE_DIM + 1:
            index = faiss.extract_index_ivf(index)
            index.nprobe = min(POSE_NPROBE, index.nlist)
            lists = [i for i in range(index.nlist) if index.invlists.list_size(i)]
            if lists:
                _, codes = get_invlist(index.invlists, lists[0])
                self.radius = float(np.linalg.norm(codes[0].view(np.float32).astype(np.float64)))

    @property
    def ntotal(self):
        return self.index.ntotal

    def search(self, xq, k):
        if self.index.d == aspects.POSE_DIM:
            return self.index.search(xq, k)
        if self.radius is None:  # no figures
            return np.zeros((len(xq), k), np.float32), np.full((len(xq), k), -1, np.int64)
        length = np.maximum(np.linalg.norm(xq, axis=1, keepdims=True), 1e-12)
        x = np.hstack([xq / length * self.radius, np.zeros((len(xq), 1))]).astype(np.float32)
        D, I = self.index.search(x, k)
        return (self.radius ** 2 - D / 2) * length / self.radius, I


def write_aspects(gen, arrays, names, cfg, figures=None, figure_index=True):
    """The aspect files into generation folder gen (before config.json, written last by
    index.write_generation, names them: a crash leaves the old generation whole)."""
    for name, a in arrays.items():
        with files.writing(os.path.join(gen, name)):
            np.save(os.path.join(gen, name), a)
    if "pose" in names and figure_index:
        write_index_file(pose_index(arrays["figures.npy"]), os.path.join(gen, "poses.faiss"))
    cfg["aspects"] = names
    cfg["aspect_files"] = {f: fingerprint(os.path.join(gen, f)) for f in aspect_files(names)
                           if f in arrays or f == "poses.faiss" and figure_index}
    if figures is not None:
        cfg["figures"] = {**figures, "n": int(len(arrays.get("figures.npy", ())))}


def build_aspects(gen, root, rows, cfg, args, device):
    """--build: the aspects --aspects asks for, of the rows that embedded, into gen."""
    names = parse_aspects(args.aspects or DEFAULT_ASPECTS)
    if names == ["content"]:
        cfg["aspects"] = names
        return
    source = figure_source(args) if set(names) & set(FIGURE_ASPECTS) else None
    announce(source)
    arrays = compute(rows, root, names, source, args, device)
    write_aspects(gen, arrays, names, cfg, source[2] if source else None)
    figures_line(arrays, cfg, len(rows))


def announce(source):
    if source and source[0] == "detector":
        print(f"aspects: {aspects.DETECTOR} on every image ({source[2]['weights']} weights, "
              f"{source[2]['min_size']} px): ~0.3-1 img/s per CPU core, a GPU many times that")


def figures_line(arrays, cfg, n):
    if "figure_start.npy" in arrays:
        with_figures = int((np.diff(arrays["figure_start.npy"]) > 0).sum())
        print(f"figures: {cfg['figures']['n']} in {with_figures} of {n} images "
              f"({cfg['figures']['source']})")


def add_aspects(old_gen, gen, cfg, new_rows, root, args, device):
    """--add: the index's aspects (cfg's) of the new rows after the old ones, figures from the
    same source (the detector and weights, or the poses file, that built it)."""
    names = index_aspects(cfg)
    if args.aspects and parse_aspects(args.aspects) != names:
        raise UserError(f"{args.index} was built with --aspects {','.join(names)}: --add keeps "
                        "them (drop --aspects, or rebuild with --build)")
    cfg["aspects"] = names
    if names == ["content"]:
        return
    old = load_arrays(old_gen, cfg, names)
    source = figure_source(args, cfg.get("figures")) if set(names) & \
        set(FIGURE_ASPECTS) else None
    new = compute(new_rows, root, names, source, args, device) if new_rows else \
        {k: v[:0] if k != "figure_start.npy" else v[:1] * 0 for k, v in old.items()}
    write_aspects(gen, join_arrays([old, new]), names, cfg, source[2] if source else None)


def join_arrays(parts):
    """One collection's aspect arrays from consecutive parts' (rows, then figures, in order)."""
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]
           if k not in ("figure_image.npy", "figure_start.npy")}
    if "figures.npy" in parts[0]:
        rows = np.cumsum([0] + [len(p["sizes.npy"]) for p in parts])
        figs = np.cumsum([0] + [int(p["figure_start.npy"][-1]) for p in parts])
        out["figure_image.npy"] = np.concatenate([p["figure_image.npy"] + r
                                                  for p, r in zip(parts, rows, strict=False)])
        out["figure_start.npy"] = np.concatenate([[0]] + [p["figure_start.npy"][1:] + f for p, f
                                                          in zip(parts, figs, strict=False)])
    return out


# ----------------------------------------------------------------------------- aspects in parts
# A sharded build (retrieve.py --train-only, --build --shard I/N, --merge-shards) and a build
# under torchrun compute the aspects in parts: each rank its own rows' (the keypoint detector
# on every GPU, not on rank 0 alone) into INDEX/parts/<key>/aspects.part-R-of-N/, then rank 0
# joins them into the generation (or into the shard's INDEX/shards/aspects.shard-I/, which the
# merge joins in shard order). Each part folder is written through a temp folder renamed into
# place, aspects.json last; a run again after a crash keeps the parts that hold the same
# aspects from the same figure source.

def shard_aspects_dir(shards, i):
    return os.path.join(shards, f"aspects.shard-{i}")


def plan_aspects(cfg, args):
    """--build --shard: the aspects the plan (cfg) records; another --aspects is one line."""
    names = index_aspects(cfg)
    if args.aspects and parse_aspects(args.aspects) != names:
        raise UserError(f"the trained index's plan has --aspects {','.join(names)}: drop "
                        "--aspects (or --train-only again)")
    return names


def write_part(dst, arrays, names, figures, rows_key=None):
    """compute's arrays into folder dst, through a temp folder renamed into place: an
    interrupt or a full disk leaves the old folder (or none), and no temp folder. rows_key:
    recorded, what a later run checks before it keeps the part (rows_key())."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        rec = {"rows": rows_key} if rows_key else {}
        write_aspects(tmp, arrays, names, rec, figures, figure_index=False)
        files.atomic_write(os.path.join(tmp, "aspects.json"), json.dumps(rec) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def part_record(folder):
    try:
        with open(os.path.join(folder, "aspects.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def source_key(figures):
    """A figure source's record without its count: what two parts must share to be joined."""
    return {k: v for k, v in (figures or {}).items() if k != "n"}


def rows_key(root, rows):
    return hashlib.sha256("\n".join([root] + [r["path"] for r in rows]).encode()).hexdigest()


def compute_part(dst, root, rows, names, args, device):
    """The aspects names of rows into part folder dst; a folder there that already holds
    them, for the same rows from the same figure source, is kept (returns False then)."""
    source = figure_source(args) if set(names) & set(FIGURE_ASPECTS) else None
    rec, key = part_record(dst), rows_key(root, rows)
    if rec and rec.get("aspects") == names and rec.get("rows") == key and \
            source_key(rec.get("figures")) == source_key(source[2] if source else None):
        return False
    announce(source)
    write_part(dst, compute(rows, root, names, source, args, device), names,
               source[2] if source else None, key)
    return True


def read_parts(dirs, names, again):
    """(arrays joined in order, figure source record) of the part folders dirs; a missing
    one, or parts whose figures come from different sources, is one line (again: what to run
    for part i of n)."""
    parts, recs = [], []
    for i, d in enumerate(dirs):
        recs.append(part_record(d))
        if recs[-1] is None:
            raise UserError(f"{d}: missing or unreadable (--aspects {','.join(names)}): "
                            f"{again(i, len(dirs))}")
        parts.append({k: np.asarray(v) for k, v in load_arrays(d, recs[-1], names).items()})
    figures = [source_key(r.get("figures")) for r in recs]
    if any(f != figures[0] for f in figures):
        raise UserError(f"the parts' figures come from different sources ({figures[0]} and "
                        f"{next(f for f in figures if f != figures[0])}): build them alike")
    return join_arrays(parts), figures[0] or None


def join_parts_into(gen, dirs, names, cfg, n_rows):
    """Rank 0 under torchrun: the ranks' aspect parts, in rank order, into generation gen."""
    if names == ["content"]:
        cfg["aspects"] = names
        return
    arrays, figures = read_parts(dirs, names, lambda i, n: f"rank {i} of {n} did not finish "
                                 "its aspects: run the same torchrun command again")
    write_aspects(gen, arrays, names, cfg, figures)
    figures_line(arrays, cfg, n_rows)


def join_parts_into_shard(shards, i, dirs, names):
    """--build --shard I/N (any number of processes): the ranks' parts as the shard's aspects."""
    if names == ["content"]:
        return
    arrays, figures = read_parts(dirs, names, lambda r, n: f"rank {r} of {n} did not finish "
                                 "its aspects: run the same command again")
    write_part(shard_aspects_dir(shards, i), arrays, names, figures)


def merge_shard_aspects(gen, shards, n, cfg):
    """--merge-shards: the shards' aspects, in shard order, into generation gen."""
    names = index_aspects(cfg)
    if names == ["content"]:
        return
    arrays, figures = read_parts([shard_aspects_dir(shards, i) for i in range(n)], names,
                                 lambda i, n: f"build shard {i}/{n} again")
    write_aspects(gen, arrays, names, cfg, figures)


def load_arrays(gen, cfg, names):
    """{file: array} of the .npy aspect files for names, fingerprints checked."""
    out = {}
    for f in aspect_files(names):
        if f not in cfg.get("aspect_files", {}) and f == "poses.faiss":
            continue  # a shard's: the merge builds the figure index
        path = os.path.join(gen, f)
        if not os.path.isfile(path) or fingerprint(path) != cfg.get("aspect_files", {}).get(f):
            raise UserError(f"{path} is missing or not the file config.json describes: "
                            "rebuild with --build")
        if f.endswith(".npy"):
            out[f] = np.load(path, mmap_mode="r")
    return out


def copy_aspects(old_gen, gen, cfg):
    """The aspect files of old_gen into gen, as they are (an --add that embeds nothing)."""
    for f in aspect_files(index_aspects(cfg)):
        shutil.copyfile(os.path.join(old_gen, f), os.path.join(gen, f))


# ----------------------------------------------------------------------------- the stored aspects

class Store:
    """An index generation's aspects, loaded on demand: .names, .arrays {file: memmap},
    .poses (the figure index, when pose), .figures_of(row) -> (17, 3) arrays."""

    def __init__(self, folder, cfg, need):
        have = index_aspects(cfg)
        lacking = [a for a in need if a not in have]
        if lacking:
            raise UserError(f"--by {','.join(lacking)}: {folder} has no {' or '.join(lacking)} "
                            f"aspect (built with --aspects {','.join(have)}): rebuild with "
                            f"--build --aspects {','.join(have + lacking)}")
        self.gen, self.cfg, self.names = generation(folder), cfg, have
        self.arrays = load_arrays(self.gen, cfg, [a for a in need if a != "content"])
        self.poses = self.figure_index() if "pose" in need else None

    def figure_index(self):
        index = faiss.read_index(os.path.join(self.gen, "poses.faiss"))
        if index.d not in (aspects.POSE_DIM, aspects.POSE_DIM + 1):  # rows of an older version
            index = pose_index(np.asarray(self.arrays["figures.npy"]))
            print(f"figure index: rows from an older ArtExtract, rebuilt in memory from the "
                  f"{index.ntotal} stored figures (a --build or --add writes the new one)")
        return FigureIndex(index)

    def figures_of(self, row):
        start = self.arrays["figure_start.npy"]
        return np.asarray(self.arrays["figures.npy"][start[row]:start[row + 1]])


def open_aspects(folder, cfg, need):
    return Store(folder, cfg, need)


# ----------------------------------------------------------------------------- the map's colours
# retrieve.py --map --color-by NAME: a class per painting from a stored aspect, drawn like a
# meta.csv column (a legend, a filter). NAME: the aspect it reads.
MAP_COLOURS = {"light": "light", "key": "light", "figures": "pose", "face": "face"}


def map_classes(name, light=None, start=None, figures=None):
    """One class name per image: light -> where the light comes from ('light from the upper
    left', 'even light'); key -> 'low key' / 'middle key' / 'high key'; figures -> '0 figures',
    '1 figure', '2 figures', '3+ figures'; face -> the first figure's face orientation
    (aspects.face_orientation's class) or 'no face'."""
    if name in ("light", "key"):
        return [aspects.light_summary(f).split(", ")[0 if name == "light" else 1] for f in light]
    counts = np.diff(start)
    if name == "figures":
        return [f"{c} figure" if c == 1 else f"{min(c, 3)}{'+' if c > 2 else ''} figures"
                for c in counts]
    first = start[:-1][counts > 0]  # each image's first figure
    names = aspects.face_orientation(figures[first])[2] if len(first) else []
    out, it = [], iter(names)
    for c in counts:
        out.append((next(it) or "no face") if c else "no face")
    return out


def with_map_column(folder, cfg, meta, name):
    """meta's rows (all of the generation's or a --where subset) with a column `name` holding
    each painting's map_classes value, for --map --color-by light|key|figures|face."""
    need = MAP_COLOURS[name]
    if need not in index_aspects(cfg):
        raise UserError(f"--color-by {name}: {folder} has no {need} aspect (built with --aspects "
                        f"{','.join(index_aspects(cfg))}): rebuild with --build --aspects "
                        f"{','.join(index_aspects(cfg) + [need])}")
    store = open_aspects(folder, cfg, [need])
    a = store.arrays
    values = map_classes(name, a.get("light.npy"), a.get("figure_start.npy"),
                         a.get("figures.npy"))
    rows = files.read_csv(os.path.join(store.gen, "meta.csv"))
    of = {r["path"]: v for r, v in zip(rows, values, strict=True)}
    return [{**r, name: of[r["path"]]} for r in meta]


# ----------------------------------------------------------------------------- --by
POOL = 100  # candidates each weighted aspect brings (its top POOL), all scored by every aspect
POSE_K = 200  # figures FAISS returns per query row (6 rows a figure with turns and mirror)
VERIFY_TOP = 100  # images verified by a similarity transform (aspects.verify): ~20 ms
MISSING = {"pose": 0.0, "face": -1.0}  # the score of an image without figures (the minimum)


def parse_by(text):
    """{aspect: weight} from 'pose', 'pose=1,light=0.3' (a bare name weighs 1)."""
    out = {}
    for part in (text or "content").split(","):
        name, _, w = part.strip().partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise UserError(f"--by {text}: {part!r}: a weight must be a number, e.g. "
                            "pose=1,light=0.3") from None
        if name not in ASPECTS:
            raise UserError(f"--by {text}: unknown aspect {name!r} (choose from "
                            f"{','.join(ASPECTS)})")
        out[name] = weight
    if not any(out.values()):
        raise UserError(f"--by {text}: every weight is 0")
    return {a: w for a, w in out.items() if w}


def content_only(text):
    return parse_by(text) == {"content": 1.0}


class Query:
    """What one query brings to each aspect: its content vector xq (dim,), light features
    (41,), layout vector (112,), figures (m, 17, 3) in its own pixels, its row (--query-id)."""

    def __init__(self, name, xq, light=None, layout=None, figures=None, row=None):
        self.name, self.xq, self.light, self.layout, self.row = name, xq, light, layout, row
        self.figures = np.zeros((0, 17, 3)) if figures is None or not len(figures) else \
            aspects.as_figures(figures)


def stored_query(store, xb, row, name):
    """--query-id: the row's stored vectors and figures."""
    a = store.arrays
    return Query(name, np.asarray(xb[row], np.float32),
                 a["light.npy"][row] if "light.npy" in a else None,
                 a["layout.npy"][row] if "layout.npy" in a else None,
                 store.figures_of(row) if "figures.npy" in a else None, row)


def image_query(path, xq, weights, store, args, device):
    """--query IMG: light and layout from a small decode, figures from --poses (its entry for
    IMG, by the path under the index's images or the file name) or from the detector."""
    im = files.load_image(path, THUMB_SIDE)
    small = thumb_of(im)
    figures = None
    if set(weights) & set(FIGURE_ASPECTS):
        figures = query_figures(path, store.cfg, args, device)
    return Query(path, xq, aspects.light_features(small), aspects.layout_vector(small), figures)


def query_figures(path, cfg, args, device):
    """The query image's figures (m, 17, 3) in its own pixels: from --poses (or the poses file
    the index was built from) by its path under the index's images or its file name, else from
    the detector (--pose-weights, or the index's)."""
    kind, what, rec = figure_source(args, None if args.pose_weights else cfg.get("figures"))
    if kind == "poses":
        rel = os.path.relpath(path, cfg["images"]).replace(os.sep, "/")
        hits = what.get(rel) or next((v for k, v in what.items()
                                      if os.path.basename(k) == os.path.basename(path)), [])
        return np.array([f["keypoints"] for f in hits]).reshape(-1, 17, 3)
    im = files.load_image(path, rec["min_size"])
    found = aspects.detect(what, [im], device, threshold=rec["threshold"], most=rec["most"])[0]
    found = scaled(found, upright_size(path)[0] / im.width)
    return np.array([f["keypoints"] for f in found]).reshape(-1, 17, 3)


# Each aspect: top(store, q, keep) -> candidate rows, and score(store, q, rows) -> (len(rows),)
# scores in about [-1, 1]: cosines for content, layout, light; for face the mean over the query's
# figures of their best face match in the image; for pose the verification score in [0, 1].

def rows_top(scores, keep, k):
    """The k best rows of a score per row (n,), among keep (None: all)."""
    s = np.asarray(scores, np.float64).copy()
    if keep is not None:
        mask = np.zeros(len(s), bool)
        mask[keep] = True
        s[~mask] = -np.inf
    top = np.argsort(-s, kind="stable")[:k]
    return top[np.isfinite(s[top])]


def light_scores(store, q, rows=None):
    L = store.arrays["light.npy"]
    F = np.asarray(L if rows is None else L[rows])
    return aspects.light_vector(F) @ aspects.light_vector(q.light)[0]


def layout_scores(store, q, rows=None):
    L = store.arrays["layout.npy"]
    return np.asarray(L if rows is None else L[rows]) @ q.layout


def face_image_scores(store, q, mirror):
    """(images, scores) over every image with figures: the face aspect's image_scores."""
    qf = aspects.face_vectors(q.figures)
    if mirror:
        qf2 = aspects.face_vectors(q.figures, mirror=True)
    has = np.abs(qf).sum(1) > 0
    if not has.any():
        raise UserError(f"--by face: the query {q.name} shows no head (nose, eyes or ears)")
    faces = np.asarray(store.arrays["faces.npy"])
    S = qf[has] @ faces.T
    if mirror:
        S = np.maximum(S, qf2[has] @ faces.T)
    S[:, np.abs(faces).sum(1) == 0] = MISSING["face"]  # figures without a head: no face
    return aspects.image_scores(S, store.arrays["figure_image.npy"])


def pose_image_scores(store, q, mirror):
    """(images, scores) from the figure index: each query figure's rows (turns, mirror) ->
    POSE_K figures each -> exact pose_similarity on their union -> image_scores."""
    if not len(q.figures):
        raise UserError(f"--by pose: no figures in the query {q.name} (none detected, or none "
                        "in --poses for it)")
    xq = aspects.query_rows(q.figures, mirror)
    _, I = store.poses.search(xq, min(POSE_K, max(store.poses.ntotal, 1)))
    cand = np.unique(I[I >= 0])
    if not len(cand):
        return np.zeros(0, np.int64), np.zeros(0)
    K = np.asarray(store.arrays["figures.npy"][cand])
    S = np.stack([aspects.pose_similarity(f, K, mirror) for f in q.figures])
    sizes = aspects.body_size(q.figures, q.figures[..., 2] >= aspects.MIN_CONF)
    return aspects.image_scores(S, store.arrays["figure_image.npy"][cand], sizes)


def pose_scores(store, q, rows, mirror):
    """aspects.verify of the query's figures against each row's: one similarity transform,
    the share of the query's joints it carries onto the row's figures (0: no figures)."""
    s, _ = aspects.verify(q.figures, [store.figures_of(r) for r in rows], mirror)
    return s


def aspect_top(aspect, store, q, keep, k, ctx):
    """The rows aspect ranks first (at most k, in keep)."""
    if aspect == "content":
        D, I = ctx["index"].search(q.xq[None], k + (q.row is not None))
        return I[0][I[0] >= 0]
    if aspect in ("light", "layout"):
        f = light_scores if aspect == "light" else layout_scores
        return rows_top(f(store, q), keep, k + 1)
    img, s = (pose_image_scores if aspect == "pose" else face_image_scores)(store, q,
                                                                            ctx["mirror"])
    if keep is not None:
        ok = np.isin(img, keep)
        img, s = img[ok], s[ok]
    return img[:k + 1]


def aspect_scores(aspect, store, q, rows, ctx):
    if aspect == "content":
        return np.asarray(ctx["xb"][rows]) @ q.xq  # rows ascending: a memmap reads in order
    if aspect == "light":
        return light_scores(store, q, rows)
    if aspect == "layout":
        return layout_scores(store, q, rows)
    if aspect == "pose":
        return pose_scores(store, q, rows, ctx["mirror"])
    img, s = face_image_scores(store, q, ctx["mirror"])
    table = dict(zip(img.tolist(), s.tolist(), strict=True))
    return np.array([table.get(int(r), MISSING["face"]) for r in rows])


def rank(store, q, weights, k, keep=None, ctx=None):
    """(scores (k,), rows (k,), [{aspect: score}]) of the query by the weighted aspects: the
    union of each aspect's top max(POOL, k) rows (pose: its top VERIFY_TOP images by figure
    similarity, then verified), each scored by every aspect, ranked by the weighted sum.
    -1 / -inf pad where fewer than k rows qualify."""
    pool = max(POOL if len(weights) > 1 else k, k)
    tops = [aspect_top(a, store, q, keep, VERIFY_TOP if a == "pose" else pool, ctx)
            for a in weights]
    rows = np.unique(np.concatenate(tops)).astype(np.int64)
    rows = rows[rows != q.row] if q.row is not None else rows
    parts = {a: aspect_scores(a, store, q, rows, ctx) for a in weights}
    total = sum(w * parts[a] for a, w in weights.items()) / sum(abs(w) for w in
                                                              weights.values())
    order = np.argsort(-total, kind="stable")[:k]
    D, I = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)
    D[:len(order)], I[:len(order)] = total[order], rows[order]
    return D, I, [{a: float(parts[a][j]) for a in weights} for j in order]


def search_by(args, cfg, xb, index, queries, device):
    """--query/--query-id --by: D (nq, k), I (nq, k), per hit {aspect: score}. queries:
    (name, xq, row or None) per query; index: the content index (filters.Filtered for
    --where)."""
    weights = parse_by(args.by)
    store = open_aspects(args.index, cfg, [a for a in weights if a != "content"])
    keep = getattr(index, "keep", None)
    ctx = {"index": index, "xb": xb, "mirror": args.mirror}
    D, I, why = [], [], []
    for name, xq, row in queries:
        q = stored_query(store, xb, row, name) if row is not None else \
            image_query(name, xq, weights, store, args, device)
        d, i, parts = rank(store, q, weights, args.k, keep, ctx)
        D.append(d), I.append(i)
        size = store.arrays["sizes.npy"][row] if row is not None else upright_size(name)
        why.append({"by": args.by, "figures": q.figures, "size": size, "hits": [
            {"scores": p, "figures": figures_or_none(store, r),
             "size": store.arrays["sizes.npy"][r]} for p, r in zip(parts, i, strict=False)]})
    return np.stack(D), np.stack(I), why


def figures_or_none(store, row):
    return store.figures_of(row) if "figures.npy" in store.arrays else np.zeros((0, 17, 3))


def why_line(parts, by_text, short=False):
    """'pose 0.91 x1 + light 0.72 x0.3' (short: 'pose .91 light .72'): the aspect scores
    behind a hit's rank."""
    weights = parse_by(by_text)
    if short:
        return " ".join(f"{a} {parts[a]:.2f}".replace("0.", ".") for a in weights)
    return " + ".join(f"{a} {parts[a]:.2f}" + (f" x{w:g}" if len(weights) > 1 else "")
                      for a, w in weights.items())


BY_NOTE = {"content": "content: cosine of the embeddings", "layout": "layout: cosine of the "
           "4x4 colour-mass and edge layout", "light": "light: cosine of the tonal descriptor "
           "(where light and dark sit, direction, key, contrast, warmth)", "pose": "pose: the "
           "share of the query's joints one similarity transform carries onto the painting's "
           "figures (1 = all on)", "face": "face: how alike the figures' head turn (yaw) and "
           "tilt are (1 = the same)"}


def score_note(by_text):
    """A line for a page: what the score is under --by."""
    weights = parse_by(by_text)
    head = "score: " + (" + ".join(f"{w:g} {a}" for a, w in weights.items()) + " over "
                        f"{sum(abs(w) for w in weights.values()):g}; " if len(weights) > 1
                        else "")
    return head + "; ".join(BY_NOTE[a] for a in weights)


def sketch(file, info):
    """What load_image reads for a thumbnail of file with info's figures drawn over it (the
    file itself when there are none, or it does not decode)."""
    if info is None or not len(info["figures"]):
        return file
    try:
        im = files.load_image(file, 2 * pages.THUMB)
    except files.DECODE_ERRORS:
        return file
    im = pages.draw_figures(im, info["figures"], im.width / max(int(info["size"][0]), 1))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    buf.seek(0)
    return buf


def sheet_rows(rows, why):
    """query_sheet's rows with --by's figures drawn and each hit's aspect scores as line 2."""
    out = []
    for cells, w in zip(rows, why, strict=True):
        (image, line1, line2), hits = cells[0], cells[1:]
        out.append([(sketch(image, w), line1, line2)] + [
            (sketch(im, h), l1, why_line(h["scores"], w["by"], short=True))
            for (im, l1, _), h in zip(hits, w["hits"], strict=True)])
    return out


def page_hits(hits, why, root, queries, thumbs):
    """results_page's hits as (score, row, {image with figures drawn, why}), the queries'
    thumbnails with theirs, and the line saying what the score is."""
    src = files.image_source(root, must_exist=False)
    hits = [[(s, row, {"image": sketch(src.thumb(row["path"]), h),
                       "why": "by " + why_line(h["scores"], w["by"])})
             for (s, row), h in zip(hh, w["hits"], strict=True)]
            for hh, w in zip(hits, why, strict=True)]
    thumbs = [sketch(t, w) for t, w in zip(thumbs or queries, why, strict=True)]
    return hits, thumbs, score_note(why[0]["by"]) if why else ""
