"""Building data sets: the `data.py` commands (wikiart, nga, download, resize, hf-wikiart,
demo), NGA's open-data CSVs, the resized image cache and the hf-wikiart parquet route.

Holds no plumbing (files.py), no WikiArt list or split rule (wikiart.py), no HTTP code
(fetch.py), no painting (painter.py), and no model, device or drawing code (nets.py, pages.py).

Shell:
    python data.py demo                                   # synthetic offline data in demo/
    python data.py demo --figures --out demo-figures      # + stick figures, their poses.json
    python data.py wikiart --lists wikiart_csv --out subset --per-class 100 --min-per-class 50
    python data.py wikiart --lists wikiart_csv --out subset --images wikiart.zip   # what decodes
    python data.py wikiart --lists wikiart_csv --out subset --split artist   # unseen painters
    python data.py nga --objects objects.csv --published-images published_images.csv --out nga
    python data.py download --manifest nga/manifest.csv --root nga/images --size 512
    python data.py resize --manifest subset/manifest.csv --root wikiart.zip --out cache256
    python data.py hf-wikiart --out hf --shards 0-3       # Hugging Face parquet shards, resized
    python data.py folder --images paintings --out mine   # your own: paintings/<style>/x.jpg
    python data.py csv --csv labels.csv --path-col file --label-cols style,artist --out mine

Notebook:
    import data; data.main(["demo", "--out", "demo"])

`wikiart` splits the ArtGAN way by default (their val lists are test, a dev part of train
selects checkpoints); pyarrow is imported only by `hf-wikiart`.
Bad input ends with one line on stderr and exit status 1 (`UserError`), never a traceback.
"""

import argparse
import io
import json
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

import fetch
import files
import painter
import poses
import userdata
import wikiart
from files import UserError, one_line

SHARD_MAX_BYTES = 4 << 30  # hf-wikiart parquet shards are ~520 MB


def split_leaks(rows):
    """{path: set of splits} for the paths that stand in more than one split of a manifest:
    a model selected or evaluated on such an image has seen it in training."""
    splits = defaultdict(set)
    for r in rows:
        splits[r["path"]].add(r.get("split", ""))
    return {p: s for p, s in splits.items() if len(s) > 1}


def cmd_wikiart(args):
    tasks = wikiart.parse_tasks(args.tasks, args.balance_on)
    wikiart.check_fracs(args)
    source = files.image_source(args.images) if args.images else None
    labels, classes, in_val = wikiart.load_wikiart(args.lists, tasks)
    task = args.balance_on
    before = Counter(lab[task] for lab in labels.values() if lab.get(task))
    print(wikiart.count_table(f"{task}: {sum(before.values())} labelled images in the lists",
                              before, classes[task]))
    held = set().union(*in_val.values()) if args.split == "official" else frozenset()
    to_train = wikiart.train_counter(args)
    chosen, dropped, bad = wikiart.balanced_subset(labels, classes[task], task, args.per_class,
                                           args.min_per_class, args.seed, source, held, to_train)
    wikiart.report_unusable(args.out, bad)
    wikiart.report_small(chosen, dropped, args.min_per_class, held, to_train)
    if not chosen:
        raise UserError("nothing left after filtering (lower --min-per-class, or check --images)")
    groups = {p: wikiart.artist_of(p) for ps in chosen.values() for p in ps}
    split = wikiart.make_split(args, chosen, in_val, groups)
    wikiart.write_subset(args.out, tasks, task, labels, classes, split)
    return 0


# ----------------------------------------------------------------------------- NGA open data

def iiif_url(base, size):
    return f"{base.rstrip('/')}/full/!{size},{size}/0/default.jpg"


def nga_page_url(row):
    """The nga.gov page of a manifest row written by `nga` (its image url is on nga.gov), else
    None. Pages now live at /artworks/<objectid>-<title slug>, a slug the CSVs do not hold;
    this older form redirects there (NationalGalleryOfArt/opendata issue 19, 2025)."""
    oid, url = (row.get("objectid") or "").strip(), row.get("url") or ""
    if not oid.isdigit() or not re.match(r"https?://[^/]*\bnga\.gov/", url):
        return None
    return f"https://www.nga.gov/content/ngaweb/Collection/art-object-page.{oid}.html"


