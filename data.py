"""Data for ArtExtract: WikiArt and NGA subsets, image download, resized cache, demo data.

Holds lists, manifests, downloads, image reading and the file plumbing every script uses.
No model, device, precision or drawing code here (nets.py, pages.py).

Shell:
    python data.py demo                                   # synthetic offline data in demo/
    python data.py wikiart --lists wikiart_csv --out subset --per-class 100 --min-per-class 50
    python data.py wikiart --lists wikiart_csv --out subset --images wikiart/   # keep what decodes
    python data.py nga --objects objects.csv --published-images published_images.csv --out nga
    python data.py download --manifest nga/manifest.csv --root nga/images --size 512
    python data.py resize --manifest subset/manifest.csv --root wikiart --out cache --size 256

Notebook:
    import data; data.main(["demo", "--out", "demo"])

The one image-loading path that crnn.py and retrieve.py share is here (`load_image`,
`ImageDataset`, `collate_skip`), with `atomic_write`, `write_csv` and `Progress`.
Bad input ends with one line on stderr and exit status 1 (`UserError`), never a traceback.
"""

import argparse
import csv
import email.utils
import functools
import io
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

TASKS = ("style", "artist", "genre")
USER_AGENT = "ArtExtract/0.1 (open-source research toolkit; python-urllib)"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
Image.MAX_IMAGE_PIXELS = 400_000_000  # NGA masters reach ~950 MP; we never ask IIIF for those


class UserError(Exception):
    """Bad input: main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------- shared helpers

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # PIL's ways
# of saying "cannot decode this file": every loader catches exactly these


def one_line(e):
    """The first line of an exception's text, at most 200 characters (for one-line errors)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except None and False ones: their help says what happens then."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Progress:
    """`label: done/total (pct) rate unit/s ETA` on one line, at most every `every` seconds."""

    def __init__(self, total, label, unit="img", every=2.0, out=None):
        self.total, self.label, self.unit, self.every, self.out = total, label, unit, every, out
        self.done, self.t0, self.last = 0, time.time(), 0.0

    def update(self, n=1, extra=""):
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(extra), file=self.out or sys.stdout, flush=True)  # redirectable

    def line(self, extra=""):
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        eta_s = "?" if math.isinf(eta) else fmt_seconds(eta)
        return (f"{self.label}: {self.done}/{self.total} ({pct:.0f}%) {rate:.1f} {self.unit}/s "
                f"ETA {eta_s}{' ' + extra if extra else ''}")


def fmt_seconds(s):
    s = int(round(s))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


@functools.lru_cache(maxsize=1)
def file_mode():
    """The mode a plain open() gives a new file here: 0o666 minus the umask. Linux shows the
    umask in /proc; elsewhere os.umask can only be read by setting it (once, then cached)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, data, mode="w"):
    """Write text or bytes to a temp file beside `path`, then rename: never a half file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        kw = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape",
                                     "newline": ""}
        with os.fdopen(fd, mode, **kw) as f:
            f.write(data)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_jsonl(path, record):
    """One JSON object as one line of a log file (log.jsonl: a run's history, appended)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def write_csv(path, header, rows):
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def read_csv(path, required=(), what="CSV"):
    """Rows of a headed CSV as dicts, columns by name; quoted fields may span lines."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(f"{path}: no column {', '.join(missing)} (header: {','.join(header)})")
        return list(reader)


def read_manifest(path, required=("path",)):
    rows = read_csv(path, required, what="manifest")
    if not rows:
        raise UserError(f"manifest is empty: {path}")
    return rows


def safe_join(root, rel):
    """root/rel, refusing absolute paths and `..` that would leave root."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")):
        raise UserError(f"path must be relative to the image root: {rel!r}")
    full = os.path.normpath(os.path.join(root, rel))
    base = os.path.normpath(root)
    if os.path.commonpath([os.path.abspath(full), os.path.abspath(base)]) != os.path.abspath(base):
        raise UserError(f"path escapes the image root: {rel!r}")
    return full


# ----------------------------------------------------------------------------- image loading

def draft_size(size, short):
    """(w, h) to ask JPEG draft mode for so that the shorter side stays >= `short`."""
    w, h = size
    s = short / min(w, h)
    return max(1, math.ceil(w * s)), max(1, math.ceil(h * s))


def to_rgb(im):
    """Any PIL mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        scale = 257.0 if a.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
        im = Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im) * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path, size=None):
    """Decode `path` to an RGB PIL image, upright per EXIF.

    With `size` (px, shorter side), JPEGs decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling, PIL draft mode) while staying >= size: a 3000 px WikiArt original decodes several
    times faster. Raises OSError/ValueError for unreadable files (callers decide to skip).
    """
    with Image.open(path) as im:
        if size and im.format == "JPEG":
            im.draft("RGB", draft_size(im.size, size))
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)


