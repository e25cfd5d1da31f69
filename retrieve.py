"""Painting similarity search: embed a collection, index it with FAISS, query it, evaluate it.

Holds the commands: --build and --add, torchrun parts, the sharded build's steps, --query,
--eval, --map. The FAISS index and its folder are index.py's, the embedder embed.py's, the
--eval protocols retrieve_eval.py's, images files.py's, pictures pages.py's.

Shell:
    python data.py demo                      # synthetic paintings in demo/ (no download needed)
    python retrieve.py --build               # demo/images + demo/gallery.csv -> demo/index
    python retrieve.py --query demo/images/Cubism/leon-voss_cityscape-7.jpg -k 5
    python retrieve.py --query-id Cubism/leon-voss_cityscape-7.jpg   # indexed; minus itself
    python retrieve.py --eval                # self-retrieval, copy detection, label retrieval
    python retrieve.py --eval --device cuda:1   # GPU FAISS on GPU 1 only (--all-gpus: every GPU)
    python retrieve.py --query-id Cubism/leon-voss_cityscape-7.jpg --html  # INDEX/results.html
    python retrieve.py --eval --html             # INDEX/eval.html: table, copy-detection failures
    python retrieve.py --map                 # demo/index/map.html: the collection in 2-D
    python retrieve.py --build --images nga/images --manifest nga/manifest.csv --index nga/index \\
        --index-type hnsw --pca 256
    python retrieve.py --add --manifest nga/manifest.csv --index nga/index   # only new paths
    python retrieve.py --build --ckpt runs/demo/best.pt --index demo/style_index  # learned style
    python retrieve.py --build --images wikiart.zip --manifest subset/manifest.csv  # zip in place
    torchrun --nproc-per-node 4 retrieve.py --build --images big --index big/index  # 4 GPUs embed
    python retrieve.py --train-only --images big --index big/index --index-type ivfpq  # millions:
    python retrieve.py --build --shard 0/8 --index big/index   # each I of N, on any machine
    python retrieve.py --merge-shards big/index                # one index, as if built at once

Notebook:
    import retrieve
    res = retrieve.main(["--query", "demo/images/Cubism/leon-voss_cityscape-7.jpg", "-k", "5"])
    D, I = res["D"], res["I"]          # a cell shows one line: <1 queries x 5 neighbours, ...>

Offline (no ImageNet download): `--weights PATH` (the file copied from a machine that has it);
for neighbours by style, a trained crnn.py checkpoint (`--ckpt runs/demo/best.pt`); `--weights
none` (seeded random init) only as a baseline (`--center` spreads its scores, README).

The index folder (--index DIR): CURRENT names the generation in use, DIR/gen-N/, which holds
embeddings.npy ((n, dim) float32, unit rows), meta.csv (path and the manifest's columns in the
same row order: row number = FAISS id), index.faiss and config.json (what is needed to embed a
query the same way, and fingerprints of the other three files). A --build or --add writes a new
generation and switches CURRENT at the end: a query never sees a half-written index, and a
second writer is refused while one runs (DIR/lock). Beside them: skipped.csv (missing or
unreadable images, with why), log.jsonl, eval.json, query_sheet.png, map.html (--map).
HTML pages are single files (thumbnails inside): open from disk, or in a notebook with
IPython.display.HTML(open(path, encoding="utf-8").read()).
Work that outlives a run sits beside the generations: INDEX/parts (each torchrun rank's finished
embeddings, reused when the same command runs again after a crash) and INDEX/shards (the trained
empty ivf index and the shards of a sharded build, until --merge-shards).
Bad input (a query that is not an image, an empty folder, an index from another version or
model, k above the number of indexed images) ends with one line on stderr and exit status 1.
Non-image files in a folder are skipped and counted; unreadable images are listed in skipped.csv.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
from torch import nn

import by
import files
import filters
import metrics
import nets
import pages
from embed import (
    MODEL_DEFAULTS,
    check_same_model,
    embed_collection,
    embed_pils,
    embed_to_npy,
    load_model,
    model_config,
    read_collection,
)
from files import UserError
from index import (
    INDEX_DEFAULTS,
    TRAIN_MAX,
    IndexWriter,
    add_rows,
    check_pca,
    check_shards,
    drop_self,
    generation,
    index_from_vectors,
    index_params,
    join_meta,
    merge_indexes,
    new_index,
    open_index,
    read_plan,
    rows_sha256,
    search,
    set_search_params,
    shard_dir,
    shard_files,
    to_search_device,
    train_index,
    write_generation,
    write_plan,
    write_shard,
)
from layout import LAYOUT_DIMS, LAYOUT_K, colour_column, layout_2d, stale_map_note
from retrieve_eval import (
    EVAL_NOTE,
    LABEL_COLUMNS,
    copy_failures,
    eval_by,
    eval_copies,
    eval_labels,
    eval_table,
    format_eval,
)

# FAISS names (index.py): xb database vectors, xq query vectors, D scores, I ids (row numbers of
# embeddings.npy and meta.csv, -1 where an approximate index found fewer than k).

DEFAULT_IMAGES, DEFAULT_MANIFEST, DEFAULT_INDEX = "demo/images", "demo/gallery.csv", "demo/index"
EVAL_MAX = 2000  # self and label protocols: a seeded sample of queries beyond this (SE ~0.01)
# ----------------------------------------------------------------------------- build and add

def cmd_build(args, device):
    if args.shard is not None:  # --shard '' too: parse_shard refuses it, no whole build
        return cmd_build_shard(args, device)
    job = build_job(args, device)
    if nets.world() > 1:
        return build_across_ranks(job, args, device)
    with IndexWriter(args.index) as w:  # the old generation answers queries till the end
        emb = os.path.join(w.dir, "embeddings.npy")
        rows, n_skip, dt = embed_collection(job.model, job.rows, job.root, job.cfg, args, device,
                                            emb)
        finish_build(w, emb, job, rows, args, device)
    return build_done(args, job.cfg, rows, n_skip, dt)


@dataclass
class BuildJob:
    """What a --build embeds, and how: the collection and the model (the config's model half)."""
    root: str
    manifest: str
    header: list
    rows: list
    cfg: dict
    model: nn.Module


def build_job(args, device):
    """The collection and the model of a --build; hopeless settings are refused here."""
    root = args.images or DEFAULT_IMAGES
    manifest = args.manifest or (DEFAULT_MANIFEST if root == DEFAULT_IMAGES and
                                 os.path.isfile(DEFAULT_MANIFEST) else None)
    header, rows = read_collection(root, manifest, args.index)
    cfg = model_config(args)
    cfg["precision"], why = nets.inference_precision(device, args.amp)
    model = load_model(cfg, device, why)
    # refuse a hopeless --pca or ivfpq before the (long) embedding pass, not after it
    index_params(cfg["index_type"], check_pca(args.pca, cfg["dim"], len(rows)), len(rows), args)
    return BuildJob(root, manifest, header, rows, cfg, model)


def finish_build(w, emb, job, rows, args, device, parts=None):
    """Index the vectors in emb (rows: the rows that decoded), write and commit generation w.
    parts: the ranks' aspect folders (torchrun), else the aspects are computed here."""
    if parts is None:
        by.build_aspects(w.dir, job.root, rows, job.cfg, args, device)  # --aspects: their files
    else:
        by.join_parts_into(w.dir, parts, build_aspect_names(args), job.cfg, len(rows))
    icfg, index = index_from_vectors(np.load(emb, mmap_mode="r"), args)
    job.cfg.update(icfg, images=job.root, manifest=job.manifest, seed=args.seed,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_generation(w.dir, index, job.header, rows, job.cfg)
    w.commit()


def build_done(args, cfg, rows, n_skip, dt, **extra):
    log(args.index, event="build", n=len(rows), skipped=n_skip, seconds=round(dt, 2),
        img_per_s=round(len(rows) / max(dt, 1e-9), 2), config=cfg, **extra)
    pca = f" -> pca {cfg['pca']}" if cfg["pca"] else ", centred" if cfg.get("center") else ""
    print(f"indexed {len(rows)} images in {args.index} ({cfg['index_type']}, {cfg['dim']}-d{pca})")
    return cfg


def cmd_add(args, device):
    """Embed only the paths not yet in meta.csv; a new generation holds the old rows and them."""
    with IndexWriter(args.index) as w:  # locked before reading: no other writer in between
        cfg, meta, xb, index = open_index(args.index)
        old_gen = generation(args.index)
        check_same_model(args, cfg)
        root = same_root(args.images, cfg, meta)
        moved, cfg["images"] = root != cfg["images"], root
        manifest = args.manifest or (cfg["manifest"] if not args.images and cfg["manifest"] and
                                     os.path.isfile(cfg["manifest"]) else None)
        header, rows = read_collection(root, manifest, args.index)
        have = {r["path"] for r in meta}
        new = [r for r in rows if r["path"] not in have]
        print(f"{len(rows) - len(new)} of {len(rows)} images are indexed already")
        if not new:
            if moved:  # nothing to embed, but the next --add and --eval must find them there
                files.copy_rows(os.path.join(w.dir, "embeddings.npy"), [(xb.filename, len(xb))])
                by.copy_aspects(old_gen, w.dir, cfg)
                write_generation(w.dir, index, list(meta[0]), meta, cfg)
                w.commit()
            return cfg
        part = os.path.join(w.dir, "added.npy")
        model = load_model(cfg, device)
        new, n_skip, dt = embed_collection(model, new, root, cfg, args, device, part)
        emb = os.path.join(w.dir, "embeddings.npy")
        files.copy_rows(emb, [(xb.filename, len(xb)), (part, len(new))])
        os.remove(part)
        add_rows(index, np.load(emb, mmap_mode="r"), start=len(xb))  # trained transforms kept
        by.add_aspects(old_gen, w.dir, cfg, new, root, args, device)
        header = list(dict.fromkeys(list(meta[0]) + header))  # old columns, then any new ones
        write_generation(w.dir, index, header, meta + new, cfg)
        w.commit()
    log(args.index, event="add", n_new=len(new), n=cfg["n"], skipped=n_skip, seconds=round(dt, 2))
    print(f"added {len(new)} images: {cfg['n']} in {args.index}")
    return cfg


def same_root(images, cfg, meta):
    """The image root for --add: the index's own, or --images where the indexed images moved
    to. One root per index: new images from another folder belong under it (or a new index)."""
    if not images or os.path.abspath(images) == os.path.abspath(cfg["images"]):
        return cfg["images"]
    moved = files.image_source(images).exists(meta[0]["path"]) and \
        not os.path.exists(cfg["images"])
    if not moved:
        raise UserError(f"{cfg['images']} is this index's image root (one root per index): "
                        f"put the new images under it and run --add without --images, or "
                        f"--build a new --index for {images}")
    print(f"note: the indexed images moved from {cfg['images']} to {images}")
    return images


# ----------------------------------------------------------------------------- torchrun parts
# `torchrun --nproc-per-node N retrieve.py --build ...`: rank R embeds rows[R*n/N:(R+1)*n/N]
# into the part INDEX/parts/<purpose>-<key>/embeddings.part-R-of-N (nets.py's per-rank parts:
# the .npy, then the .json record, its rows and what it skipped, last). The key hashes the
# model, the images, the row list and N: the same command after a crash keeps the finished
# parts and embeds only the others; another model or collection never reads them. Rank 0 waits
# for all (all_gather), joins the parts in rank order into the generation's embeddings.npy
# (bounded memory), indexes them and commits, as one process does.

PART_KEYS = ("backbone", "weights", "weights_sha256", "ckpt", "ckpt_sha256", "img_size", "pool",
             "grid", "init_seed", "dim", "precision")  # what a vector depends on (and the
# images, the rows and the number of processes)


def parts_stem(index, purpose, cfg, root, rows):
    what = [{k: cfg.get(k) for k in PART_KEYS}, root, nets.world(), rows_sha256(rows)]
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    return os.path.join(index, "parts", f"{purpose}-{key}", "embeddings")


def embed_shared(model, rows, root, cfg, args, device, purpose, aspects=None):
    """Embed rows, each rank its contiguous part (one process: all of them), keeping parts an
    earlier run finished; aspects: the names (by.py) each rank also computes for its rows that
    embedded, into aspect_parts(stem)[rank]. Returns (parts stem, [each rank's part record, in
    rank order]) on every rank, once all ranks are done."""
    stem = parts_stem(args.index, purpose, cfg, root, rows)
    lo, hi = nets.rank_part(len(rows))
    got = nets.read_part(stem)
    if got and (got[0].get("start"), got[0].get("stop")) == (lo, hi) and \
            got[1].shape[1:] == (cfg["dim"],):
        rec = {**got[0], "reused": True}
    else:
        rec = embed_part(model, rows, lo, hi, root, cfg, args, device, stem)
    if aspects and aspects != ["content"]:
        skipped = dict(rec["skipped"])
        mine = [rows[i] for i in range(lo, hi) if i not in skipped]
        rec["aspects_kept"] = not by.compute_part(aspect_parts(stem)[nets.rank()], root, mine,
                                                  aspects, args, device)
    return stem, nets.all_gather_objects(rec)  # rank 0 waits here for the slowest rank


def aspect_parts(stem):
    """Each rank's aspects folder beside its embeddings part, in rank order."""
    n = nets.world()
    return [os.path.join(os.path.dirname(stem), f"aspects.part-{r}-of-{n}") for r in range(n)]


def embed_part(model, rows, lo, hi, root, cfg, args, device, stem):
    """Embed rows[lo:hi] to this rank's part. Skipped rows are listed by their index in rows,
    with why."""
    src, t0 = files.image_source(root), time.time()
    todo = [i for i in range(lo, hi) if src.exists(rows[i]["path"])]
    there, npy = set(todo), nets.part_stem(stem) + ".npy"
    os.makedirs(os.path.dirname(npy), exist_ok=True)
    good, bad = embed_to_npy(model, [rows[i]["path"] for i in todo], root, cfg, args, device,
                             npy)
    why = {i: src.absent(rows[i]["path"]) for i in range(lo, hi) if i not in there}
    why.update({todo[j]: reason for j, reason in bad.items()})
    rec = {"rank": nets.rank(), "start": lo, "stop": hi, "n": len(good),
           "skipped": sorted(why.items()), "seconds": round(time.time() - t0, 3)}
    nets.finish_part(stem, rec)
    return {**rec, "reused": False}


def join_parts(stem, rows, dst):
    """The ranks' parts, in rank order, into dst; returns (rows that decoded, [(path, why)])."""
    why = dict(kv for rec in nets.join_parts(stem, dst) for kv in rec["skipped"])
    return ([r for i, r in enumerate(rows) if i not in why],
            [(rows[i]["path"], reason) for i, reason in sorted(why.items())])


def remove_parts(stem):
    """A used parts folder, and INDEX/parts once empty."""
    folder = os.path.dirname(stem)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(folder))


def report_parts(recs):
    """Print what each rank did; returns the embedding time, the slowest rank's seconds."""
    for r, rec in enumerate(recs):
        n = rec["stop"] - rec["start"]
        kept = "; its aspects kept from an earlier run" if rec.get("aspects_kept") else ""
        if rec["reused"]:
            print(f"rank {r}: {n} images kept from an earlier run{kept}")
        else:
            print(f"rank {r}: embedded {n} images in {rec['seconds']:.1f} s "
                  f"({n / max(rec['seconds'], 1e-9):.1f} img/s){kept}")
    return max(0.0 if rec["reused"] else rec["seconds"] for rec in recs)


def build_aspect_names(args):
    return by.parse_aspects(args.aspects or by.DEFAULT_ASPECTS)


def build_across_ranks(job, args, device):
    """--build under torchrun: every rank embeds its part; rank 0 alone writes the index."""
    stem, recs = embed_shared(job.model, job.rows, job.root, job.cfg, args, device, "build",
                              build_aspect_names(args))
    if not nets.is_main():
        return None
    dt = report_parts(recs)
    with IndexWriter(args.index) as w:
        emb = os.path.join(w.dir, "embeddings.npy")
        rows, skipped = join_parts(stem, job.rows, emb)
        files.write_csv(os.path.join(args.index, "skipped.csv"), ["path", "reason"], skipped)
        if not rows:
            raise UserError(f"none of the {len(job.rows)} images under {job.root} could be read")
        finish_build(w, emb, job, rows, args, device, aspect_parts(stem))
    remove_parts(stem)  # its vectors and aspects are in the generation now
    print(f"embedded {len(rows)} images on {nets.world()} processes in {dt:.1f} s "
          f"({len(rows) / max(dt, 1e-9):.1f} img/s)" + (
              f"; skipped {len(skipped)}, listed in {args.index}/skipped.csv" if skipped else ""))
    return build_done(args, job.cfg, rows, len(skipped), dt, processes=nets.world())


# ----------------------------------------------------------------------------- sharded ivf build
# For millions of images (FAISS wiki, "Indexes that do not fit in RAM"): train once, add in
# shards anywhere, merge. INDEX/shards/ holds
#   trained.faiss, plan.json   --train-only: the empty ivfpq/ivf-flat index trained on a seeded
#                              sample, and what the shards must share (model, collection rows)
#   index.shard-I.faiss, embeddings.shard-I.npy, meta.shard-I.csv, shard-I.json
#                              --build --shard I/N: rows[I*n/N:(I+1)*n/N] added to a copy of
#                              trained.faiss; the json, written last, fingerprints the other three
# --merge-shards INDEX checks them all, then appends each shard's inverted lists to the trained
# index in shard order (IndexIVF.merge_from, ids shifted by the rows before): every list then
# holds the same entries in the same order as after adding all vectors to one index, so it
# answers identically. The merged index is in RAM while written: code + 8-byte id per vector.

IVF_TYPES = ("ivfpq", "ivf-flat")
MODEL_KEYS = ("format", "version", *MODEL_DEFAULTS, "init_seed", "weights_sha256", "precision",
              "ckpt_sha256", "dim")  # a shard must match the plan in all of these


def parse_shard(text):
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m[1]) < int(m[2]):
        raise UserError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def cmd_train_only(args, device):
    """Embed a seeded sample of <= TRAIN_MAX rows, train the ivf index on it, store it empty."""
    if args.index_type not in IVF_TYPES:
        raise UserError("--train-only needs --index-type ivfpq or ivf-flat (the types that are "
                        "built in shards and merged)")
    job = build_job(args, device)
    pick = np.sort(np.random.default_rng(args.seed).choice(
        len(job.rows), min(len(job.rows), TRAIN_MAX), replace=False))
    sample = [job.rows[i] for i in pick]
    stem, recs = embed_shared(job.model, sample, job.root, job.cfg, args, device, "sample")
    if not nets.is_main():
        return None
    report_parts(recs)
    d = shard_dir(args.index)
    xs = os.path.join(os.path.dirname(stem), "sample.npy")
    good = join_parts(stem, sample, xs)[0]
    if not good:
        raise UserError(f"none of the {len(sample)} sampled images under {job.root} could be "
                        "read")
    xb = np.load(xs, mmap_mode="r")
    kind, dim = job.cfg["index_type"], check_pca(args.pca, job.cfg["dim"], len(xb))
    job.cfg.update(metric="inner_product", index_dim=dim,
                   index_params=index_params(kind, dim, len(xb), args))
    index = new_index(job.cfg)
    train_index(index, xb, args.seed)  # the sample as a 1-process --build would draw it
    job.cfg.update(images=job.root, manifest=job.manifest, seed=args.seed,
                   aspects=by.parse_aspects(args.aspects or by.DEFAULT_ASPECTS))
    plan = write_plan(args.index, index, job.cfg, job.header, job.rows, len(good))
    remove_parts(stem)
    print(f"trained {kind} on {len(good)} of {len(job.rows)} images "
          f"({job.cfg['index_params']}): {d}/trained.faiss; now --build --shard I/N")
    return plan