def primary_images(image_files, open_access, objects_say=False):
    """({objectid: image row}, rows with an openaccess column, rows left out for want of one):
    one image per object, primary view first, then lowest sequence. open_access keeps rows
    whose openaccess is 1; a row from a file without that column (older exports) passes only
    where the objects CSV says (objects_say), else nothing tells that it is open."""
    best, flagged, unknown = {}, 0, 0
    for path in image_files:
        for order, row in enumerate(files.read_csv(path, ("iiifurl", "depictstmsobjectid"),
                                             what="published_images CSV")):
            flagged += "openaccess" in row
            if open_access and row.get("openaccess", "1" if objects_say else None) != "1":
                unknown += "openaccess" not in row
                continue
            seq = row.get("sequence", "")
            key = (row.get("viewtype", "") != "primary",
                   int(seq) if seq.strip().isdigit() else 1 << 30, order)
            oid = row["depictstmsobjectid"].strip()
            if oid and row["iiifurl"].strip() and (oid not in best or key < best[oid][0]):
                best[oid] = (key, row)
    return {oid: row for oid, (_, row) in best.items()}, flagged, unknown


def read_constituents(args):
    """{objectid: constituent row} via objects_constituents, else by name (the sample's way)."""
    if not args.constituents:
        return {}, {}
    people = files.read_csv(args.constituents, ("constituentid",), what="constituents CSV")
    if args.objects_constituents:
        by_id = {r["constituentid"]: r for r in people}
        links = files.read_csv(args.objects_constituents, ("objectid", "constituentid"),
                         what="objects_constituents CSV")
        by_obj = {}
        for r in links:
            if r.get("role", "artist").lower() == "artist" and r["constituentid"] in by_id:
                by_obj.setdefault(r["objectid"], by_id[r["constituentid"]])
        return by_obj, {}
    by_name = {}
    for r in people:
        for col in ("preferreddisplayname", "forwarddisplayname"):
            if r.get(col):
                by_name.setdefault(r[col], r)
    return {}, by_name


def cmd_nga(args):
    objects = files.read_csv(args.objects, ("objectid", "title", "classification"),
                             what="objects CSV")
    objects_say = bool(objects) and "openaccess" in objects[0]
    images, flagged, unknown = primary_images(args.published_images, args.open_access,
                                              objects_say)
    if args.open_access and not objects_say and not flagged:
        raise UserError("--open-access: neither the objects CSV nor the published_images CSV "
                        "has an openaccess column (exports before 2026 have none), so nothing "
                        "tells which images are open")
    if unknown:
        print(f"--open-access: {unknown} image rows left out: their published_images CSV has "
              f"no openaccess column")
    by_obj, by_name = read_constituents(args)
    want = args.classification.lower()
    rows, n_class, no_image = [], 0, []
    for o in objects:
        if want != "all" and o["classification"].strip().lower() != want:
            continue
        if args.title_contains and args.title_contains.lower() not in o["title"].lower():
            continue
        if args.open_access and o.get("openaccess", "1") != "1":
            continue
        n_class += 1
        oid = o["objectid"].strip()
        img = images.get(oid)
        if img is None:
            no_image.append(oid)
            continue
        who = by_obj.get(oid) or by_name.get(o.get("attributioninverted", "")) \
            or by_name.get(o.get("attribution", "")) or {}
        rows.append([f"{oid}.jpg", oid, o["title"], o.get("attribution", ""),
                     o.get("displaydate", ""), iiif_url(img["iiifurl"], args.size),
                     o["classification"], who.get("nationality", "")])
        if args.limit and len(rows) >= args.limit:
            break
    print(f"{len(objects)} objects; {n_class} match classification={args.classification!r}"
          f"{' and title' if args.title_contains else ''}; {len(no_image)} of them have no "
          f"published image{' (e.g. ' + no_image[0] + ')' if no_image else ''}")
    if not rows:
        raise UserError("nothing left after filtering")
    header = ["path", "objectid", "title", "attribution", "displaydate", "url",
              "classification", "nationality"]
    files.write_csv(os.path.join(args.out, "manifest.csv"), header, rows)
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'manifest.csv')}")
    return 0


# ----------------------------------------------------------------------------- download
def resize_iiif(url, size):
    """Ask an IIIF image server for `size` px (best fit) instead of what the URL says."""
    return re.sub(r"/full/[^/]+/0/default\.jpg$", f"/full/!{size},{size}/0/default.jpg", url)


