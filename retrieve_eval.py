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
from PIL import Image, ImageEnhance

import files
import metrics
import pages
from embed import embed_pils
from files import UserError
from index import search

LABEL_COLUMNS = ("style", "artist", "genre", "attribution")


def copy_of(im, rng):
    """A seeded near-duplicate: crop 50-90% of the area (aspect 3:4..4:3), rotate +-10 deg,
    resize x0.6-1.4, jitter brightness/contrast/saturation x0.7-1.3, grayscale 20% of the
    time, JPEG re-compression at quality 30-70."""
    w, h = im.size
    area, ratio = rng.uniform(0.5, 0.9), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, round(math.sqrt(area * w * h * ratio)))
    ch = min(h, round(math.sqrt(area * w * h / ratio)))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).rotate(rng.uniform(-10, 10), Image.BILINEAR)
    s = rng.uniform(0.6, 1.4)
    im = im.resize((max(16, round(cw * s)), max(16, round(ch * s))), Image.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.2:
        im = im.convert("L").convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(30, 71)))
    return files.load_image(io.BytesIO(buf.getvalue()))


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


def eval_table(res):
    """(column heads, [(protocol, [cell text])]): the eval table for text and HTML alike."""
    cols = ("queries", "top1", "recall@5", "mrr", "map@10", "p@5", "random_map@10", "random_p@5")
    head = ("queries", "Top-1", "R@5", "MRR@10", "mAP@10", "P@5", "rnd mAP", "rnd P@5")
    rows = [("self-retrieval *", res["self"]), ("copy detection", res["copy"])]
    rows += [(f"label: {c} ({v['classes']} cl.)", v) for c, v in res["labels"].items()]

    def cell(v):
        return "-" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}"

    return head, [(name, [cell(r.get(c)) for c in cols]) for name, r in rows]


def format_eval(res):
    head, rows = eval_table(res)
    w = max(len(name) for name, _ in rows)
    lines = [f"{'protocol':<{w}}" + "".join(f"{h:>8}" for h in head)]
    lines += [f"{name:<{w}}" + "".join(f"{c:>8}" for c in cells) for name, cells in rows]
    lines.append(EVAL_NOTE.format(n=res["n"]))
    return "\n".join(lines)