def cmd_build_shard(args, device):
    """--build --shard I/N: embed this shard's rows and add them to a copy of trained.faiss."""
    i, n = parse_shard(args.shard)
    plan = read_plan(args.index)
    cfg = dict(plan["config"])
    check_same_model(args, cfg)
    root = args.images or cfg["images"]  # the same collection, maybe elsewhere on this machine
    manifest = args.manifest or (cfg["manifest"] if not args.images else None)
    header, rows = read_collection(root, manifest, args.index)
    if rows_sha256(rows) != plan["rows_sha256"]:
        raise UserError(f"{root}: not the {plan['rows']} images the trained index was planned "
                        f"for ({len(rows)} images, or another order): train again with "
                        "--train-only, or point --images/--manifest at that collection")
    lo, hi = nets.rank_part(len(rows), i, n)
    rows, model = rows[lo:hi], load_model(cfg, device)
    names = by.plan_aspects(cfg, args)
    stem, recs = embed_shared(model, rows, root, cfg, args, device, f"shard-{i}-of-{n}", names)
    if not nets.is_main():
        return None
    report_parts(recs)
    info = {"shard": i, "of": n, "start": lo, "stop": hi, "rows_sha256": plan["rows_sha256"],
            "config": {k: cfg.get(k) for k in MODEL_KEYS}}
    good, skipped = join_parts(stem, rows, shard_files(args.index, i)["embeddings"])
    by.join_parts_into_shard(shard_dir(args.index), i, aspect_parts(stem), names)
    info = write_shard(args.index, info, good, skipped, header)
    remove_parts(stem)
    print(f"shard {i}/{n}: {info['n']} images (rows {lo}..{hi - 1}) in "
          f"{shard_files(args.index, i)['index']}")
    return info


