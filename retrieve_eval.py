"""retrieve.py --eval's protocols: self-retrieval, copy detection on seeded transformed copies,
and leave-one-out label retrieval beside its random-ranking baseline; the table they print.

Holds no index code (index.py), no model (embed.py) and no metric formula (metrics.py): each
protocol searches the index it is given and scores the ids it gets back.

    import retrieve_eval
    res = {"n": n, "copy": retrieve_eval.eval_copies(model, ix, meta, cfg, args, device, ids),
           "labels": retrieve_eval.eval_labels(meta, I, ids, n), ...}
    print(retrieve_eval.format_eval(res))
"""

import io
import math
import os

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

import aspects
import by
import files
import metrics
import pages
from embed import embed_pils
from files import UserError
from index import search

LABEL_COLUMNS = ("style", "artist", "genre", "attribution")


def copy_of(im, rng, K=None):
    """A seeded near-duplicate: crop 50-90% of the area (aspect 3:4..4:3), rotate +-10 deg,
    resize x0.6-1.4, jitter brightness/contrast/saturation x0.7-1.3, grayscale 20% of the
    time, JPEG re-compression at quality 30-70. K: figures (m, 17, 3) in im's pixels: returns
    (the copy, its figures: carried_figures), the same copy from the same draws."""
    w, h = im.size
    area, ratio = rng.uniform(0.5, 0.9), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, round(math.sqrt(area * w * h * ratio)))
    ch = min(h, round(math.sqrt(area * w * h / ratio)))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    deg = rng.uniform(-10, 10)
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).rotate(deg, Image.BILINEAR)
    s = rng.uniform(0.6, 1.4)
    size = (max(16, round(cw * s)), max(16, round(ch * s)))
    im = im.resize(size, Image.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.2:
        im = im.convert("L").convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(30, 71)))
    out = files.load_image(io.BytesIO(buf.getvalue()))
    return out if K is None else (out, carried_figures(K, (x0, y0), (cw, ch), deg, size))


def carried_figures(K, corner, crop, deg, size):
    """The figures K (m, 17, 3) carried through copy_of's crop at corner, turn by deg (counter-
    clockwise as seen, about the crop's centre, as PIL turns) and resize from crop to size;
    joints the crop cut off are hidden, and a figure left with fewer than aspects.MIN_SHARED
    joints is gone. (m', 17, 3) in the copy's pixels."""
    K = np.array(K, np.float64).reshape(-1, 17, 3)
    cx, cy = (crop[0] - 1) / 2, (crop[1] - 1) / 2
    dx, dy, t = K[..., 0] - corner[0] - cx, K[..., 1] - corner[1] - cy, math.radians(deg)
    x = cx + dx * math.cos(t) + dy * math.sin(t)
    y = cy - dx * math.sin(t) + dy * math.cos(t)
    K[..., 0] = (x + 0.5) * size[0] / crop[0] - 0.5  # pixel centres, as PIL resizes
    K[..., 1] = (y + 0.5) * size[1] / crop[1] - 0.5
    inside = (K[..., 0] >= 0) & (K[..., 1] >= 0) & (K[..., 0] <= size[0] - 1) & \
        (K[..., 1] <= size[1] - 1)
    K[..., 2] = np.where(inside, K[..., 2], 0)
    return K[(K[..., 2] >= aspects.MIN_CONF).sum(1) >= aspects.MIN_SHARED]


def original(cfg, rel):
    path = os.path.join(cfg["images"], rel)
    try:
        src = files.image_source(cfg["images"], must_exist=False)  # a folder or a zip
        return files.load_image(src.loadable(rel), 2 * cfg["img_size"])  # 2x: crop enlarged later
    except files.DECODE_ERRORS as e:
        raise UserError(f"copy detection needs the indexed images: {path} "
                        f"({files.decode_error(e)}); "
                        "pass --images ROOT if they moved") from None