def cmd_download(args):
    rows = files.read_manifest(args.manifest, ("path", "url"))
    jobs, n_ok, bad = [], 0, []
    for r in rows:
        if not r["url"].strip():
            continue
        if fetch.url_problem(r["url"].strip()):
            bad.append((r["path"], r["url"], fetch.url_problem(r["url"].strip())))
            continue
        dest = files.safe_join(args.root, r["path"])
        if os.path.isfile(dest) and not files.image_problem(dest):
            n_ok += 1
            continue
        url = resize_iiif(r["url"].strip(), args.size) if args.size else r["url"].strip()
        jobs.append((r["path"], url, dest))
    print(f"{len(rows)} rows: {n_ok} already here, {len(jobs)} to fetch "
          f"with {args.workers} workers")
    failures, stop = fetch.run_downloads(jobs, args)
    done = len(jobs) - len(failures) - stop  # refused URLs (bad) were never jobs
    failures = bad + failures
    fail_csv = args.failures or os.path.join(args.root, "download_failures.csv")
    if failures:
        files.write_csv(fail_csv, ["path", "url", "error"], failures)
    elif os.path.exists(fail_csv):
        os.remove(fail_csv)
    print(f"downloaded {done}, failed {len(failures)}"
          f"{', interrupted: ' + str(stop) + ' left for the next run' if stop else ''}"
          f"{' (listed in ' + fail_csv + ')' if failures else ''}")
    if stop:
        return 130
    return 1 if failures else 0


# ----------------------------------------------------------------------------- resize cache