class ImageDataset:
    """Map-style dataset over relative paths under `root`: item i is (transform(img), i).

    An unreadable image yields None, so a DataLoader with `collate_skip` drops it; callers see
    which indices came back and count or name the missing ones (in the main process, so the
    error is one clean line even with worker processes).
    """

    def __init__(self, paths, root, transform=None, size=None):
        self.paths, self.root, self.transform, self.size = list(paths), root, transform, size
        self.files = [safe_join(root, p) for p in self.paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            im = load_image(self.files[i], self.size)
        except DECODE_ERRORS:
            return None
        return (self.transform(im) if self.transform else im), i


def collate_skip(batch):
    """default_collate without the Nones; (x, idx) or None when the whole batch failed."""
    from torch.utils.data import default_collate
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def check_image(path):
    """True when the file decodes (at reduced scale: a cheap but complete read)."""
    try:
        load_image(path, 32)
        return True
    except DECODE_ERRORS:
        return False


# ----------------------------------------------------------------------------- wikiart lists

def find_list(lists, task, kind):
    for name in (f"{task}_{kind}.csv", f"{task}_{kind}", f"{task}_{kind}.txt"):
        p = os.path.join(lists, name)
        if os.path.isfile(p):
            return p
    raise UserError(f"no {task} {kind} list in {lists} (looked for {task}_{kind}[.csv|.txt])")


def read_lines(path):
    """Lines without their LF/CRLF, bytes kept as they are (undecodable ones escaped)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


def read_classes(path):
    """`<idx> <Name>` per line -> list of names by index."""
    names = {}
    for ln in read_lines(path):
        if ln.strip():
            idx, _, name = ln.strip().partition(" ")
            if not idx.isdigit() or not name:
                raise UserError(f"{path}: expected '<idx> <Name>', got {ln!r}")
            names[int(idx)] = name.strip()
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{path}: class indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def read_split_list(path, n_classes):
    """(path, label) pairs from `path,label` (CRLF) or `path,,label` (artist) lists.

    The path is everything before the last comma, minus the artist list's empty middle field,
    kept byte for byte (no strip: names hold soft hyphens and no-break spaces).
    """
    pairs, bad = [], 0
    for i, ln in enumerate(read_lines(path)):
        if not ln:
            continue
        left, _, label = ln.rpartition(",")
        label = label.strip()
        if not label.isdigit():
            if i == 0:  # the artist lists' "(Path to image),, (Groundtruth class)" header
                continue
            bad += 1
            continue
        p = left[:-1] if left.endswith(",") else left
        if int(label) >= n_classes or not p:
            bad += 1
            continue
        pairs.append((p, int(label)))
    if bad:
        print(f"warning: {path}: {bad} malformed lines skipped")
    return pairs


def load_wikiart(lists, tasks):
    """{path: {task: class name}} over all tasks' train+val lists, and the class lists.

    Rule for a path listed twice in one task with different labels: it gets no label for that
    task (we cannot tell which is right); the count is reported.
    """
    if not os.path.isdir(lists):
        raise UserError(f"list folder not found: {lists}")
    labels, classes = defaultdict(dict), {}
    for task in tasks:
        classes[task] = read_classes(find_list(lists, task, "class"))
        seen, conflicts = {}, set()
        for kind in ("train", "val"):
            for p, y in read_split_list(find_list(lists, task, kind), len(classes[task])):
                if p in seen and seen[p] != y:
                    conflicts.add(p)
                seen[p] = y
        for p, y in seen.items():
            if p not in conflicts:
                labels[p][task] = classes[task][y]
        if conflicts:
            ex = sorted(conflicts)[0]
            print(f"{task}: {len(conflicts)} paths listed with conflicting labels, left "
                  f"unlabeled for {task} (e.g. {ex})")
    return labels, classes


def count_table(title, counts, names):
    lines = [title]
    for n in names:
        if counts.get(n):
            lines.append(f"  {n:<32s} {counts[n]:>6d}")
    return "\n".join(lines)


def balanced_subset(labels, names, task, per_class, min_per_class, seed, images=None):
    """Per class of `task` (sorted, then seeded shuffle): up to per_class usable paths.

    With `images`, a path is usable when root/path exists and decodes; checking stops once a
    class has enough, so a 100-per-class subset of 81k images reads a few thousand files.
    """
    by_class = defaultdict(list)
    for p, lab in labels.items():
        if lab.get(task):
            by_class[lab[task]].append(p)
    rng = random.Random(seed)
    chosen, dropped, missing, corrupt = {}, {}, [], []
    for c in names:
        paths = sorted(by_class.get(c, []))
        rng.shuffle(paths)
        keep = []
        for p in paths:
            if per_class and len(keep) >= per_class:
                break
            if images is not None:
                full = os.path.join(images, p)
                if not os.path.isfile(full):
                    missing.append(p)
                    continue
                if not check_image(full):
                    corrupt.append(p)
                    continue
            keep.append(p)
        if len(keep) < max(min_per_class, 1):
            dropped[c] = len(keep)
        else:
            chosen[c] = keep
    return chosen, dropped, missing, corrupt


def stratified_split(chosen, val_frac, seed):
    """{path: 'train'|'val'}: per class, round(val_frac * n) to val (>= 1 when n >= 2)."""
    rng = random.Random(seed + 1)
    split = {}
    for c in sorted(chosen):
        paths = sorted(chosen[c])
        rng.shuffle(paths)
        n_val = round(val_frac * len(paths))
        if val_frac > 0 and len(paths) >= 2:
            n_val = min(max(n_val, 1), len(paths) - 1)
        for i, p in enumerate(paths):
            split[p] = "val" if i < n_val else "train"
    return split


def cmd_wikiart(args):
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks + [args.balance_on] if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    if args.balance_on not in tasks:
        tasks.insert(0, args.balance_on)
    if not 0 <= args.val_frac < 1:
        raise UserError("--val-frac must be in [0, 1)")
    if args.images and not os.path.isdir(args.images):
        raise UserError(f"image folder not found: {args.images}")
    labels, classes = load_wikiart(args.lists, tasks)
    task = args.balance_on
    before = Counter(lab[task] for lab in labels.values() if lab.get(task))
    print(count_table(f"{task}: {sum(before.values())} labelled images in the lists", before,
                      classes[task]))
    chosen, dropped, missing, corrupt = balanced_subset(
        labels, classes[task], task, args.per_class, args.min_per_class, args.seed, args.images)
    report_unusable(args.out, missing, corrupt)
    for c, n in dropped.items():
        print(f"dropped class {c}: {n} usable images < --min-per-class {args.min_per_class}")
    if not chosen:
        raise UserError("nothing left after filtering (lower --min-per-class, or check --images)")
    split = stratified_split(chosen, args.val_frac, args.seed)
    write_wikiart_subset(args.out, tasks, labels, classes, chosen, split)
    return 0


def report_unusable(out, missing, corrupt):
    if missing or corrupt:
        os.makedirs(out, exist_ok=True)
        rows = [(p, "missing") for p in missing] + [(p, "corrupt") for p in corrupt]
        write_csv(os.path.join(out, "unusable.csv"), ["path", "reason"], rows)
        print(f"skipped {len(missing)} missing and {len(corrupt)} corrupt images "
              f"(listed in {os.path.join(out, 'unusable.csv')})")


def write_wikiart_subset(out, tasks, labels, classes, chosen, split):
    task = next(iter(tasks))
    paths = sorted(split)
    rows = [[p] + [labels[p].get(t, "") for t in tasks] + [split[p]] for p in paths]
    write_csv(os.path.join(out, "manifest.csv"), ["path", *tasks, "split"], rows)
    present = {t: {labels[p].get(t) for p in paths} for t in tasks}
    kept = {t: [c for c in classes[t] if c in present[t]] for t in tasks}
    atomic_write(os.path.join(out, "classes.json"), json.dumps(kept, indent=1) + "\n")
    after = Counter(labels[p][task] for p in paths)
    print(count_table(f"{task}: {len(paths)} images in the subset", after, kept[task]))
    for t in tasks:
        n = sum(1 for p in paths if labels[p].get(t))
        print(f"{t}: {len(kept[t])} classes, {n}/{len(paths)} images labelled")
    n_val = sum(1 for p in paths if split[p] == "val")
    print(f"split: {len(paths) - n_val} train, {n_val} val (one split shared by all tasks)")
    print(f"wrote {os.path.join(out, 'manifest.csv')} and classes.json")


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


def primary_images(image_files, open_access):
    """{objectid: image row}: one per object, primary view first, then lowest sequence."""
    best = {}
    for path in image_files:
        for order, row in enumerate(read_csv(path, ("iiifurl", "depictstmsobjectid"),
                                             what="published_images CSV")):
            if open_access and "openaccess" in row and row["openaccess"] != "1":
                continue
            seq = row.get("sequence", "")
            key = (row.get("viewtype", "") != "primary",
                   int(seq) if seq.strip().isdigit() else 1 << 30, order)
            oid = row["depictstmsobjectid"].strip()
            if oid and row["iiifurl"].strip() and (oid not in best or key < best[oid][0]):
                best[oid] = (key, row)
    return {oid: row for oid, (_, row) in best.items()}


def read_constituents(args):
    """{objectid: constituent row} via objects_constituents, else by name (the sample's way)."""
    if not args.constituents:
        return {}, {}
    people = read_csv(args.constituents, ("constituentid",), what="constituents CSV")
    if args.objects_constituents:
        by_id = {r["constituentid"]: r for r in people}
        links = read_csv(args.objects_constituents, ("objectid", "constituentid"),
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
    objects = read_csv(args.objects, ("objectid", "title", "classification"), what="objects CSV")
    images = primary_images(args.published_images, args.open_access)
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
    write_csv(os.path.join(args.out, "manifest.csv"), header, rows)
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'manifest.csv')}")
    return 0


# ----------------------------------------------------------------------------- download

class Retry(Exception):
    def __init__(self, msg, wait=None):
        super().__init__(msg)
        self.wait = wait


def retry_after(value):
    """Seconds from a Retry-After header (delta-seconds or HTTP date), else None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def resize_iiif(url, size):
    """Ask an IIIF image server for `size` px (best fit) instead of what the URL says."""
    return re.sub(r"/full/[^/]+/0/default\.jpg$", f"/full/!{size},{size}/0/default.jpg", url)


def fetch(url, dest, timeout, stop):
    """One GET to a temp file beside dest; raises Retry for transient trouble."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    tmp = f"{dest}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 16):
                if stop.is_set():
                    raise KeyboardInterrupt
                f.write(chunk)
        if not check_image(tmp):
            raise Retry("downloaded file is not a decodable image")
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
            raise Retry(f"HTTP {e.code}", retry_after(e.headers.get("Retry-After"))) from e
        raise
    except OSError as e:  # URLError, timeouts, resets: transient, worth another try
        raise Retry(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_one(url, dest, args, stop):
    """Fetch with exponential backoff (x2 per try, jittered, capped 120 s) or Retry-After."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    for attempt in range(args.retries + 1):
        try:
            fetch(url, dest, args.timeout, stop)
            return None
        except Retry as e:
            if attempt == args.retries:
                return str(e)
            wait = e.wait if e.wait is not None else args.backoff * 2 ** attempt
            wait = min(wait, 120.0) * (1 + 0.1 * random.random())
            if stop.wait(wait):
                raise KeyboardInterrupt from None
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
    return "gave up"


def cmd_download(args):
    rows = read_manifest(args.manifest, ("path", "url"))
    jobs, n_ok = [], 0
    for r in rows:
        if not r["url"].strip():
            continue
        dest = safe_join(args.root, r["path"])
        if os.path.isfile(dest) and check_image(dest):
            n_ok += 1
            continue
        url = resize_iiif(r["url"].strip(), args.size) if args.size else r["url"].strip()
        jobs.append((r["path"], url, dest))
    print(f"{len(rows)} rows: {n_ok} already here, {len(jobs)} to fetch "
          f"with {args.workers} workers")
    failures, stop = run_downloads(jobs, args)
    fail_csv = args.failures or os.path.join(args.root, "download_failures.csv")
    if failures:
        write_csv(fail_csv, ["path", "url", "error"], failures)
    elif os.path.exists(fail_csv):
        os.remove(fail_csv)
    done = len(jobs) - len(failures) - stop
    print(f"downloaded {done}, failed {len(failures)}"
          f"{', interrupted: ' + str(stop) + ' left for the next run' if stop else ''}"
          f"{' (listed in ' + fail_csv + ')' if failures else ''}")
    if stop:
        return 130
    return 1 if failures else 0


def run_downloads(jobs, args):
    """At most args.workers requests in flight. Ctrl-C: finished files stay, the rest wait."""
    stop, failures = threading.Event(), []
    prog = Progress(len(jobs), "download")
    pool = ThreadPoolExecutor(max_workers=max(1, args.workers))
    futures = {pool.submit(download_one, url, dest, args, stop): (p, url)
               for p, url, dest in jobs}
    try:
        for fut in as_completed(futures):
            err = fut.exception() or fut.result()
            if err and not isinstance(err, KeyboardInterrupt):
                failures.append((*futures[fut], str(err)))
            prog.update(1, f"failed {len(failures)}")
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        left = sum(1 for f in futures if f.cancelled() or isinstance(
            f.exception() if not f.cancelled() else None, KeyboardInterrupt))
        print("\ninterrupted: finished files are kept; run the same command to continue")
        return failures, max(left, 1)
    pool.shutdown()
    return failures, 0


# ----------------------------------------------------------------------------- resize cache

def resize_one(src, dst, size):
    """Shorter side to `size` px (never upscaled), saved by extension (JPEG q90 default)."""
    im = load_image(src, size)
    s = size / min(im.size)
    if s < 1:
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                       Image.LANCZOS, reducing_gap=3.0)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = dst + ".part"
    fmt = {".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(os.path.splitext(dst)[1].lower(),
                                                            "JPEG")
    im.save(tmp, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    os.replace(tmp, dst)


def cmd_resize(args):
    rows = read_manifest(args.manifest)
    todo, fresh = [], 0
    for r in rows:
        src, dst = safe_join(args.root, r["path"]), safe_join(args.out, r["path"])
        if os.path.isfile(dst) and os.path.isfile(src) and \
                os.path.getmtime(dst) >= os.path.getmtime(src):
            fresh += 1
        else:
            todo.append((r["path"], src, dst))
    print(f"{len(rows)} images: {fresh} already cached, {len(todo)} to resize "
          f"to {args.size} px with {args.workers} threads")
    bad, prog = [], Progress(len(todo), "resize")

    def work(job):
        try:
            resize_one(job[1], job[2], args.size)
            return None
        except DECODE_ERRORS as e:
            return (job[0], f"{type(e).__name__}: {e}")

    # PIL releases the GIL while decoding and resampling, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for err in pool.map(work, todo):
            if err:
                bad.append(err)
            prog.update(1)
    if bad:
        write_csv(os.path.join(args.out, "unreadable.csv"), ["path", "error"], bad)
        print(f"skipped {len(bad)} unreadable images (listed in "
              f"{os.path.join(args.out, 'unreadable.csv')}), e.g. {bad[0][0]}: {bad[0][1]}")
    print(f"resized {len(todo) - len(bad)}, cache at {args.out} (use it as --root)")
    return 0


# ----------------------------------------------------------------------------- demo data
# A synthetic painter, so the whole pipeline runs offline. Style is the stroke texture,
# genre the composition, artist a palette plus a hand (stroke angle and size) and a liking for
# two styles. Lighting direction is random. A few style labels are deliberately wrong
# (demo/label_noise.csv) so that `crnn.py --eval --outliers` has real label noise to find.

DEMO_STYLES = ["Color_Field_Painting", "Cubism", "Expressionism", "Impressionism",
               "Pointillism", "Ukiyo_e"]
DEMO_GENRES = ["cityscape", "landscape", "portrait", "still_life"]
DEMO_ARTISTS = ["Ines_Kahl", "Leon_Voss", "Mira_Vell", "Oskar_Lund", "Tomas_Greer", "Yara_Benn"]


def demo_artists(rng):
    hands = []
    for i, name in enumerate(DEMO_ARTISTS):
        hands.append({
            "name": name,
            "slug": name.lower().replace("_", "-"),
            "palette": rng.uniform(20, 235, size=(4, 3)),
            "angle": rng.uniform(0, math.pi),
            "scale": rng.uniform(0.7, 1.4),
            "styles": [i % len(DEMO_STYLES), (i + 2) % len(DEMO_STYLES)],
        })
    hands[2]["slug"] = "mirã¨-vell"  # mojibake, as 709 real WikiArt names are
    return hands


def demo_layout(genre, h, w, rng):
    """Region map (h, w) of ids 0..3 for a composition."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    m = np.zeros((h, w), np.int64)
    if genre == "landscape":
        horizon = rng.uniform(0.35, 0.65) + 0.05 * np.sin(x * rng.uniform(3, 9) + rng.uniform(0, 6))
        m[y > horizon] = 1
        cx, cy = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.3)
        m[(x - cx) ** 2 + (y - cy) ** 2 < 0.006] = 2
    elif genre == "portrait":
        cx = rng.uniform(0.4, 0.6)
        m[((x - cx) / 0.17) ** 2 + ((y - 0.36) / 0.22) ** 2 < 1] = 2
        m[(y > 0.62) & (np.abs(x - cx) < 0.18 + (y - 0.62) * 0.9)] = 1
    elif genre == "still_life":
        table = rng.uniform(0.55, 0.7)
        m[y > table] = 1
        for _ in range(rng.integers(2, 5)):
            cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.06, 0.12)
            m[((x - cx) / r) ** 2 + ((y - table + r * 0.8) / r) ** 2 < 1] = int(rng.integers(2, 4))
    else:  # cityscape: buildings on a street
        street = rng.uniform(0.75, 0.88)
        x0 = 0.0
        while x0 < 1:
            bw, top = rng.uniform(0.08, 0.2), rng.uniform(0.2, 0.6)
            m[(x >= x0) & (x < x0 + bw) & (y > top)] = int(rng.integers(1, 3))
            x0 += bw + rng.uniform(0, 0.04)
        m[y > street] = 3
    return m