def eval_copies(model, index, meta, cfg, args, device, ids, keep=None):
    """Copy detection: a transformed copy of each id searched against the full index.
    keep: a dict that receives the copies' thumbnails and D, I (for --html)."""
    rng, xq = np.random.default_rng(args.seed), []
    prog = files.Progress(len(ids), "copies")
    for i in range(0, len(ids), args.batch_size):
        ims = [copy_of(original(cfg, meta[j]["path"]), rng) for j in ids[i:i + args.batch_size]]
        xq.append(embed_pils(model, ims, cfg, args, device))
        if keep is not None:
            keep.setdefault("copies", []).extend(pages.shrink(im) for im in ims)
        prog.update(len(ims))
    D, I = search(index, np.concatenate(xq), 10)
    if keep is not None:
        keep.update(D=D, I=I)
    return {"queries": len(ids), **metrics.retrieval_metrics(I, ids, ks=(1, 5))}


def eval_labels(meta, I, ids, n):
    """Leave-one-out label retrieval per label column with >= 2 classes: mAP@10, P@5 and their
    random-ranking baselines. I: (len(ids), 10) results without the query itself.

    Candidates are all other indexed images (unlabelled ones count as not relevant), and the
    baselines use the same candidates: n_relevant = same-label count - 1 per query."""
    out = {}
    for col in LABEL_COLUMNS:
        labels = np.array([r.get(col) or "" for r in meta], dtype=object)
        names, counts = np.unique(labels[labels != ""], return_counts=True)
        if len(names) < 2:
            continue
        q = ids[labels[ids] != ""]
        res = I[labels[ids] != ""]
        rel = (labels[res] == labels[q][:, None]) & (res >= 0)
        n_rel = counts[np.searchsorted(names, labels[q])] - 1
        out[col] = {"queries": len(q), "classes": len(names),
                    "map@10": metrics.map_at_k(rel, n_rel, 10),
                    "p@5": metrics.precision_at_k(rel, 5),
                    "random_map@10": metrics.random_map_at_k(n_rel, n - 1, 10),
                    "random_p@5": metrics.random_precision_at_k(n_rel, n - 1, 5)}
    return out


def copy_failures(meta, ids, keep):
    """The copy-detection queries whose original did not come first, worst first: the copy,
    what came first (None when nothing did) and the original's rank (None: below 10)."""
    out = []
    for q, j in enumerate(ids):
        row, first = keep["I"][q], keep["I"][q][0]
        if first == j:
            continue
        at = np.flatnonzero(row == j)
        out.append({"copy": keep["copies"][q], "first": meta[first] if first >= 0 else None,
                    "score": float(keep["D"][q, 0]), "original": meta[j],
                    "rank": int(at[0]) + 1 if len(at) else None, "depth": len(row)})
    return sorted(out, key=lambda f: -(f["rank"] or f["depth"] + 1))


EVAL_NOTE = ("{n} images indexed. * a sanity check only: 1.0 for any injective embedding "
             "searched exactly (ivfpq's compressed codes score lower).\n"
             "rnd = expected under a random ranking of the same candidates.")
POSE_NOTE = ("pose: {q} paintings with figures, each mirrored (half), turned <= 20 deg, scaled "
             "0.5-2x, joints jittered and 0-3 dropped, must find their source among all {n}; "
             "MRR over the top {depth}; by content: the same transformed pictures' embeddings.")
COPY_FIGURES_NOTE = ("copy detection by pose/face: the copies of the paintings with figures, "
                     "their figures carried through the copy's crop, turn and resize (not "
                     "detected again); face: those with a head; a copy whose figures (heads) "
                     "were all cut off misses.")


def eval_table(res):
    """(column heads, [(protocol, [cell text])]): the eval table for text and HTML alike."""
    cols = ("queries", "top1", "recall@5", "mrr", "map@10", "p@5", "random_map@10", "random_p@5")
    head = ("queries", "Top-1", "R@5", "MRR@10", "mAP@10", "P@5", "rnd mAP", "rnd P@5")
    rows = [("self-retrieval *", res["self"]), ("copy detection", res["copy"])]
    rows += [(f"label: {c} ({v['classes']} cl.)", v) for c, v in res["labels"].items()]
    rows += [(f"pose: by {a}", res["pose"][a]) for a in ("pose", "content", "random")] \
        if "pose" in res else []
    rows += [(f"copy detection by {a}", v) for a, v in res.get("aspect_copies", {}).items()]

    def cell(v):
        return "-" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}"

    return head, [(name, [cell(r.get(c)) for c in cols]) for name, r in rows]