def cmd_merge_shards(args):
    """--merge-shards INDEX: every shard checked, then one generation of them all."""
    args.index = args.merge_shards
    plan = read_plan(args.index)
    shards = check_shards(args.index, plan, lambda i, n: nets.rank_part(plan["rows"], i, n))
    shard_paths = [shard_files(args.index, s["shard"]) for s in shards]
    with IndexWriter(args.index) as w:
        files.copy_rows(os.path.join(w.dir, "embeddings.npy"),
                  [(f["embeddings"], s["n"]) for f, s in zip(shard_paths, shards, strict=True)])
        join_meta([f["meta"] for f in shard_paths], os.path.join(w.dir, "meta.csv"))
        index = merge_indexes(os.path.join(shard_dir(args.index), "trained.faiss"),
                              [f["index"] for f in shard_paths])
        cfg = {**plan["config"], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "merged_shards": len(shards)}
        by.merge_shard_aspects(w.dir, shard_dir(args.index), len(shards), cfg)
        write_generation(w.dir, index, plan["header"], None, cfg)
        w.commit()
    skipped = [tuple(x) for s in shards for x in s["skipped"]]
    files.write_csv(os.path.join(args.index, "skipped.csv"), ["path", "reason"], skipped)
    log(args.index, event="merge", shards=len(shards), n=cfg["n"], skipped=len(skipped))
    print(f"merged {len(shards)} shards: {cfg['n']} images in {args.index} "
          f"({cfg['index_type']}, {cfg['dim']}-d); {shard_dir(args.index)} may be removed")
    return cfg