def resize_one(src, dst, size):
    """Shorter side to `size` px (never upscaled), saved by extension (JPEG q90 default).
    src: a path or a binary file (a zip member, a parquet row's bytes)."""
    im = files.load_image(src, size)
    s = size / min(im.size)
    if s < 1:
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                       Image.LANCZOS, reducing_gap=3.0)
    fmt = {".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(os.path.splitext(dst)[1].lower(),
                                                            "JPEG")
    with files.replaced(dst) as tmp, files.writing(dst):  # a full disk: no temp left
        im.save(tmp, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def cmd_resize(args):
    rows = files.read_manifest(args.manifest)
    source = files.image_source(args.root)  # a folder, or a zip read in place
    todo, fresh = [], 0
    for r in rows:
        rel, dst = r["path"], files.safe_join(args.out, r["path"])
        source.check_rel(rel)
        if os.path.isfile(dst) and source.exists(rel) and \
                os.path.getmtime(dst) >= source.mtime(rel):
            fresh += 1
        else:
            todo.append((rel, dst))
    print(f"{len(rows)} images: {fresh} already cached, {len(todo)} to resize "
          f"to {args.size} px with {args.workers} threads")
    bad, prog = [], files.Progress(len(todo), "resize")

    def work(job):
        try:
            resize_one(source.loadable(job[0]), job[1], args.size)
            return None
        except files.DECODE_ERRORS as e:
            if files.disk_full(e):  # not this image's fault: main() says it in one line
                raise
            return (job[0], f"{type(e).__name__}: {e}")

    # PIL releases the GIL while decoding and resampling, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for err in pool.map(work, todo):
            if err:
                bad.append(err)
            prog.update(1)
    if bad:
        files.write_csv(os.path.join(args.out, "unreadable.csv"), ["path", "error"], bad)
        print(f"skipped {len(bad)} unreadable images (listed in "
              f"{os.path.join(args.out, 'unreadable.csv')}), e.g. {bad[0][0]}: {bad[0][1]}")
    print(f"resized {len(todo) - len(bad)}, cache at {args.out} (use it as --root)")
    return 0


# ----------------------------------------------------------------------------- hf-wikiart
# The same 81,444 WikiArt images as parquet shards (huggan/wikiart on Hugging Face): columns
# image = {bytes, path}, integer style/artist/genre, class names in the schema's `huggingface`
# metadata. Each shard is downloaded, decoded once into the resized cache, then deleted;
# OUT/shards/<shard>.csv marks it converted (a re-run skips it).

HF_URL = "https://huggingface.co/datasets/huggan/wikiart/resolve/main/data"
HF_SHARDS = 72
UNKNOWN = re.compile(r"^unknown[ _-]", re.IGNORECASE)  # "Unknown Artist", "Unknown Genre"


def import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("hf-wikiart reads parquet files: pip install pyarrow") from None
    return pq


def parse_shards(text):
    """'all', '3', '0-3' or '0,5,7-9' -> sorted shard numbers in 0..HF_SHARDS-1."""
    if text.strip() == "all":
        return list(range(HF_SHARDS))
    out = set()
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise UserError(f"--shards {text!r}: expected all, N, N-M or a comma list of those")
        out.update(range(int(a), int(b or a) + 1))
    if not out or max(out) >= HF_SHARDS:
        raise UserError(f"--shards {text!r}: shards are numbered 0..{HF_SHARDS - 1}")
    return sorted(out)


def shard_name(i):
    return f"train-{i:05d}-of-{HF_SHARDS:05d}"


def is_parquet(path):
    """A whole parquet file starts and ends with the magic bytes PAR1 (the footer is last)."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - 4))
        return head == b"PAR1" and f.read(4) == b"PAR1", "a whole parquet file"


def class_names(schema, task):
    """ClassLabel names of `task` from the parquet's `huggingface` metadata, read defensively
    ({"info": {"features": {task: {"_type": "ClassLabel", "names": [...]}}}}); None if absent."""
    try:
        meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        names = meta["info"]["features"][task]["names"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(names, dict):  # {"0": name, ...}, as dataset card YAML spells it
        names = [names.get(str(i)) for i in range(len(names))]
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if ok else None


def open_shard(pq, path, tasks):
    """(ParquetFile, {task: names} for every label column there); one-line errors for an
    unreadable file or a missing image or `tasks` column."""
    try:  # no pre-buffering, 1 MB reads: pages stream in, whatever the row-group size (measured:
        # 1 GB peak RSS for a 610 MB shard with pyarrow's defaults, 0.3 GB like this)
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except Exception as e:  # pyarrow's ArrowInvalid and friends: not a parquet we can read
        raise UserError(f"cannot read parquet {path}: {one_line(e)}") from None
    cols = pf.schema_arrow.names
    missing = [c for c in ("image", *tasks) if c not in cols]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(cols)}); "
                        "expected the huggan/wikiart layout")
    names = {}
    for t in (t for t in wikiart.TASKS if t in cols):
        names[t] = class_names(pf.schema_arrow, t)
        if names[t] is None:
            print(f"warning: {path}: no ClassLabel names for {t} in the parquet metadata; "
                  f"classes are named {t}_<index>")
    return pf, names


def row_label(value, names, task):
    """Class name for an integer label; '' for none, out of range, or an 'Unknown ...' class."""
    if not isinstance(value, int) or value < 0 or (names and value >= len(names)):
        return ""
    name = names[value] if names else f"{task}_{value}"
    return "" if UNKNOWN.match(name) else name


def convert_row(rec, rel, out, size):
    """Decode one row's image bytes into OUT/images/rel at `size` px; None, or why not."""
    img = rec.get("image")
    raw = img.get("bytes") if isinstance(img, dict) else img
    if not isinstance(raw, bytes | bytearray) or not raw:
        return "no image bytes"
    dst = files.safe_join(out, rel)
    if os.path.isfile(dst):  # converted before an interruption
        return None
    try:
        resize_one(io.BytesIO(raw), dst, size)
    except files.DECODE_ERRORS as e:
        if files.disk_full(e):  # not this image's fault: main() says it in one line
            raise
        return "corrupt"
    return None


def shard_rows(recs, names, shard, first):
    """(relative cache path, source file name, {task: label}) per row: <Style>/<shard>-<row>.jpg,
    stable across runs (rows are numbered from `first` within the shard)."""
    out = []
    for k, rec in enumerate(recs):
        lab = {t: row_label(rec.get(t), n, t) for t, n in names.items()}
        folder = (lab.get("style") or "unlabelled").replace("/", "_").replace("..", "_")
        img = rec.get("image")
        src = img.get("path") if isinstance(img, dict) else None
        out.append((f"{folder}/{shard:05d}-{first + k:05d}.jpg", os.path.basename(src or ""),
                    lab))
    return out


def convert_shard(pq, i, args, tasks):
    """Stream the shard's row groups (memory stays flat), decode rows on args.workers threads,
    then write OUT/shards/<shard>.csv: the mark that the shard is done. Every label column
    is kept there, so another --tasks needs no new conversion."""
    path = os.path.join(args.out, "parquet", shard_name(i) + ".parquet")
    pf, names = open_shard(pq, path, tasks)
    images, rows, bad = os.path.join(args.out, "images"), [], []
    prog = files.Progress(pf.metadata.num_rows, f"convert {shard_name(i)}", every=10.0)
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for batch in pf.iter_batches(batch_size=16, columns=["image", *names]):
            recs = batch.to_pylist()
            meta = shard_rows(recs, names, i, prog.done)
            errs = pool.map(convert_row, recs, [m[0] for m in meta], [images] * len(recs),
                            [args.size] * len(recs))
            for (rel, src, lab), err in zip(meta, errs, strict=True):
                row = [rel, src] + [lab.get(t, "") for t in wikiart.TASKS]
                (bad.append([rel, err]) if err else rows.append(row))
            prog.update(len(recs))
    shards = os.path.join(args.out, "shards")
    files.write_csv(os.path.join(shards, shard_name(i) + ".unusable.csv"), ["path", "reason"], bad)
    files.atomic_write(os.path.join(shards, shard_name(i) + ".names.json"),
                       json.dumps(names) + "\n")
    files.write_csv(os.path.join(shards, shard_name(i) + ".csv"),
                    ["path", "source", *wikiart.TASKS], rows)
    if not args.keep_parquet:
        os.remove(path)
    print(f"{shard_name(i)}: {len(rows)} images converted, {len(bad)} unusable")


def fetch_shards(shards, args):
    """Download the shards not on disk yet (the download command's retries and partial-file
    rules); 130 when interrupted, a one-line error when one cannot be had."""
    folder = os.path.join(args.out, "parquet")
    base = args.base_url.rstrip("/")
    jobs = [(shard_name(i), f"{base}/{shard_name(i)}.parquet",
             os.path.join(folder, shard_name(i) + ".parquet")) for i in shards]
    jobs = [j for j in jobs if not (os.path.isfile(j[2]) and is_parquet(j[2])[0])]
    if not jobs:
        return 0
    print(f"downloading {len(jobs)} shards (~520 MB each) from {base}")
    dl = argparse.Namespace(workers=args.downloads, retries=args.retries, backoff=args.backoff,
                            timeout=args.timeout, max_bytes=SHARD_MAX_BYTES)
    failures, stop = fetch.run_downloads(jobs, dl, check=is_parquet, unit="shards")
    if stop:
        return 130
    if failures:
        files.write_csv(os.path.join(args.out, "download_failures.csv"), ["shard", "url", "error"],
                  failures)
        name, url, err = failures[0]
        raise UserError(f"{name}: {err} from {url} ({len(failures)} shards failed, listed in "
                        f"{os.path.join(args.out, 'download_failures.csv')})")
    return 0


def read_converted(shards, out, tasks):
    """labels {path: {task: name}}, classes {task: names}, unusable rows and the painter of
    each path (its artist label, else the slug of its source file name) of converted shards."""
    labels, classes, bad, painter_of = {}, {}, [], {}
    for i in shards:
        base = os.path.join(out, "shards", shard_name(i))
        for r in files.read_csv(base + ".csv", ("path", "source", *wikiart.TASKS),
                                what="converted shard list"):
            labels[r["path"]] = {t: r[t] for t in tasks if r[t]}
            painter_of[r["path"]] = r["artist"] or wikiart.artist_of(r["source"])
        bad += [(r["path"], r["reason"]) for r in files.read_csv(base + ".unusable.csv")]
        with open(base + ".names.json", encoding="utf-8") as f:
            for t, names in json.load(f).items():
                classes.setdefault(t, names)
    seen = {t: {lab[t] for lab in labels.values() if t in lab} for t in tasks}
    for t in tasks:  # metadata order; without metadata, the sorted names seen
        known = classes.get(t) or sorted(seen[t])
        classes[t] = [c for c in known if c and not UNKNOWN.match(c)]
    return labels, classes, bad, painter_of


def cmd_hf_wikiart(args):
    tasks = wikiart.parse_tasks(args.tasks, args.balance_on)
    wikiart.check_fracs(args)
    pq = import_parquet()
    shards = parse_shards(args.shards)
    done = os.path.join(args.out, "shards", "{}.csv")  # written last: the shard is converted
    todo = [i for i in shards if not os.path.isfile(done.format(shard_name(i)))]
    print(f"{len(shards)} shards: {len(shards) - len(todo)} converted already, {len(todo)} to "
          f"download and convert to {args.size} px in {os.path.join(args.out, 'images')}")
    try:
        for k in range(0, len(todo), max(1, args.downloads)):  # disk: --downloads shards at most
            chunk = todo[k:k + max(1, args.downloads)]
            if fetch_shards(chunk, args):
                return 130
            for i in chunk:
                convert_shard(pq, i, args, tasks)
    except KeyboardInterrupt:
        print("\ninterrupted: converted shards and images are kept; run the same command to "
              "continue")
        return 130
    return write_hf_subset(args, shards, tasks)


def write_hf_subset(args, shards, tasks):
    """The manifest over the converted shards: balanced and split like `wikiart`."""
    labels, classes, bad, painter_of = read_converted(shards, args.out, tasks)
    wikiart.report_unusable(args.out, bad)
    task = args.balance_on
    to_train = wikiart.train_counter(args)
    chosen, dropped, _ = wikiart.balanced_subset(labels, classes[task], task, args.per_class,
                                         args.min_per_class, args.seed, to_train=to_train)
    wikiart.report_small(chosen, dropped, args.min_per_class, to_train=to_train)
    if not chosen:
        raise UserError("nothing left after filtering (lower --min-per-class)")
    split = wikiart.make_split(args, chosen, {}, painter_of)
    wikiart.write_subset(args.out, tasks, task, labels, classes, split)
    return 0


def cmd_demo(args):
    args.out = args.out or ("demo-tail" if args.tail else "demo")
    rng = np.random.default_rng(args.seed)
    hands = painter.demo_artists(rng)
    items, prog, reused = [], files.Progress(args.n, "demo", every=5.0), 0
    tail = painter.demo_tail_styles(args.n, args.tail, rng) if args.tail else None
    # figures draw from a stream of their own: the paintings' stream, and every painting
    # without figures, stay as without --figures
    fig_rng, figures = np.random.default_rng([args.seed, 25]) if args.figures else None, {}
    for i in range(args.n):
        a, st = painter.demo_pick(i, hands, tail, rng)
        hand = hands[a]
        g = int(rng.integers(len(painter.DEMO_GENRES)))
        style, genre = painter.DEMO_STYLES[st], painter.DEMO_GENRES[g]
        path = f"{style}/{hand['slug']}_{genre.replace('_', '-')}-{i}.jpg"
        # painted every time, so that the random stream (and all that follows) never depends
        # on which files a previous run left: the same command gives the same data
        im = painter.demo_painting(style, genre, hand, rng)
        if fig_rng is not None:
            figures[path] = painter.demo_figures(im, fig_rng)
        reused += painter.write_if_changed(os.path.join(args.out, "images", path), im)
        split = lambda: "val" if rng.random() < 0.25 else "train"  # noqa: E731
        s = split()
        items.append({"path": path, "style": st, "shown": g,
                      "genre": g if rng.random() < 0.9 else None,
                      "artist": a if rng.random() < 0.8 else None, "style_split": s,
                      "genre_split": s if rng.random() < 0.95 else split(), "artist_split": s})
        prog.update(1)
    noisy = rng.choice(len(items), size=max(1, args.n // 40), replace=False)
    noise = {items[j]["path"]: (items[j]["style"] + 1) % len(painter.DEMO_STYLES) for j in noisy}
    painter.write_demo_lists(os.path.join(args.out, "lists"), items, noise)
    files.write_csv(os.path.join(args.out, "label_noise.csv"),
                    ["path", "listed_style", "true_style"],
              [(p, painter.DEMO_STYLES[y], painter.DEMO_STYLES[items[j]["style"]]) for (p, y), j in
               zip(noise.items(), noisy, strict=True)])
    sub = ["wikiart", "--lists", os.path.join(args.out, "lists"), "--out", args.out,
           "--per-class", "0", "--min-per-class", "1", "--split", "random", "--val-frac", "0.25",
           "--seed", str(args.seed)]
    cmd_wikiart(build_parser().parse_args(sub))
    painter.write_demo_gallery(args.out, items)
    if fig_rng is not None:  # COCO keypoints: retrieve.py --build --aspects ...,pose --poses
        poses.write_poses(os.path.join(args.out, "poses.json"), figures)
    if reused:
        print(f"{reused} of the {args.n} images were already in {args.out} with the same bytes "
              "(kept as they were)")
    listed = {os.path.normpath(it["path"]) for it in items}
    others = [p for p in painter.scan_files(os.path.join(args.out, "images")) if p not in listed]
    if others:
        print(f"note: {len(others)} other files in {os.path.join(args.out, 'images')} are not "
              f"part of this demo (another --seed or --n?), e.g. {others[0]}; the manifests "
              "leave them out")
    print(f"SYNTHETIC demo data (not real paintings): {args.n} images in "
          f"{os.path.join(args.out, 'images')}; classification manifest "
          f"{os.path.join(args.out, 'manifest.csv')}; retrieval gallery "
          f"{os.path.join(args.out, 'gallery.csv')}")
    return 0


# ----------------------------------------------------------------------------- command line

def add_balance_args(p):
    p.add_argument("--tasks", default="style,artist,genre", help="label columns to carry")
    p.add_argument("--balance-on", default="style", help="task whose classes are balanced")
    p.add_argument("--per-class", type=int, default=500,
                   help="cap per class (0: no cap); --split official caps train only")
    p.add_argument("--min-per-class", type=int, default=wikiart.SMALL_CLASS,
                   help="drop classes with fewer usable (train) images, named; below "
                   f"{wikiart.SMALL_CLASS} (too few to learn) the small classes kept are named in "
                   "a warning")


def add_split_args(p, rules):
    p.add_argument("--split", default=rules[0], choices=rules,
                   help="official: every image in a selected task's ArtGAN val list is test, "
                   "a stratified --dev-frac of the rest dev (for selecting the checkpoint); "
                   "random: a stratified --val-frac per class is val; artist: whole artists to "
                   "test (--test-frac of the images) and dev (--dev-frac), none shared with train")
    p.add_argument("--val-frac", type=float, default=0.2, help="--split random: val share")
    p.add_argument("--dev-frac", type=float, default=0.1,
                   help="--split official/artist: dev share (of train / of all images)")
    p.add_argument("--test-frac", type=float, default=0.2, help="--split artist: test share")
    p.add_argument("--seed", type=int, default=0, help="the subset and the split")


def add_hf_parser(sub):
    h = sub.add_parser("hf-wikiart", help="WikiArt from the huggan/wikiart parquet shards, "
                       "converted once into a resized cache", formatter_class=files.Help)
    h.add_argument("--out", required=True, help="OUT/images (the cache), OUT/manifest.csv, "
                   "OUT/classes.json, OUT/shards/ (what is converted), OUT/parquet/ (downloads)")
    h.add_argument("--shards", default="0-3", help=f"all, N, N-M or a comma list, of 0.."
                   f"{HF_SHARDS - 1} (~1,130 images and ~520 MB each)")
    h.add_argument("--base-url", default=HF_URL, help="shard i is BASE-URL/train-0000i-of-00072"
                   ".parquet: a mirror or a local server can stand in")
    h.add_argument("--size", type=int, default=256, help="shorter side in the cache, px")
    add_balance_args(h)
    add_split_args(h, ("random", "artist"))
    h.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads")
    h.add_argument("--downloads", type=int, default=2,
                   help="shards downloaded at once (and on disk at once, before conversion)")
    h.add_argument("--keep-parquet", action="store_true", help="keep shards after conversion")
    h.add_argument("--retries", type=int, default=5, help="tries after the first, per shard")
    h.add_argument("--backoff", type=float, default=1.0, help="first retry wait, s (x2 each)")
    h.add_argument("--timeout", type=float, default=60.0, help="per read, s")
    h.set_defaults(func=cmd_hf_wikiart)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=files.Help)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("wikiart", help="class-balanced subset from the ArtGAN WikiArt lists",
                       formatter_class=files.Help)
    w.add_argument("--lists", required=True, help="folder of the ArtGAN list files")
    w.add_argument("--out", required=True, help="writes OUT/manifest.csv and OUT/classes.json")
    add_balance_args(w)
    add_split_args(w, ("official", "random", "artist"))
    w.add_argument("--images", help="image folder or .zip (read in place): keep only images "
                   "that are there and decode; the others are listed in OUT/unusable.csv")
    w.set_defaults(func=cmd_wikiart)

    n = sub.add_parser("nga", help="paintings with images from the NGA open-data CSVs",
                       formatter_class=files.Help)
    n.add_argument("--objects", required=True, help="objects.csv")
    n.add_argument("--published-images", required=True, nargs="+",
                   help="published_images.csv (several files are merged)")
    n.add_argument("--constituents", help="constituents.csv: adds a nationality column")
    n.add_argument("--objects-constituents", help="objects_constituents.csv (else by name)")
    n.add_argument("--out", required=True, help="writes OUT/manifest.csv")
    n.add_argument("--classification", default="Painting", help="'all' keeps every object")
    n.add_argument("--title-contains", help="case-insensitive, e.g. Portrait")
    n.add_argument("--open-access", action="store_true", help="keep openaccess=1 rows only")
    n.add_argument("--limit", type=int, default=0, help="at most N rows (0: all)")
    n.add_argument("--size", type=int, default=512, help="IIIF image size in the url, px")
    n.set_defaults(func=cmd_nga)

    d = sub.add_parser("download", help="fetch a manifest's urls, resumably",
                       formatter_class=files.Help)
    d.add_argument("--manifest", required=True, help="CSV with path and url columns")
    d.add_argument("--root", required=True, help="images go to ROOT/<path>")
    d.add_argument("--size", type=int, default=512, help="IIIF size to ask for (0: url as is)")
    d.add_argument("--workers", type=int, default=4,
                   help="download threads: requests in flight at most")
    d.add_argument("--retries", type=int, default=5, help="tries after the first, per file")
    d.add_argument("--backoff", type=float, default=1.0, help="first retry wait, s (x2 each)")
    d.add_argument("--timeout", type=float, default=30.0, help="per request, s")
    d.add_argument("--max-bytes", type=int, default=files.MAX_BYTES,
                   help="largest response accepted per file, bytes")
    d.add_argument("--failures", help="CSV of failures (default ROOT/download_failures.csv)")
    d.set_defaults(func=cmd_download)

    r = sub.add_parser("resize", help="pre-resize a manifest's images into a cache folder",
                       formatter_class=files.Help)
    r.add_argument("--manifest", required=True, help="CSV with a path column")
    r.add_argument("--root", required=True, help="original images: a folder, or a .zip read "
                   "in place (bad members are listed in OUT/unreadable.csv)")
    r.add_argument("--out", required=True, help="cache folder, same relative paths")
    r.add_argument("--size", type=int, default=256, help="shorter side, px")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decoding threads")
    r.set_defaults(func=cmd_resize)

    add_hf_parser(sub)
    userdata.add_parsers(sub)  # folder, csv: your own paintings

    m = sub.add_parser("demo", help="small SYNTHETIC dataset in the real formats",
                       formatter_class=files.Help)
    m.add_argument("--out", help="writes images/, lists/ and the manifests (default: demo, "
                   "demo-tail with --tail)")
    m.add_argument("--n", type=int, default=360, help="number of images")
    m.add_argument("--tail", type=float, metavar="RATIO",
                   help="a long tail: style class sizes fall geometrically, largest : smallest "
                   "= RATIO (100: 218, 87, 34, 14, 5, 2 of 360), same painter and label noise")
    m.add_argument("--seed", type=int, default=0, help="the same seed gives the same data")
    m.add_argument("--figures", action="store_true", help="paint 0-2 stick figures on each "
                   "painting (poses from a few families, mirrored, scaled, limbs hidden) and "
                   "write their keypoints to poses.json (COCO): the pose and face search offline")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    files.tolerant_stdout()
    try:
        status = args.func(args)
    except UserError as e:
        raise SystemExit(f"data.py: error: {e}") from None
    except OSError as e:  # a full disk, a folder not ours
        raise SystemExit(f"data.py: error: {files.os_error_line(e)}") from None
    if status:  # failures were listed above; the shell (or notebook) sees the status
        raise SystemExit(status)
    return status


if __name__ == "__main__":
    main()
