"""Embedding a collection: the model that embeds (a backbone and its pooling, or a crnn.py
checkpoint), the config half that describes it, and images to unit vectors in .npy files.

Holds no FAISS index and no index folder (index.py) and no command line (retrieve.py); the
backbone, device and precision are nets.py's.

    import embed
    cfg = embed.model_config(args)                   # config.json's model half, from the flags
    model = embed.load_model(cfg, device)            # eval mode, its backbone in cfg's precision
    xq = embed.embed_pils(model, [im], cfg, args, device)   # (1, dim) float32 unit rows
"""

import contextlib
import os
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import crnn_model
import files
import nets
from files import UserError
from index import FORMAT, INDEX_DEFAULTS, VERSION, compact_rows

# These flags default to None so that a value the user typed can be told from the default: at
# --query/--query-id/--add/--eval, a typed value that differs from config.json is refused.
MODEL_DEFAULTS = {"backbone": "resnet50", "weights": "imagenet", "ckpt": None, "img_size": 224,
                  "pool": "grid", "grid": 2, "index_type": INDEX_DEFAULTS["index_type"],
                  "pca": None, "center": None}


# ----------------------------------------------------------------------------- model

class Embedder(nn.Module):
    """CNN trunk + pooling -> (B, dim) unit vectors.

    avg: global mean; gem: generalised mean, p=3 (Radenovic et al. 2018), stresses strong
    activations; grid: mean over G x G cells, each cell a unit vector, cells kept in place
    (dim = C * G * G): layout, i.e. composition and pose, stays in the vector."""

    def __init__(self, body, pool="grid", grid=2, dtype=torch.float32):
        super().__init__()
        self.body, self.pool, self.grid, self.dtype = body, pool, grid, dtype

    def forward(self, x):
        f = self.body(x.to(self.dtype)).float()  # pool in fp32: GeM's cube overflows fp16
        if self.pool == "avg":
            z = f.mean((2, 3))
        elif self.pool == "gem":
            z = f.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
        else:
            g = F.adaptive_avg_pool2d(f, self.grid).permute(0, 2, 3, 1)  # (B, G, G, C)
            z = F.normalize(g, dim=3).flatten(1)
        return F.normalize(z, dim=1)


class CkptEmbedder(nn.Module):
    """A crnn.py model's embed() (attention-pooled RNN states: learned style), unit length."""

    def __init__(self, model, precision="fp32"):
        super().__init__()
        self.model = crnn_model.Inference(model, precision)

    def forward(self, x):
        return F.normalize(self.model.embed(x).float(), dim=1)


def load_model(cfg, device, why="as the index was built"):
    """The embedder that cfg describes, on device, eval mode, its backbone in cfg["precision"]
    (BN folded, channels_last; pooling and normalisation in fp32); fills cfg["dim"] when
    unset."""
    precision = cfg["precision"]
    nets.say_precision(precision, why)
    if cfg["ckpt"]:
        model = CkptEmbedder(crnn_model.load_checkpoint(cfg["ckpt"])[0], precision)
    else:
        trunk = nets.backbone(cfg["backbone"], cfg["weights"], cfg["init_seed"])[0]
        body = nets.for_inference(trunk, precision)
        model = Embedder(body, cfg["pool"], cfg["grid"], nets.PRECISIONS[precision])
    model = model.eval().to(device, memory_format=torch.channels_last)
    with torch.inference_mode():
        dim = model(torch.zeros(1, 3, cfg["img_size"], cfg["img_size"], device=device)).shape[1]
    if cfg.get("dim") not in (None, dim):
        raise UserError(f"the model gives {dim}-d embeddings, the index holds {cfg['dim']}-d")
    cfg["dim"] = int(dim)
    return model


def forward(model, x, device):
    """(B, 3, S, S) batch -> (B, dim) float32 numpy unit vectors."""
    x = x.to(device, non_blocking=device.type == "cuda")  # not on MPS: see crnn_model.to_device
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        z = model(x)
    return F.normalize(z.float(), dim=1).cpu().numpy()


def embed_pils(model, images, cfg, args, device):
    """PIL images -> (len, dim) float32, batched."""
    tf, out = nets.make_transform(cfg["img_size"]), []
    for i in range(0, len(images), args.batch_size):
        x = torch.stack([tf(im) for im in images[i:i + args.batch_size]])
        out.append(forward(model, x, device))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- the config