# ----------------------------------------------------------------------------- query

def open_for_search(args, device, subset=False):
    """Index folder checked against the typed flags, with search-time overrides applied and
    --where's rows alone searched (subset: --eval, --map: as a collection of their own)."""
    cfg, meta, xb, index = open_index(args.index)
    check_same_model(args, cfg)
    cfg["images"] = args.images or cfg["images"]  # the images may have moved since the build
    p = dict(cfg["index_params"])
    p.update({k: v for k, v in (("ef_search", args.ef_search), ("nprobe", args.nprobe)) if v})
    set_search_params(index, p)
    index = to_search_device(index, cfg, device, args.all_gpus)
    keep = filters.where_rows(meta, args.where)
    if subset:
        return (cfg, *filters.restrict(meta, xb, index, keep))
    return cfg, meta, xb, index if keep is None else filters.Filtered(index, xb, keep)


def check_k(k, n):
    if not 1 <= k <= n:
        raise UserError(f"-k {k}: the index has {n} candidates (1 <= k <= {n})")


def load_query(path, size):
    if not os.path.isfile(path):
        raise UserError(f"query image not found: {path}")
    try:
        return files.load_image(path, size)
    except files.DECODE_ERRORS as e:
        raise UserError(f"query is not a readable image: {path} ({files.decode_error(e)})") \
            from None