def demo_strokes(base, rng, n, length, width, angle=None, jitter=25.0, canvas=None):
    """Draw n short strokes coloured from `base` at their start point."""
    h, w, _ = base.shape
    im = Image.fromarray(canvas if canvas is not None else base.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    angles = rng.uniform(0, math.pi, n) if angle is None else angle + rng.normal(0, 0.25, n)
    cols = np.clip(base[ys, xs] + rng.normal(0, jitter, (n, 3)), 0, 255).astype(int)
    for y0, x0, a, c in zip(ys, xs, angles, cols, strict=True):
        dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
        if width <= 2.5:  # dots and thin strokes
            draw.ellipse([x0 - width, y0 - width, x0 + width, y0 + width], fill=tuple(c))
        else:
            draw.line([x0 - dx, y0 - dy, x0 + dx, y0 + dy], fill=tuple(c), width=int(width))
    return np.asarray(im, np.float64)


def demo_render(style, base, regions, hand, rng):
    """Paint the flat base (h, w, 3) in a style: the texture is what the style means."""
    h, w, _ = base.shape
    s = hand["scale"]
    blur = np.asarray(Image.fromarray(base.astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(4)), np.float64)
    if style == "Color_Field_Painting":
        return blur + rng.normal(0, 3, base.shape)
    if style == "Impressionism":
        return demo_strokes(blur, rng, int(h * w / 18), 7 * s, 3, None, 30, blur.astype(np.uint8))
    if style == "Expressionism":
        sat = np.clip((blur - blur.mean(2, keepdims=True)) * 1.8 + blur.mean(2, keepdims=True),
                      0, 255)
        return demo_strokes(sat, rng, int(h * w / 45), 22 * s, 5, hand["angle"], 35,
                            sat.astype(np.uint8))
    if style == "Pointillism":
        paper = np.full(base.shape, 235, np.uint8)
        return demo_strokes(blur, rng, int(h * w / 5), 0, 1.6, None, 55, paper)
    if style == "Cubism":
        seeds = rng.uniform(0, 1, (int(40 * s), 2)) * [h, w]
        yy, xx = np.mgrid[0:h, 0:w]
        d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        facet = d.argmin(-1)
        out = np.zeros_like(base)
        for f in range(len(seeds)):
            sel = facet == f
            if sel.any():
                out[sel] = base[sel].mean(0) * rng.uniform(0.75, 1.15)
        edge = (np.diff(facet, axis=0, prepend=facet[:1]) != 0) | \
               (np.diff(facet, axis=1, prepend=facet[:, :1]) != 0)
        out[edge] *= 0.35
        return out
    # Ukiyo_e: flat colours, black outlines on region borders, warm paper grain
    edge = (np.diff(regions, axis=0, prepend=regions[:1]) != 0) | \
           (np.diff(regions, axis=1, prepend=regions[:, :1]) != 0)
    edge = np.asarray(Image.fromarray(edge.astype(np.uint8) * 255).filter(
        ImageFilter.MaxFilter(3))) > 0
    out = np.round(base / 48) * 48 * 0.85 + np.array([38, 30, 12]) + rng.normal(0, 4, base.shape)
    out[edge] = 20
    return out


def demo_painting(style, genre, hand, rng, short=160):
    aspect = rng.uniform(0.75, 1.33)
    h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
    regions = demo_layout(genre, h, w, rng)
    palette = hand["palette"][rng.permutation(4)] + rng.normal(0, 12, (4, 3))
    base = palette[regions]
    theta = rng.uniform(0, 2 * math.pi)  # lighting from a random side
    yy, xx = np.mgrid[0:h, 0:w]
    light = 1 + 0.35 * ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta))
    base = np.clip(base * light[..., None], 0, 255)
    out = demo_render(style, base, regions, hand, rng)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def write_demo_lists(lists, items, noise):
    """The ArtGAN list formats: CRLF `path,label` for style and genre, the artist lists'
    header + blank line + `path,,label` (LF), and `<idx> <Name>` class files."""
    os.makedirs(lists, exist_ok=True)
    for task, names in (("style", DEMO_STYLES), ("genre", DEMO_GENRES),
                        ("artist", DEMO_ARTISTS)):
        name = "style_class.txt" if task == "style" else f"{task}_class"
        atomic_write(os.path.join(lists, name), "".join(f"{i} {n}\n" for i, n in enumerate(names)))
        for split in ("train", "val"):
            sel = [it for it in items if it[f"{task}_split"] == split and it[task] is not None]
            if task == "artist":
                head = "(Path to image),, (Groundtruth class)" + (" " if split == "train" else "")
                text = head + "\n\n" + "".join(f"{it['path']},,{it['artist']}\n" for it in sel)
                atomic_write(os.path.join(lists, f"artist_{split}"), text)
            else:
                labels = [noise.get(it["path"], it["style"]) if task == "style" else it[task]
                          for it in sel]
                text = "".join(f"{it['path']},{y}\r\n" for it, y in zip(sel, labels, strict=True))
                atomic_write(os.path.join(lists, f"{task}_{split}.csv"), text)