def check_same_model(args, cfg):
    """Refuse typed flags that differ from how the index was built, and changed weight files."""
    for key in MODEL_DEFAULTS:
        val, was = getattr(args, key), cfg.get(key)
        if val is None or val == was or key == "center" and not val and not was:
            continue  # an index from before --center is not centred
        if key in ("weights", "ckpt") and os.path.isfile(val) and \
                files.file_sha256(val) == cfg.get(f"{key}_sha256"):
            continue  # the same file under another name
        flag = "--" + key.replace("_", "-")
        built = f"{flag} {was}" if was is not None else f"no {flag}" + \
            (f" (--ckpt {cfg['ckpt']})" if cfg.get("ckpt") else "")
        raise UserError(f"{args.index} was built with {built}, not {val}: drop {flag} to "
                        "use the index's own setting, or rebuild with --build")
    for key in ("weights", "ckpt"):
        path, sha = cfg.get(key), cfg.get(f"{key}_sha256")
        if sha and (not os.path.isfile(path) or files.file_sha256(path) != sha):
            raise UserError(f"--{key} file {path} is missing or changed since the index was "
                            "built: restore it or rebuild with --build")
    if cfg["precision"] not in nets.PRECISIONS:  # queries embed in it: one nets knows
        raise UserError(f"{args.index}: unknown precision {cfg['precision']!r}: rebuild with "
                        "--build")


def model_config(args):
    """config.json's model half: the typed flags, else MODEL_DEFAULTS (--ckpt: its own args)."""
    cfg = {"format": FORMAT, "version": VERSION}
    cfg.update({k: MODEL_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k)
                for k in MODEL_DEFAULTS})
    cfg["init_seed"] = args.seed  # --weights none: the random init is seeded
    for key in ("weights", "ckpt"):
        path = cfg[key] if cfg[key] not in (None, "imagenet", "none") else None
        if path and not os.path.isfile(path):
            raise UserError(f"--{key} file not found: {path}")
        cfg[f"{key}_sha256"] = files.file_sha256(path) if path else None
    if cfg["ckpt"]:
        typed = [f"--{k.replace('_', '-')}" for k in ("backbone", "weights", "pool", "grid",
                                                        "img_size") if getattr(args, k)]
        if typed:
            raise UserError(f"--ckpt embeds with the checkpoint's own model and image "
                            f"size: drop {' '.join(typed)}")
        ck_args = crnn_model.read_checkpoint(cfg["ckpt"])["args"]  # loaded once, later
        cfg.update(backbone=ck_args.get("backbone"), weights=None, weights_sha256=None,
                   pool=None, grid=None, img_size=int(ck_args["img_size"]))
    if cfg["grid"] is not None and cfg["grid"] < 1 or cfg["img_size"] < 32:
        raise UserError("--grid must be >= 1 and --img-size >= 32")
    return cfg


# ----------------------------------------------------------------------------- embeddings file

def embed_to_npy(model, paths, root, cfg, args, device, out_path):
    """Embed root/paths into a (n_good, dim) .npy; returns (good ids, {id: why} for the
    others). The rows stream into a memory-mapped file at their own positions
    (nets.rows_to_npy); unreadable images are then left out and the file compacted, so row j
    of out_path is paths[good[j]], good ascending (none: a (0, dim) file)."""
    on_device, where = device.type == "cuda" and nets.can_decode_jpegs(), Counter()

    def rows(x):
        where[x.device.type] += len(x)  # decoded on the device, or by PIL on the host
        return forward(model, x, device)

    every = out_path + ".tmp.npy"  # every row, failed ones as zeros
    batches = image_batches(paths, root, cfg["img_size"], args, device, on_device)
    try:
        ok, bad = nets.rows_to_npy(batches, rows, len(paths), every, np.float32, (cfg["dim"],),
                                   "embed", temp=False)
        if on_device:
            print(f"decoded: {where[device.type]} JPEGs on {device.type} (nvJPEG), "
                  f"{where['cpu']} images with PIL")
        good = np.flatnonzero(ok)
        compact_rows(out_path, every, good)
    finally:  # a full disk too: no temp file left (in INDEX/parts nothing else removes it)
        with contextlib.suppress(FileNotFoundError):
            os.remove(every)
    return good.tolist(), dict(bad)