def cmd_query(args, device):
    cfg, meta, xb, index = open_for_search(args, device)
    ims = [load_query(p, cfg["img_size"]) for p in args.query]
    check_k(args.k, index.ntotal)
    xq = embed_pils(load_model(cfg, device), ims, cfg, args, device)
    if not by.content_only(args.by):
        D, I, why = by.search_by(args, cfg, xb, index, [(p, x, None) for p, x in
                                                        zip(args.query, xq, strict=True)], device)
        return report(args, cfg, meta, list(args.query), D, I, why=why,
                      own=indexed_rows(args.query, cfg, meta))
    D, I = search(index, xq, args.k)
    return report(args, cfg, meta, list(args.query), D, I, own=indexed_rows(args.query, cfg, meta))


def indexed_rows(paths, cfg, meta):
    """The manifest row of each query file that is an indexed painting (its labels), else None."""
    row = {r["path"]: r for r in meta}
    return [row.get(os.path.relpath(p, cfg["images"]).replace(os.sep, "/"))
            if os.path.isdir(cfg["images"]) else None for p in paths]


def cmd_query_id(args, device):
    """Search with an indexed painting's stored vector; k + 1 results minus itself."""
    cfg, meta, xb, index = open_for_search(args, device)
    row = {r["path"]: i for i, r in enumerate(meta)}
    if not all(p.strip() for p in args.query_id):
        raise UserError(f"--query-id: an empty path (paths as in meta.csv, e.g. "
                        f"{meta[0]['path']})")
    rel = [p if p in row else os.path.relpath(p, cfg["images"]).replace(os.sep, "/")
           for p in args.query_id]
    for p, r in zip(args.query_id, rel, strict=True):
        if r not in row:
            raise UserError(f"not in the index: {p} (paths as in meta.csv, e.g. "
                            f"{meta[0]['path']})")
    check_k(args.k, index.ntotal - 1)
    ids = np.array([row[r] for r in rel])
    src = files.image_source(cfg["images"], must_exist=False)
    names = [os.path.join(cfg["images"], r) for r in rel]  # names to print, thumbnails from src
    if not by.content_only(args.by):
        D, I, why = by.search_by(args, cfg, xb, index, [(n, None, i) for n, i in
                                                        zip(names, ids, strict=True)], device)
        return report(args, cfg, meta, names, D, I, [src.thumb(r) for r in rel], why,
                      [meta[i] for i in ids])
    D, I = search(index, xb[ids], args.k + 1)
    keep = drop_self(I, ids, args.k)
    D, I = D[keep].reshape(len(ids), args.k), I[keep].reshape(len(ids), args.k)
    return report(args, cfg, meta, names, D, I, [src.thumb(r) for r in rel],
                  own=[meta[i] for i in ids])


def labels_text(row, cols):
    """'style Cubism, genre portrait': the label columns a row has."""
    return ", ".join(f"{c} {row[c]}" for c in cols if row.get(c))


def report(args, cfg, meta, queries, D, I, thumbs=None, why=None, own=None):
    """Print the ranked lists, write the contact sheet; returns (D, I). thumbs: what to draw
    for each query when not its path (an indexed image inside a zip); why: --by's aspect
    scores per hit; own: each query's own manifest row where it is an indexed painting (its
    labels are printed and shown)."""
    cols = [c for c in LABEL_COLUMNS if c in meta[0] and c != "attribution"]
    own = own or [None] * len(queries)
    for n, (q, d_row, i_row, mine) in enumerate(zip(queries, D, I, own, strict=True)):
        print(f"query: {q}" + (f"  [{labels_text(mine, cols)}]" if mine else "") +
              "\n  rank  score  path  [title - attribution]" + (f"  [{', '.join(cols)}]"
                                                                 if cols else ""))
        for rank, (score, i) in enumerate(zip(d_row, i_row, strict=True), 1):
            if i >= 0:
                r = meta[i]
                label = " - ".join(x for x in (r.get("title"), r.get("attribution")) if x)
                tags = labels_text(r, cols)
                print(f"  {rank:>4}  {score:.3f}  {r['path']}{'  ' + label if label else ''}"
                      + (f"  [{tags}]" if tags else "")
                      + (f"\n        by {by.why_line(why[n]['hits'][rank - 1]['scores'], args.by)}"
                         if why else ""))
    sheet = args.sheet or os.path.join(args.index, "query_sheet.png")
    query_sheet(queries, D, I, meta, cfg["images"], sheet, thumbs, why)
    print(f"contact sheet: {sheet}")
    if args.html:
        results_html(args, cfg, meta, queries, D, I, thumbs, why, own)
    return D, I


def index_line(folder, cfg):
    """One line on what an index holds and how it embeds, for the top of a page."""
    model = f"crnn checkpoint {cfg['ckpt']}" if cfg.get("ckpt") else \
        f"{cfg['backbone']} ({cfg['weights']} weights), {cfg['pool']} pooling"
    return (f"index {folder}: {cfg['n']} images from {cfg['images']}, {model}, "
            f"{cfg['img_size']} px, {cfg['index_type']}" + (f", pca {cfg['pca']}" if cfg["pca"]
                                                             else ""))