def format_eval(res):
    head, rows = eval_table(res)
    w = max(len(name) for name, _ in rows)
    lines = [f"{'protocol':<{w}}" + "".join(f"{h:>8}" for h in head)]
    lines += [f"{name:<{w}}" + "".join(f"{c:>8}" for c in cells) for name, cells in rows]
    lines.append(EVAL_NOTE.format(n=res["n"]))
    if "pose" in res:
        lines.append(POSE_NOTE.format(q=res["pose"]["queries"], n=res["n"],
                                      depth=res["pose"]["depth"]))
    if set(res.get("aspect_copies", {})) & {"pose", "face"}:
        lines.append(COPY_FIGURES_NOTE)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --eval --by pose
# Each painting with figures, transformed as a whole (mirrored half the time, turned up to
# POSE_TURN degrees, scaled POSE_SCALE), its figures carried along, then jittered (POSE_JITTER of
# each figure's size) and 0-3 of their joints dropped: the new picture must find its source
# among all indexed ones, --by pose (its figures; mirrors allowed) against --by content (its
# pixels) on the same queries, and a random ranking.
POSE_TURN, POSE_SCALE, POSE_JITTER, POSE_DROP = 20.0, (0.5, 2.0), 0.025, 3


def transformed_painting(im, K, rng):
    """(the image, its figures (m, 17, 3) in the new image's pixels) under one seeded similarity
    transform; the figures' joints also jittered and some dropped."""
    K = np.array(K, np.float64)
    if rng.random() < 0.5:
        im, K = ImageOps.mirror(im), aspects.mirrored(K)
        K[..., 0] += im.width - 1
    deg = rng.uniform(-POSE_TURN, POSE_TURN)
    out = im.rotate(deg, Image.BILINEAR, expand=True)  # counter-clockwise as seen
    t, c = math.radians(deg), ((im.width - 1) / 2, (im.height - 1) / 2)
    dx, dy = K[..., 0] - c[0], K[..., 1] - c[1]
    K[..., 0] = (out.width - 1) / 2 + dx * math.cos(t) + dy * math.sin(t)
    K[..., 1] = (out.height - 1) / 2 - dx * math.sin(t) + dy * math.cos(t)
    s = rng.uniform(*POSE_SCALE)
    out = out.resize((max(16, round(out.width * s)), max(16, round(out.height * s))),
                     Image.BILINEAR)
    K[..., :2] *= s
    return out, jittered(K, rng)


def jittered(K, rng):
    """The figures K (m, 17, 3), in place: joints moved by POSE_JITTER of each body's size and
    0-POSE_DROP of them hidden, never below 4 (aspects.MIN_SHARED). Returns K."""
    there = K[..., 2] >= aspects.MIN_CONF
    size = aspects.body_size(K, there)
    K[..., :2] += rng.normal(0, 1, K[..., :2].shape) * POSE_JITTER * size[:, None, None]
    for f in K:  # views: dropped in place
        shown = np.flatnonzero(f[:, 2] >= aspects.MIN_CONF)
        drop = min(int(rng.integers(0, POSE_DROP + 1)), max(len(shown) - 4, 0))
        f[rng.choice(shown, drop, replace=False), 2] = 0
    return K