def image_batches(paths, root, size, args, device, decode_on_device=False):
    """(x, idx, failed) batches over root/paths, decoded in DataLoader worker processes while
    the model runs (PIL, JPEG draft mode), pinned for a fast copy to a GPU. decode_on_device:
    JPEG files go to the device as bytes and decode there in batches (nets.decode_jpegs); the
    rest, and any it cannot decode, take the PIL way after them. idx index into paths."""
    rest = np.arange(len(paths))
    if decode_on_device:
        jpegs = np.array([i for i, p in enumerate(paths)
                          if p.lower().endswith((".jpg", ".jpeg"))], np.int64)
        retry = []
        for blobs, idx, failed in loader_over(files.FileBytes([paths[i] for i in jpegs], root),
                                              files.collate_bytes, args, device):
            retry += [int(jpegs[i]) for i, _ in failed]
            if blobs is not None:
                try:
                    yield nets.decode_jpegs(blobs, size, device), torch.from_numpy(
                        jpegs[idx.numpy()]), []
                except RuntimeError:  # a JPEG nvJPEG refuses (CMYK, lossless): PIL's turn
                    retry += jpegs[idx.numpy()].tolist()
        rest = np.sort(np.concatenate([np.setdiff1d(rest, jpegs), retry]).astype(np.int64))
    ds = files.ImageDataset([paths[i] for i in rest], root, nets.make_transform(size), size=size)
    for x, idx, failed in loader_over(ds, files.collate_skip, args, device):
        yield x, None if idx is None else torch.from_numpy(rest[idx.numpy()]), \
            [(int(rest[i]), why) for i, why in failed]


def loader_over(ds, collate, args, device):
    """Batches of ds in order, args.workers processes decoding ahead (4 batches each)."""
    kw = {"prefetch_factor": 4} if args.workers else {}
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                       collate_fn=collate, pin_memory=device.type == "cuda", **kw)


# ----------------------------------------------------------------------------- collection

def read_collection(root, manifest, index_dir):
    """(header, rows) of the images to index: the manifest's rows, or a scan of root."""
    files.image_source(root)  # a folder or a zip, there and readable: else one line here
    if manifest:
        rows = files.read_manifest(manifest)
        first = {}
        for r in rows:
            first.setdefault(r["path"], r)
        uniq = list(first.values())
        if len(uniq) < len(rows):
            print(f"note: {len(rows) - len(uniq)} repeated paths in {manifest} indexed once")
        return list(rows[0]), uniq
    paths, others = files.scan_images(root, index_dir)
    if others:
        print(f"skipped {others} non-image files under {root}")
    if not paths:
        raise UserError(f"no images under {root} (extensions {' '.join(files.IMAGE_EXTS)})")
    return ["path"], [{"path": p} for p in paths]


def embed_collection(model, rows, root, cfg, args, device, out_path):
    """Embed rows to out_path; returns (rows that decoded, n skipped, seconds). The others are
    listed in INDEX/skipped.csv."""
    src = files.image_source(root)
    found = [src.exists(r["path"]) for r in rows]
    todo = [r for r, ok in zip(rows, found, strict=True) if ok]
    skipped = [(r["path"], src.absent(r["path"])) for r, ok in zip(rows, found, strict=True)
               if not ok]  # missing, a symlink loop, not readable
    t0 = time.time()
    good, bad = embed_to_npy(model, [r["path"] for r in todo], root, cfg, args, device,
                             out_path) if todo else ([], {})
    skipped += [(todo[i]["path"], why) for i, why in sorted(bad.items())]
    files.write_csv(os.path.join(args.index, "skipped.csv"), ["path", "reason"], skipped)
    dt = time.time() - t0
    print(f"embedded {len(good)} images in {dt:.1f} s ({len(good) / max(dt, 1e-9):.1f} img/s)"
          + (f"; skipped {len(skipped)}, listed in {args.index}/skipped.csv" if skipped else ""))
    if not good:
        raise UserError(f"none of the {len(rows)} images under {root} could be read")
    return [todo[i] for i in good], len(skipped), dt