def results_html(args, cfg, meta, queries, D, I, thumbs=None, why=None, own=None):
    """--html: each query, then its neighbours in rank order with every manifest column.
    thumbs: what to draw for each query when not its path (as for the contact sheet); why:
    --by's per hit (aspect scores, figures drawn)."""
    hits = [[(float(s), meta[i]) for s, i in zip(d_row, i_row, strict=True) if i >= 0]
            for d_row, i_row in zip(D, I, strict=True)]
    lines = [index_line(args.index, cfg), f"{args.k} neighbours per query; score: cosine "
             "similarity of the embeddings (1 = the same direction)"]
    if why:
        hits, thumbs, lines[1] = by.page_hits(hits, why, cfg["images"], queries, thumbs)
    own = own or [None] * len(queries)
    bad = pages.results_page(args.html, lines, list(zip(queries, thumbs or queries, hits,
                                                        own, strict=True)), cfg["images"])
    print(f"html: {args.html}" + (f" ({bad} images no longer decode: grey)" if bad else ""))


def query_sheet(queries, D, I, meta, root, path, thumbs=None, why=None):
    """One row per query: the query (framed), then its top k with rank, score and title (--by:
    the aspect scores, and the figures drawn)."""
    rows, src = [], files.image_source(root, must_exist=False)  # a folder or a zip
    for n, (q, d_row, i_row) in enumerate(zip(queries, D, I, strict=True)):
        rows.append([(thumbs[n] if thumbs else q, "query", os.path.basename(q))] + [
            (src.thumb(meta[i]["path"]), f"{rank}. {s:.3f}",
             meta[i].get("title") or os.path.basename(meta[i]["path"]))
            for rank, (s, i) in enumerate(zip(d_row, i_row, strict=True), 1) if i >= 0])
    pages.contact_sheet(by.sheet_rows(rows, why) if why else rows, path, frame_first=True)


# ----------------------------------------------------------------------------- evaluation

def cmd_eval(args, device):
    cfg, meta, xb, index = open_for_search(args, device, subset=True)
    n = len(xb)
    if n < 11:
        raise UserError(f"--eval needs >= 11 indexed images (the query and 10 neighbours); "
                        f"{args.index} has {n}")
    rng = np.random.default_rng(args.seed)
    ids = np.sort(rng.choice(n, size=min(n, EVAL_MAX), replace=False))
    _, I = search(index, xb[ids], 11)
    res = {"n": n, "self": {"queries": len(ids), **metrics.retrieval_metrics(I[:, :10], ids)}}
    cids = np.sort(rng.choice(n, size=min(n, args.eval_queries or 200), replace=False))
    keep, model = ({} if args.html else None), load_model(cfg, device)
    res["copy"] = eval_copies(model, index, meta, cfg, args, device, cids, keep)
    res.update(eval_by(model, index, meta, cfg, args, device, cids))  # --by: pose; copies
    res["labels"] = eval_labels(meta, I[drop_self(I, ids, 10)].reshape(len(ids), 10), ids, n)
    print(format_eval(res))
    files.atomic_write(os.path.join(args.index, "eval.json"),
                      json.dumps({**res, "config": cfg}, indent=1) + "\n")
    log(args.index, event="eval", **res)
    if args.html:
        eval_html(args, cfg, meta, res, cids, keep)
    return res


def eval_html(args, cfg, meta, res, ids, keep):
    lines = [index_line(args.index, cfg), f"seed {args.seed}; copy detection: "
             f"{res['copy']['queries']} transformed copies searched among all {res['n']}"]
    failures = copy_failures(meta, ids, keep)
    bad = pages.retrieval_eval_page(args.html, lines, eval_table(res),
                                    EVAL_NOTE.format(n=res["n"]).split("\n"), failures,
                                    cfg["images"])
    print(f"html: {args.html} ({len(failures)} copy-detection failures"
          + (f", {bad} images no longer decode: grey)" if bad else ")"))


# ----------------------------------------------------------------------------- map

def cmd_map(args, device):
    """INDEX/map.html: the collection laid out by its embeddings, with each painting's -k
    nearest neighbours from the index (precomputed here: the page runs no search)."""
    gen = generation(args.index)
    emb = os.path.join(gen, "embeddings.npy")
    if os.path.isfile(os.path.join(gen, "config.json")) and not os.path.isfile(emb):
        raise UserError(f"--map lays out the stored embeddings and {emb} is missing: rebuild "
                        "the index with --build")
    cfg, meta, xb, index = open_for_search(args, device, subset=True)
    n, k = len(xb), min(args.k, len(xb) - 1)
    if k < 1:
        raise UserError(f"--map needs at least 2 indexed images; {args.index} has {n}")
    D, I = search(index, xb, k + 1)
    keep = drop_self(I, np.arange(n), k) & (I >= 0)  # hnsw/ivfpq may find fewer than k
    nn = [I[q][keep[q]].tolist() for q in range(n)]
    ns = [D[q][keep[q]].tolist() for q in range(n)]
    if args.color_by in by.MAP_COLOURS and args.color_by not in meta[0]:
        meta = by.with_map_column(args.index, cfg, meta, args.color_by)  # an aspect's classes
    colour = colour_column(args.color_by, meta, LABEL_COLUMNS)
    t0 = time.time()
    xy = layout_2d(xb, args.seed)
    print(f"layout: {n} paintings in {time.time() - t0:.1f} s")
    out = args.html or os.path.join(args.index, "map.html")
    lines = [index_line(args.index, cfg) + f" ({os.path.basename(gen)}, "
             f"{cfg.get('created', '')})", f"layout: PCA to {LAYOUT_DIMS} dims, then a "
             f"{LAYOUT_K}-nearest-neighbour graph drawn with attracting edges (near = similar); "
             f"click: the {k} nearest neighbours from the index"]
    bad = pages.map_page(out, lines, xy, meta, nn, ns, cfg["images"], colour,
                         os.path.basename(gen))
    print(f"map: {out} ({os.path.getsize(out) / 1e6:.1f} MB, {n} paintings"
          + (f", {bad} no longer decode: grey)" if bad else ")"))
    return files.Result(f"map: {out}, {n} paintings", {"path": out, "xy": xy})