def eval_pose(store, model, index, meta, cfg, args, device):
    """The pose protocol above: {queries, pose, content, random}, each with top1, recall@5 and
    mrr (over the top by.VERIFY_TOP)."""
    if args.where:
        raise UserError("--eval --by pose searches the whole index: drop --where")
    has = np.flatnonzero(np.diff(store.arrays["figure_start.npy"]) > 0)
    if not len(has):
        raise UserError(f"--eval --by pose: no painting in {args.index} has figures")
    rng = np.random.default_rng([args.seed, 25])
    ids = np.sort(rng.choice(has, min(len(has), args.eval_queries or 200), replace=False))
    depth, n = min(by.VERIFY_TOP, len(meta)), len(meta)
    ctx = {"index": index, "xb": None, "mirror": True}
    I_pose, I_content = np.full((len(ids), depth), -1), np.full((len(ids), depth), -1)
    prog = files.Progress(len(ids), "pose eval")
    for q, j in enumerate(ids):
        im = original(cfg, meta[j]["path"])  # decoded smaller: the figures scaled to it
        (w, h), K = store.arrays["sizes.npy"][j], store.figures_of(j).astype(np.float64)
        K[..., 0], K[..., 1] = K[..., 0] * im.width / w, K[..., 1] * im.height / h
        im2, K2 = transformed_painting(im, K, rng)
        I_pose[q] = by.rank(store, by.Query(meta[j]["path"], None, figures=K2), {"pose": 1.0},
                            depth, None, ctx)[1]
        I_content[q] = search(index, embed_pils(model, [im2], cfg, args, device), depth)[1][0]
        prog.update(1)
    mrr = sum(1 / r for r in range(1, depth + 1)) / n
    m = len(ids)
    return {"queries": m, "depth": depth,
            "pose": {"queries": m, **metrics.retrieval_metrics(I_pose, ids, ks=(1, 5))},
            "content": {"queries": m, **metrics.retrieval_metrics(I_content, ids, ks=(1, 5))},
            "random": {"queries": m, "top1": 1 / n, "recall@5": min(5, n) / n, "mrr": mrr}}


def eval_aspect_copies(store, meta, cfg, args, names, ids):
    """Per aspect: the copy-detection copies (copy_of, the same seed: the same copies) searched
    by that aspect alone, computed on the copy: does it still find its painting? Light and
    layout: of the copy's pixels; pose and face: the painting's stored figures carried through
    the copy's crop, turn and resize (not detected again), asked of the copies of paintings
    with figures (face: with a head); a copy whose figures (heads) were all cut off misses."""
    rng, found = np.random.default_rng(args.seed), {a: ([], []) for a in names}
    ctx = {"mirror": False}
    for j in ids:
        im, K = original(cfg, meta[j]["path"]), np.zeros((0, 17, 3))
        if set(names) & set(by.FIGURE_ASPECTS):
            (w, h), K = store.arrays["sizes.npy"][j], store.figures_of(j).astype(np.float64)
            K[..., 0], K[..., 1] = K[..., 0] * im.width / w, K[..., 1] * im.height / h
        copy, K2 = copy_of(im, rng, K)
        small = by.thumb_of(copy)
        q = by.Query(meta[j]["path"], None, aspects.light_features(small),
                     aspects.layout_vector(small), K2)
        for a in names:
            if a in ("light", "layout"):
                s = (by.light_scores if a == "light" else by.layout_scores)(store, q)
                I = np.argsort(-s, kind="stable")[:10]
            elif not can_ask(a, K):
                continue  # a painting without figures (or heads) asks nothing of pose (face)
            else:
                I = by.rank(store, q, {a: 1.0}, 10, None, ctx)[1] if can_ask(a, K2) else \
                    np.full(10, -1)
            found[a][0].append(I), found[a][1].append(j)
    return {a: {"queries": len(js), **metrics.retrieval_metrics(np.array(I).reshape(-1, 10),
                                                                np.asarray(js), ks=(1, 5))}
            for a, (I, js) in found.items() if js}


def can_ask(aspect, K):
    """Whether figures K (m, 17, 3) can be searched by aspect (pose: any; face: a head)."""
    return len(K) > 0 and (aspect == "pose" or bool(np.abs(aspects.face_vectors(K)).any()))


def eval_by(model, index, meta, cfg, args, device, cids):
    """--eval --by: the pose protocol (pose); the copies searched by each asked aspect alone."""
    weights, res = by.parse_by(args.by), {}
    if "pose" in weights:  # figures transformed must find their painting
        res["pose"] = eval_pose(by.open_aspects(args.index, cfg, ["pose"]), model, index, meta,
                                cfg, args, device)
    asked = [a for a in weights if a != "content"]
    if asked and not args.where:
        res["aspect_copies"] = eval_aspect_copies(by.open_aspects(args.index, cfg, asked), meta,
                                                  cfg, args, asked, cids)
    return res