def cmd_demo(args):
    rng = np.random.default_rng(args.seed)
    hands = demo_artists(rng)
    items, prog = [], Progress(args.n, "demo", every=5.0)
    for i in range(args.n):
        a = i % len(hands)
        hand = hands[a]
        st = int(rng.choice(hand["styles"])) if rng.random() < 0.8 else \
            int(rng.integers(len(DEMO_STYLES)))
        g = int(rng.integers(len(DEMO_GENRES)))
        path = f"{DEMO_STYLES[st]}/{hand['slug']}_{DEMO_GENRES[g].replace('_', '-')}-{i}.jpg"
        dest = os.path.join(args.out, "images", path)
        if not os.path.isfile(dest):
            im = demo_painting(DEMO_STYLES[st], DEMO_GENRES[g], hand, rng)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            atomic_write(dest, buf.getvalue(), "wb")
        split = lambda: "val" if rng.random() < 0.25 else "train"  # noqa: E731
        s = split()
        items.append({"path": path, "style": st, "shown": g,
                      "genre": g if rng.random() < 0.9 else None,
                      "artist": a if rng.random() < 0.8 else None, "style_split": s,
                      "genre_split": s if rng.random() < 0.95 else split(), "artist_split": s})
        prog.update(1)
    noisy = rng.choice(len(items), size=max(1, args.n // 40), replace=False)
    noise = {items[j]["path"]: (items[j]["style"] + 1) % len(DEMO_STYLES) for j in noisy}
    write_demo_lists(os.path.join(args.out, "lists"), items, noise)
    write_csv(os.path.join(args.out, "label_noise.csv"), ["path", "listed_style", "true_style"],
              [(p, DEMO_STYLES[y], DEMO_STYLES[items[j]["style"]]) for (p, y), j in
               zip(noise.items(), noisy, strict=True)])
    sub = ["wikiart", "--lists", os.path.join(args.out, "lists"), "--out", args.out,
           "--per-class", "0", "--min-per-class", "1", "--val-frac", "0.25",
           "--seed", str(args.seed)]
    cmd_wikiart(build_parser().parse_args(sub))
    write_demo_gallery(args.out, items)
    print(f"SYNTHETIC demo data (not real paintings): {args.n} images in "
          f"{os.path.join(args.out, 'images')}; classification manifest "
          f"{os.path.join(args.out, 'manifest.csv')}; retrieval gallery "
          f"{os.path.join(args.out, 'gallery.csv')}")
    return 0


def write_demo_gallery(out, items):
    """An NGA-style manifest over the same images, for retrieve.py."""
    rows = []
    for i, it in enumerate(items):
        artist = DEMO_ARTISTS[it["artist"] if it["artist"] is not None else i % 6]
        rows.append([it["path"], str(100000 + i), f"Synthetic {DEMO_GENRES[it['shown']]} {i}",
                     artist.replace("_", " "), str(1850 + i % 100), "", DEMO_STYLES[it["style"]],
                     DEMO_GENRES[it["genre"]] if it["genre"] is not None else ""])
    write_csv(os.path.join(out, "gallery.csv"), ["path", "objectid", "title", "attribution",
                                                 "displaydate", "url", "style", "genre"], rows)


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=Help)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("wikiart", help="class-balanced subset from the ArtGAN WikiArt lists",
                       formatter_class=Help)
    w.add_argument("--lists", required=True, help="folder of the ArtGAN list files")
    w.add_argument("--out", required=True, help="writes OUT/manifest.csv and OUT/classes.json")
    w.add_argument("--tasks", default="style,artist,genre", help="label columns to carry")
    w.add_argument("--balance-on", default="style", help="task whose classes are balanced")
    w.add_argument("--per-class", type=int, default=500, help="cap per class (0: no cap)")
    w.add_argument("--min-per-class", type=int, default=1, help="drop smaller classes")
    w.add_argument("--val-frac", type=float, default=0.2, help="validation share per class")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--images", help="image root: keep only images that exist and decode")
    w.set_defaults(func=cmd_wikiart)

    n = sub.add_parser("nga", help="paintings with images from the NGA open-data CSVs",
                       formatter_class=Help)
    n.add_argument("--objects", required=True, help="objects.csv")
    n.add_argument("--published-images", required=True, nargs="+",
                   help="published_images.csv (several files are merged)")
    n.add_argument("--constituents", help="constituents.csv: adds a nationality column")
    n.add_argument("--objects-constituents", help="objects_constituents.csv (else by name)")
    n.add_argument("--out", required=True)
    n.add_argument("--classification", default="Painting", help="'all' keeps every object")
    n.add_argument("--title-contains", help="case-insensitive, e.g. Portrait")
    n.add_argument("--open-access", action="store_true", help="keep openaccess=1 rows only")
    n.add_argument("--limit", type=int, default=0, help="at most N rows (0: all)")
    n.add_argument("--size", type=int, default=512, help="IIIF image size in the url, px")
    n.set_defaults(func=cmd_nga)

    d = sub.add_parser("download", help="fetch a manifest's urls, resumably",
                       formatter_class=Help)
    d.add_argument("--manifest", required=True)
    d.add_argument("--root", required=True, help="images go to ROOT/<path>")
    d.add_argument("--size", type=int, default=512, help="IIIF size to ask for (0: url as is)")
    d.add_argument("--workers", type=int, default=4, help="requests in flight at most")
    d.add_argument("--retries", type=int, default=5)
    d.add_argument("--backoff", type=float, default=1.0, help="first retry wait, s (x2 each)")
    d.add_argument("--timeout", type=float, default=30.0, help="per request, s")
    d.add_argument("--failures", help="CSV of failures (default ROOT/download_failures.csv)")
    d.set_defaults(func=cmd_download)

    r = sub.add_parser("resize", help="pre-resize a manifest's images into a cache folder",
                       formatter_class=Help)
    r.add_argument("--manifest", required=True)
    r.add_argument("--root", required=True, help="original images")
    r.add_argument("--out", required=True, help="cache folder, same relative paths")
    r.add_argument("--size", type=int, default=256, help="shorter side, px")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    r.set_defaults(func=cmd_resize)

    m = sub.add_parser("demo", help="small SYNTHETIC dataset in the real formats",
                       formatter_class=Help)
    m.add_argument("--out", default="demo")
    m.add_argument("--n", type=int, default=360, help="number of images")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except UserError as e:
        raise SystemExit(f"data.py: error: {e}") from None
    if status:  # failures were listed above; the shell (or notebook) sees the status
        raise SystemExit(status)
    return status


if __name__ == "__main__":
    main()