# ----------------------------------------------------------------------------- main

def indexed(cfg, index_dir):
    """--build/--add/--merge-shards: the config (res["config"]) behind a one-line repr; a note
    when the index's map.html is now stale."""
    if cfg is None or "index_type" not in cfg:
        return cfg  # a torchrun rank other than 0, a --build --shard record
    stale_map_note(index_dir)
    return files.Result(f"index: {cfg['n']} images, {cfg['index_type']}, {cfg['dim']}-d"
                        + (", centred" if cfg.get("center") else ""),
                        {"config": cfg, "n": cfg["n"]})


def found(DI):
    """--query/--query-id: D, I as res["D"], res["I"] (FAISS's names), one line shown."""
    D, I = DI
    return files.Result(f"{len(D)} queries x {D.shape[1]} neighbours, best score "
                        f"{D[:, 0].max():.3f}", {"D": D, "I": I})


def evaluated(res):
    """--eval: the protocols' figures (res["copy"]["top1"], res["labels"]), one line shown."""
    line = f"eval of {res['n']} images: copy detection top-1 {res['copy']['top1']:.3f}" + "".join(
        f", {c} mAP@10 {v['map@10']:.3f} (random {v['random_map@10']:.3f})"
        for c, v in res["labels"].items())
    return files.Result(line, res)


def log(folder, **record):
    files.append_jsonl(os.path.join(folder, "log.jsonl"), {"time": time.time(), **record})


def check_html(args):
    """--html goes with a mode that writes a page; it and --sheet into a folder that exists,
    onto no folder or device: a typo should end the run before an embedding pass, not after."""
    if args.sheet is not None:
        files.check_output(args.sheet, "--sheet")
    if args.html is None:
        return
    if args.build or args.add:
        raise UserError("--html goes with --query, --query-id, --eval or --map")
    if not args.html:  # --html alone: the page beside the index, not in the working folder
        name = "eval" if args.eval else "map" if args.map else "results"
        args.html = os.path.join(args.index, f"{name}.html")
        if not os.path.isdir(args.index):
            return  # no index there: the command says so in its own words
    files.check_output(args.html, "--html")


def default(key):
    """' (default: X)' for a flag whose default lives in MODEL_DEFAULTS or INDEX_DEFAULTS."""
    return f" (default: {MODEL_DEFAULTS.get(key, INDEX_DEFAULTS.get(key))})"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=files.Help)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", action="store_true", help="embed the collection, write an index")
    mode.add_argument("--add", action="store_true", help="embed and add the images not indexed")
    mode.add_argument("--query", nargs="+", metavar="IMG", help="image files to search for")
    mode.add_argument("--query-id", nargs="+", metavar="PATH",
                      help="indexed paths (as in meta.csv) to search for, minus themselves")
    mode.add_argument("--eval", action="store_true", help="self, copy-detection, label retrieval")
    mode.add_argument("--map", action="store_true", help="INDEX/map.html: the collection in 2-D "
                      "by its embeddings, thumbnails, -k neighbours on click, a filter box")
    mode.add_argument("--train-only", action="store_true",
                      help="sharded build, step 1: embed a seeded sample (<= 100k images), train "
                      "an ivfpq or ivf-flat index on it and store it empty (INDEX/shards)")
    mode.add_argument("--merge-shards", metavar="INDEX", help="sharded build, step 3: merge "
                      "INDEX/shards into one index (a new generation of INDEX)")
    p.add_argument("--images", "--root", help=f"image folder, or a .zip read in place; paths "
                   f"are stored relative to it (default: {DEFAULT_IMAGES} for --build, else the "
                   "index's root); --root as in crnn.py")
    p.add_argument("--manifest", "--data", help=f"CSV with a path column (default: "
                   f"{DEFAULT_MANIFEST} with the default --images if it exists, else every image "
                   "under --images; --add: the index's manifest unless --images is given); "
                   "--data as in crnn.py")
    p.add_argument("--index", default=DEFAULT_INDEX, help="index folder")
    p.add_argument("--shard", metavar="I/N", help="with --build, sharded build step 2: embed "
                   "the I-th of N contiguous parts of the collection and add it to a copy of the "
                   "trained index (INDEX/shards/index.shard-I.faiss); any machine, any order")
    m = p.add_argument_group("model, recorded in config.json (--query/--add/--eval reuse it)")
    m.add_argument("--backbone", help="torchvision CNN" + default("backbone"))
    m.add_argument("--weights", help="imagenet | none (seeded random) | PATH of a state_dict"
                   + default("weights"))
    m.add_argument("--ckpt", help="crnn.py checkpoint: embed with its learned model instead")
    m.add_argument("--img-size", type=int, help="px: shorter side, then centre crop"
                   + default("img_size"))
    m.add_argument("--pool", choices=("avg", "gem", "grid"), help="global average, GeM (p=3), or "
                   "a grid of cells that keeps the layout" + default("pool"))
    m.add_argument("--grid", type=int, help="--pool grid: G x G cells" + default("grid"))
    x = p.add_argument_group("faiss index (defaults sized from the collection)")
    x.add_argument("--index-type", choices=("flat", "hnsw", "ivfpq", "ivf-flat"),
                   help="flat: exact; hnsw, ivfpq, ivf-flat: approximate, for 100k+ images; "
                   "ivfpq and ivf-flat can be built in shards (on a GPU build of faiss, flat and "
                   "the ivf types search on the GPU; ivfpq trained on under ~10k vectors gets "
                   "nbits < 8, which the GPU kernels lack: it stays on the CPU)"
                   + default("index_type"))
    x.add_argument("--pca", type=int, metavar="D", help="PCA-whiten to D dims, then re-normalise "
                   "(default: off)")
    x.add_argument("--center", action=argparse.BooleanOptionalAction, help="subtract the "
                   "collection's mean vector, then re-normalise (the mean is kept in index.faiss:"
                   " queries and --add are centred alike); scores then spread over -1..1 "
                   "instead of bunching near 1 (default: off; see the README for when)")
    x.add_argument("--hnsw-m", type=int, help="hnsw links per node" + default("hnsw_m"))
    x.add_argument("--ef-construction", type=int, help="hnsw build beam"
                   + default("ef_construction"))
    x.add_argument("--ef-search", type=int, help="hnsw search beam; also at query time"
                   + default("ef_search"))
    x.add_argument("--nlist", type=int, help="ivf lists (default: 4 sqrt(n), <= n/39)")
    x.add_argument("--pq-m", type=int, help="ivfpq bytes per vector (default: the largest "
                   "divisor of the size <= 64)")
    x.add_argument("--nbits", type=int, help="ivfpq bits per code (default: 8, fewer for small n)")
    x.add_argument("--nprobe", type=int, help="ivf lists searched; also at query time"
                   + default("nprobe"))
    q = p.add_argument_group("query and eval")
    q.add_argument("-k", type=int, default=5, help="results per query")
    q.add_argument("--where", action="append", metavar="FILTER", help="--query, --query-id, "
                   "--eval, --map: only rows of meta.csv that pass, e.g. 'style=Baroque', "
                   "'year<1700', 'artist=rembrandt|vermeer' (= != < <= > >=; numbers as "
                   "numbers; repeat: all must hold)")
    q.add_argument("--by", default="content", metavar="ASPECTS", help="--query/--query-id: "
                   f"rank by {', '.join(by.ASPECTS)}, or weighted, e.g. pose=1,light=0.3 (the "
                   "index must hold them: --build --aspects)")
    q.add_argument("--mirror", action="store_true", help="--by pose/face: a mirrored figure "
                   "matches too")
    q.add_argument("--sheet", help="contact sheet PNG (default: INDEX/query_sheet.png)")
    q.add_argument("--html", metavar="PAGE", nargs="?", const="", help="also write a "
                   "self-contained HTML page: --query/--query-id the results (--html alone: "
                   "INDEX/results.html), --eval the table and the copy-detection failures "
                   "(INDEX/eval.html); --map its page (default: INDEX/map.html)")
    q.add_argument("--color-by", metavar="COLUMN", help="--map: frame each painting in the "
                   "colour of its value in COLUMN, with a legend (default: the first of style, "
                   "artist, genre, attribution with 2+ values; none: no colours); or an aspect "
                   "the index has: light (where it comes from), key (low/middle/high), figures "
                   "(how many), face (the first figure's orientation)")
    q.add_argument("--eval-queries", type=int, help="copy-detection queries (default: "
                   "min(200, n))")
    a = p.add_argument_group("aspects (pose, face, light, layout)")
    a.add_argument("--aspects", help="--build: what to index besides content, of "
                   f"{','.join(by.ASPECTS)}; pose and face run a keypoint detector on every "
                   f"image unless --poses gives the figures (default: {by.DEFAULT_ASPECTS})")
    a.add_argument("--poses", metavar="FILE", help="COCO keypoint JSON of the images' figures "
                   "(paths relative to --images): pose and face without the detector")
    a.add_argument("--pose-weights", help="the detector's weights: coco (downloaded once), "
                   "none (random init: tests), or a state_dict PATH (default: coco)")
    r = nets.add_runtime_flags(p, "--build: embed with bf16 weights on CPUs with fast bf16 "
                               "(AMX, Zen 4) and CUDA sm >= 8.0, fp16 on older GPUs (T4); "
                               "--no-amp: fp32. The index records it: queries, --add and "
                               "--eval embed as it was built", "; with a GPU build of FAISS "
                               "the index is searched on this one GPU")
    r.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    r.add_argument("--all-gpus", action="store_true", help="--query/--eval/--map with a GPU "
                   "build of FAISS: a copy of the index on every GPU, queries split over them "
                   "(default: only the --device GPU)")
    r.add_argument("--seed", type=int, default=0, help="init, samples, copies")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    nets.main_prints_only()
    files.tolerant_stdout()
    print("args:", json.dumps(vars(args)))
    nets.tune_malloc()
    try:
        check_html(args)
        if args.where and not (args.query or args.query_id or args.eval or args.map):
            raise UserError("--where goes with --query, --query-id, --eval or --map")
        if args.shard is not None and not args.build:
            raise UserError("--shard I/N goes with --build")
        if args.merge_shards:
            return indexed(cmd_merge_shards(args), args.index) if nets.is_main() else None
        device = nets.pick_device(args.device)
        if not (args.build or args.train_only) and not nets.is_main():
            return None  # under torchrun, --add, --query and --eval run on rank 0 alone
        if args.build or args.train_only:  # ranks wait for the slowest at the end: hours
            device = nets.init_distributed(device, hours=24)
        if args.train_only:
            return cmd_train_only(args, device)
        if args.build:
            return indexed(cmd_build(args, device), args.index)
        if args.add:
            return indexed(cmd_add(args, device), args.index)
        if args.query:
            return found(cmd_query(args, device))
        if args.query_id:
            return found(cmd_query_id(args, device))
        if args.map:
            return cmd_map(args, device)
        return evaluated(cmd_eval(args, device))
    except UserError as e:
        raise SystemExit(f"retrieve.py: error: {e}") from None
    except OSError as e:  # a full disk (no SIGBUS: memory maps are reserved), a folder not ours
        raise SystemExit(f"retrieve.py: error: {files.os_error_line(e)}") from None
    finally:
        nets.close_distributed()


if __name__ == "__main__":
    main()
