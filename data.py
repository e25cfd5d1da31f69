"""Data for ArtExtract: WikiArt and NGA subsets, image download, resized cache, demo data.

Holds lists, manifests, downloads, image reading and the file plumbing every script uses.
No model, device, precision or drawing code here (nets.py, pages.py).

Shell:
    python data.py demo                                   # synthetic offline data in demo/
    python data.py wikiart --lists wikiart_csv --out subset --per-class 100 --min-per-class 50
    python data.py wikiart --lists wikiart_csv --out subset --images wikiart.zip   # what decodes
    python data.py wikiart --lists wikiart_csv --out subset --split artist   # unseen painters
    python data.py nga --objects objects.csv --published-images published_images.csv --out nga
    python data.py download --manifest nga/manifest.csv --root nga/images --size 512
    python data.py resize --manifest subset/manifest.csv --root wikiart.zip --out cache256
    python data.py hf-wikiart --out hf --shards 0-3       # Hugging Face parquet shards, resized

Notebook:
    import data; data.main(["demo", "--out", "demo"])

The one image-loading path that crnn.py and retrieve.py share is here (`load_image`,
`ImageDataset`, `collate_skip`, and `image_source`: a folder or a .zip read in place), with
`atomic_write`, `write_csv` and `Progress`. `wikiart` splits the ArtGAN way by default (their
val lists are test, a dev part of train selects checkpoints); pyarrow is imported only by
`hf-wikiart`.
Bad input ends with one line on stderr and exit status 1 (`UserError`), never a traceback.
"""

import argparse
import contextlib
import email.utils
import errno
import io
import json
import math
import os
import posixpath
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from files import (
    DECODE_ERRORS,
    MAX_BYTES,
    Help,
    Progress,
    UserError,
    atomic_write,
    check_member,
    disk_full,
    image_problem,
    image_source,
    load_image,
    one_line,
    os_error_line,
    read_csv,
    read_manifest,
    safe_join,
    tolerant_stdout,
    unsafe_path,
    write_csv,
    writing,
)

TASKS = ("style", "artist", "genre")
USER_AGENT = "ArtExtract/0.1 (open-source research toolkit; python-urllib)"
SHARD_MAX_BYTES = 4 << 30  # hf-wikiart parquet shards are ~520 MB
# A class with fewer train images than this is too small to learn (or to score): subsets leave
# it out unless --min-per-class is set below it, and crnn.py names it at training start.
SMALL_CLASS = 5


def split_leaks(rows):
    """{path: set of splits} for the paths that stand in more than one split of a manifest:
    a model selected or evaluated on such an image has seen it in training."""
    splits = defaultdict(set)
    for r in rows:
        splits[r["path"]].add(r.get("split", ""))
    return {p: s for p, s in splits.items() if len(s) > 1}


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
    pairs, bad, unsafe = [], 0, []
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
        elif unsafe_path(p):  # absolute or ../: never joined to an image root
            unsafe.append(p)
        else:
            pairs.append((p, int(label)))
    if bad:
        print(f"warning: {path}: {bad} malformed lines skipped")
    if unsafe:
        print(f"warning: {path}: {len(unsafe)} paths outside the image root skipped "
              f"(e.g. {unsafe[0]!r})")
    return pairs


def load_wikiart(lists, tasks):
    """{path: {task: class name}} over all tasks' train+val lists, the class lists, and
    {task: paths in its val list}.

    Rule for a path listed twice in one task with different labels: it gets no label for that
    task (we cannot tell which is right); the count is reported. It still counts as listed in
    val when one of its lines is there.
    """
    if not os.path.isdir(lists):
        raise UserError(f"list folder not found: {lists}")
    labels, classes, in_val = defaultdict(dict), {}, {}
    for task in tasks:
        classes[task] = read_classes(find_list(lists, task, "class"))
        seen, conflicts, in_val[task] = {}, set(), set()
        for kind in ("train", "val"):
            for p, y in read_split_list(find_list(lists, task, kind), len(classes[task])):
                if p in seen and seen[p] != y:
                    conflicts.add(p)
                seen[p] = y
                if kind == "val":
                    in_val[task].add(p)
        for p, y in seen.items():
            if p not in conflicts:
                labels[p][task] = classes[task][y]
        if conflicts:
            ex = sorted(conflicts)[0]
            print(f"{task}: {len(conflicts)} paths listed with conflicting labels, left "
                  f"unlabeled for {task} (e.g. {ex})")
    return labels, classes, in_val


def count_table(title, counts, names):
    lines = [title]
    for n in names:
        if counts.get(n):
            lines.append(f"  {n:<32s} {counts[n]:>6d}")
    return "\n".join(lines)


def balanced_subset(labels, names, task, per_class, min_per_class, seed, source=None,
                    held=frozenset()):
    """Per class of `task` (sorted, then seeded shuffle): up to per_class usable paths, plus
    every usable path in `held` (test images: never capped, not counted for the cap or for
    min_per_class). Returns ({class: paths}, {dropped class: n}, [(path, why unusable)]).

    With `source` (image_source), a path is usable when it is there and decodes; checking stops
    once a class has enough, so a 100-per-class subset of 81k images reads a few thousand files.
    """
    by_class = defaultdict(list)
    for p, lab in labels.items():
        if lab.get(task):
            by_class[lab[task]].append(p)
    rng = random.Random(seed)
    chosen, dropped, bad = {}, {}, []
    for c in names:
        paths = sorted(by_class.get(c, []))
        rng.shuffle(paths)
        keep, kept_held = [], []
        for p in paths:
            if p not in held and per_class and len(keep) >= per_class:
                if not held:
                    break
                continue
            why = check_member(source, p) if source is not None else None
            if why:
                bad.append((p, why))
                continue
            (kept_held if p in held else keep).append(p)
        if len(keep) < max(min_per_class, 1):
            dropped[c] = len(keep)
        else:
            chosen[c] = keep + kept_held
    return chosen, dropped, bad


def report_small(chosen, dropped, min_per_class, held=frozenset()):
    """Names the classes balanced_subset dropped, and warns of the classes it kept with fewer
    than SMALL_CLASS images that can go to train (held ones, the test lists, do not count)."""
    what = "usable train images" if held else "usable images"
    for c, n in dropped.items():
        print(f"dropped class {c}: {n} {what} < --min-per-class {min_per_class}"
              + (" (too few to learn)" if n < SMALL_CLASS else ""))
    small = {c: sum(p not in held for p in ps) for c, ps in chosen.items()}
    small = {c: n for c, n in small.items() if n < SMALL_CLASS}
    if small:
        names = ", ".join(f"{c} ({n})" for c, n in sorted(small.items(), key=lambda x: x[1]))
        print(f"warning: {len(small)} class{'es' if len(small) > 1 else ''} kept with fewer than "
              f"{SMALL_CLASS} {what}, too few to learn (--min-per-class {min_per_class} asks for "
              f"them): {names}; the default --min-per-class {SMALL_CLASS} leaves them out")


# ----------------------------------------------------------------------------- split rules
# One split column shared by every task (a multi-task model must never train on an image
# another task evaluates). random: today's train/val; official: the ArtGAN val lists are test,
# as in the papers; artist: test and dev painters are never seen in training.

def stratified_split(chosen, frac, seed, name="val"):
    """{path: name|'train'}: per class, round(frac * n) to `name` (>= 1 when n >= 2)."""
    rng = random.Random(seed + 1)
    split = {}
    for c in sorted(chosen):
        paths = sorted(chosen[c])
        rng.shuffle(paths)
        n_out = round(frac * len(paths))
        if frac > 0 and len(paths) >= 2:
            n_out = min(max(n_out, 1), len(paths) - 1)
        for i, p in enumerate(paths):
            split[p] = name if i < n_out else "train"
    return split


def official_split(chosen, in_val, first, dev_frac, seed):
    """Every chosen path in any task's val list is test; a stratified dev_frac of the rest is
    dev. Prints how many images each val list moved, beside the `first` task's own."""
    held = set().union(*in_val.values())
    rest = {c: [p for p in ps if p not in held] for c, ps in chosen.items()}
    split = stratified_split(rest, dev_frac, seed, "dev")
    test = {p for ps in chosen.values() for p in ps if p in held}
    split.update(dict.fromkeys(test, "test"))
    others = [t for t in in_val if t != first]
    print(f"split official: {len(test)} test = the val lists of {', '.join(in_val)}")
    print(f"  {first} val list: {len(test & in_val[first])} images")
    for t in others:
        moved = test & in_val[t] - in_val[first]
        print(f"  {t} val list: {len(test & in_val[t])} images, {len(moved)} of them not in "
              f"the {first} val list (moved out of train)")
    n_dev = sum(1 for s in split.values() if s == "dev")
    print(f"  dev: {n_dev} of the {n_dev + sum(1 for s in split.values() if s == 'train')} "
          f"others (--dev-frac {dev_frac} per {first} class), the rest train")
    return split


def artist_of(path):
    """The painter in a WikiArt file name, <artist-slug>_<title-slug>.jpg; None without one."""
    base = path.rsplit("/", 1)[-1]
    return base.split("_", 1)[0] if "_" in base else None


def artist_split(chosen, groups, test_frac, dev_frac, seed):
    """Whole artists (groups[path]), in seeded order, each to the split that is furthest below
    its share of the images (test_frac, dev_frac, the rest train); unknown artists to train."""
    by = defaultdict(list)
    for ps in chosen.values():
        for p in ps:
            by[groups.get(p)].append(p)
    artists = sorted(a for a in by if a is not None)
    random.Random(seed + 2).shuffle(artists)
    share = {"test": test_frac, "dev": dev_frac, "train": 1 - test_frac - dev_frac}
    share = {s: f for s, f in share.items() if f > 0}
    split, count, heads = {}, Counter(), Counter()
    for a in artists:
        s = min(share, key=lambda s: count[s] / share[s])  # ties: test, dev, train
        split.update(dict.fromkeys(by[a], s))
        count[s], heads[s] = count[s] + len(by[a]), heads[s] + 1
    split.update(dict.fromkeys(by.get(None, []), "train"))
    print(f"split artist: {len(artists)} artists: test {heads['test']} ({count['test']} "
          f"images), dev {heads['dev']} ({count['dev']}), train {heads['train']} "
          f"({count['train']}); {len(by.get(None, []))} images of unknown artists kept in train")
    return split


def make_split(args, chosen, in_val, groups):
    """{path: train|dev|val|test} by --split; warns of classes a split lacks."""
    if args.split == "official":
        split = official_split(chosen, in_val, args.balance_on, args.dev_frac, args.seed)
    elif args.split == "artist":
        split = artist_split(chosen, groups, args.test_frac, args.dev_frac, args.seed)
    else:
        split = stratified_split(chosen, args.val_frac, args.seed)
        print(f"split random: {sum(1 for s in split.values() if s == 'val')} images to val "
              f"(--val-frac {args.val_frac} per class)")
    for s in sorted(set(split.values())):
        lacking = [c for c, ps in chosen.items() if not any(split[p] == s for p in ps)]
        if lacking:
            print(f"warning: {len(lacking)} {args.balance_on} classes have no {s} image: "
                  f"{', '.join(lacking[:8])}{' ...' if len(lacking) > 8 else ''}")
    return split


def parse_tasks(text, balance_on):
    """--tasks as a list, with --balance-on added in front when it is not among them."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks + [balance_on] if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    return tasks if balance_on in tasks else [balance_on, *tasks]


def check_fracs(args):
    for flag in ("val_frac", "dev_frac", "test_frac"):
        if not 0 <= getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be in [0, 1)")
    if args.split == "artist" and args.test_frac + args.dev_frac >= 1:
        raise UserError("--test-frac + --dev-frac must be < 1 (something must be left to train)")


def cmd_wikiart(args):
    tasks = parse_tasks(args.tasks, args.balance_on)
    check_fracs(args)
    source = image_source(args.images) if args.images else None
    labels, classes, in_val = load_wikiart(args.lists, tasks)
    task = args.balance_on
    before = Counter(lab[task] for lab in labels.values() if lab.get(task))
    print(count_table(f"{task}: {sum(before.values())} labelled images in the lists", before,
                      classes[task]))
    held = set().union(*in_val.values()) if args.split == "official" else frozenset()
    chosen, dropped, bad = balanced_subset(labels, classes[task], task, args.per_class,
                                           args.min_per_class, args.seed, source, held)
    report_unusable(args.out, bad)
    report_small(chosen, dropped, args.min_per_class, held)
    if not chosen:
        raise UserError("nothing left after filtering (lower --min-per-class, or check --images)")
    groups = {p: artist_of(p) for ps in chosen.values() for p in ps}
    split = make_split(args, chosen, in_val, groups)
    write_subset(args.out, tasks, task, labels, classes, split)
    return 0


def report_unusable(out, bad):
    """OUT/unusable.csv (path, reason) and a count per reason; an old list is removed."""
    listing = os.path.join(out, "unusable.csv")
    if not bad:
        if os.path.exists(listing):
            os.remove(listing)
        return
    write_csv(listing, ["path", "reason"], bad)
    why = Counter(r for _, r in bad)
    order = ["missing", "bad CRC", "corrupt"]  # then any other reason, alphabetically
    parts = [f"{why[r]} {r}" for r in sorted(why, key=lambda r: (r not in order,
                                                                  order.index(r) if r in order
                                                                  else 0, r))]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    print(f"skipped {text} images (listed in {listing})")


def write_subset(out, tasks, task, labels, classes, split):
    """OUT/manifest.csv (path, tasks..., split) and OUT/classes.json (the classes present);
    prints the counts per class of `task` (the balanced one)."""
    paths = sorted(split)
    rows = [[p] + [labels[p].get(t, "") for t in tasks] + [split[p]] for p in paths]
    present = {t: {labels[p].get(t) for p in paths} for t in tasks}
    kept = {t: [c for c in classes[t] if c in present[t]] for t in tasks}
    atomic_write(os.path.join(out, "classes.json"), json.dumps(kept, indent=1) + "\n")
    write_csv(os.path.join(out, "manifest.csv"), ["path", *tasks, "split"], rows)
    after = Counter(labels[p][task] for p in paths)
    print(count_table(f"{task}: {len(paths)} images in the subset", after, kept[task]))
    for t in tasks:
        n = sum(1 for p in paths if labels[p].get(t))
        print(f"{t}: {len(kept[t])} classes, {n}/{len(paths)} images labelled")
    n = Counter(split.values())
    print("split: " + ", ".join(f"{n[s]} {s}" for s in ("train", "dev", "val", "test") if n[s])
          + " (one split shared by all tasks)")
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


def primary_images(image_files, open_access, objects_say=False):
    """({objectid: image row}, rows with an openaccess column, rows left out for want of one):
    one image per object, primary view first, then lowest sequence. open_access keeps rows
    whose openaccess is 1; a row from a file without that column (older exports) passes only
    where the objects CSV says (objects_say), else nothing tells that it is open."""
    best, flagged, unknown = {}, 0, 0
    for path in image_files:
        for order, row in enumerate(read_csv(path, ("iiifurl", "depictstmsobjectid"),
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
    write_csv(os.path.join(args.out, "manifest.csv"), header, rows)
    print(f"wrote {len(rows)} rows to {os.path.join(args.out, 'manifest.csv')}")
    return 0


# ----------------------------------------------------------------------------- download

class Retry(Exception):
    """Transient trouble from a server that answered (or timed out): worth another try."""

    def __init__(self, msg, wait=None):
        super().__init__(msg)
        self.wait = wait


class Unreachable(Retry):
    """No connection at all (no DNS, refused, no route): retried only once a server answered."""


class Refused(Exception):
    """A response we will not take (another scheme, too large): a failure, never retried."""


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only (urllib's own also follows ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise Refused(f"redirect to {newurl[:80]} refused (http and https only)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


OPENER = urllib.request.build_opener(HttpOnlyRedirects)
NO_ROUTE = (socket.gaierror, ConnectionRefusedError, errno.ENETUNREACH, errno.EHOSTUNREACH)


def url_problem(url):
    """Why url may not be downloaded, or None: http and https only, never file:// or ftp://."""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        return f"not an http(s) URL: {url[:80]}"
    return None


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


def fetch(url, dest, args, stop, reached, check=None):
    """One GET to a temp file beside dest; raises Retry for transient trouble, Refused for a
    response over args.max_bytes or a redirect off http(s). Sets `reached` once a server
    answered. check(path) -> (ok, what): whether the body is what we asked for (default: a
    decodable image)."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    tmp = f"{dest}.{os.getpid()}.{threading.get_ident()}.part"
    try:
        with OPENER.open(req, timeout=args.timeout) as r, open(tmp, "wb") as f:
            reached.set()
            stream(r, f, args.max_bytes, stop)
        ok, what = check(tmp) if check else (image_problem(tmp) is None, "a decodable image")
        if not ok:
            raise Retry(f"downloaded file is not {what}")
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        reached.set()
        if e.code == 429 or e.code >= 500:
            raise Retry(f"HTTP {e.code}", retry_after(e.headers.get("Retry-After"))) from e
        raise
    except OSError as e:  # URLError, timeouts, resets: transient, worth another try
        if disk_full(e):  # not transient: every file would fail the same way
            raise OSError(e.errno, e.strerror, e.filename or dest) from None
        why = getattr(e, "reason", e)
        kind = Unreachable if isinstance(why, NO_ROUTE[:2]) or \
            getattr(why, "errno", None) in NO_ROUTE[2:] else Retry
        raise kind(f"{type(e).__name__}: {why}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def stream(r, f, max_bytes, stop):
    """Copies the response r to the file f, refusing more than max_bytes (declared or sent)."""
    declared = r.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise Refused(f"response of {int(declared)} bytes is over --max-bytes {max_bytes}")
    got = 0
    while chunk := r.read(1 << 16):
        if stop.is_set():
            raise KeyboardInterrupt
        got += len(chunk)
        if got > max_bytes:
            raise Refused(f"response is over --max-bytes {max_bytes}")
        f.write(chunk)


def download_one(url, dest, args, stop, reached, check=None):
    """Fetch with exponential backoff (x2 per try, jittered, capped 120 s) or Retry-After.
    No connection at all is not retried until some server has answered: offline, every try
    would wait out the whole backoff."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    for attempt in range(args.retries + 1):
        try:
            fetch(url, dest, args, stop, reached, check)
            return None
        except Refused as e:
            return str(e)
        except Retry as e:
            if attempt == args.retries or isinstance(e, Unreachable) and not reached.is_set():
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
    jobs, n_ok, bad = [], 0, []
    for r in rows:
        if not r["url"].strip():
            continue
        if url_problem(r["url"].strip()):
            bad.append((r["path"], r["url"], url_problem(r["url"].strip())))
            continue
        dest = safe_join(args.root, r["path"])
        if os.path.isfile(dest) and not image_problem(dest):
            n_ok += 1
            continue
        url = resize_iiif(r["url"].strip(), args.size) if args.size else r["url"].strip()
        jobs.append((r["path"], url, dest))
    print(f"{len(rows)} rows: {n_ok} already here, {len(jobs)} to fetch "
          f"with {args.workers} workers")
    failures, stop = run_downloads(jobs, args)
    done = len(jobs) - len(failures) - stop  # refused URLs (bad) were never jobs
    failures = bad + failures
    fail_csv = args.failures or os.path.join(args.root, "download_failures.csv")
    if failures:
        write_csv(fail_csv, ["path", "url", "error"], failures)
    elif os.path.exists(fail_csv):
        os.remove(fail_csv)
    print(f"downloaded {done}, failed {len(failures)}"
          f"{', interrupted: ' + str(stop) + ' left for the next run' if stop else ''}"
          f"{' (listed in ' + fail_csv + ')' if failures else ''}")
    if stop:
        return 130
    return 1 if failures else 0


def run_downloads(jobs, args, check=None, unit="img"):
    """At most args.workers requests in flight. Ctrl-C: finished files stay, the rest wait."""
    stop, reached, failures = threading.Event(), threading.Event(), []
    prog = Progress(len(jobs), "download", unit=unit)
    pool = ThreadPoolExecutor(max_workers=max(1, args.workers))
    futures = {pool.submit(download_one, url, dest, args, stop, reached, check): (p, url)
               for p, url, dest in jobs}
    try:
        for fut in as_completed(futures):
            err = fut.exception() or fut.result()
            if disk_full(err):  # one line from main(), not a failure per file
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise err
            if err and not isinstance(err, KeyboardInterrupt):
                failures.append((*futures[fut], str(err)))
            prog.update(1, f"failed {len(failures)}")
            if len(failures) >= min(3, len(jobs)) and not reached.is_set():
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise UserError(f"no server answered the first {len(failures)} requests "
                                f"({failures[0][2]}): offline? Nothing was downloaded")
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
    """Shorter side to `size` px (never upscaled), saved by extension (JPEG q90 default).
    src: a path or a binary file (a zip member, a parquet row's bytes)."""
    im = load_image(src, size)
    s = size / min(im.size)
    if s < 1:
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                       Image.LANCZOS, reducing_gap=3.0)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = dst + ".part"
    fmt = {".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(os.path.splitext(dst)[1].lower(),
                                                            "JPEG")
    try:
        with writing(dst):
            im.save(tmp, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        os.replace(tmp, dst)
    except BaseException:  # a full disk: no .part left
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def cmd_resize(args):
    rows = read_manifest(args.manifest)
    source = image_source(args.root)  # a folder, or a zip read in place
    todo, fresh = [], 0
    for r in rows:
        rel, dst = r["path"], safe_join(args.out, r["path"])
        source.check_rel(rel)
        if os.path.isfile(dst) and source.exists(rel) and \
                os.path.getmtime(dst) >= source.mtime(rel):
            fresh += 1
        else:
            todo.append((rel, dst))
    print(f"{len(rows)} images: {fresh} already cached, {len(todo)} to resize "
          f"to {args.size} px with {args.workers} threads")
    bad, prog = [], Progress(len(todo), "resize")

    def work(job):
        try:
            resize_one(source.loadable(job[0]), job[1], args.size)
            return None
        except DECODE_ERRORS as e:
            if disk_full(e):  # not this image's fault: main() says it in one line
                raise
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
    for t in (t for t in TASKS if t in cols):
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
    dst = safe_join(out, rel)
    if os.path.isfile(dst):  # converted before an interruption
        return None
    try:
        resize_one(io.BytesIO(raw), dst, size)
    except DECODE_ERRORS as e:
        if disk_full(e):  # not this image's fault: main() says it in one line
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
    prog = Progress(pf.metadata.num_rows, f"convert {shard_name(i)}", every=10.0)
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for batch in pf.iter_batches(batch_size=16, columns=["image", *names]):
            recs = batch.to_pylist()
            meta = shard_rows(recs, names, i, prog.done)
            errs = pool.map(convert_row, recs, [m[0] for m in meta], [images] * len(recs),
                            [args.size] * len(recs))
            for (rel, src, lab), err in zip(meta, errs, strict=True):
                row = [rel, src] + [lab.get(t, "") for t in TASKS]
                (bad.append([rel, err]) if err else rows.append(row))
            prog.update(len(recs))
    shards = os.path.join(args.out, "shards")
    write_csv(os.path.join(shards, shard_name(i) + ".unusable.csv"), ["path", "reason"], bad)
    atomic_write(os.path.join(shards, shard_name(i) + ".names.json"), json.dumps(names) + "\n")
    write_csv(os.path.join(shards, shard_name(i) + ".csv"), ["path", "source", *TASKS], rows)
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
    failures, stop = run_downloads(jobs, dl, check=is_parquet, unit="shards")
    if stop:
        return 130
    if failures:
        write_csv(os.path.join(args.out, "download_failures.csv"), ["shard", "url", "error"],
                  failures)
        name, url, err = failures[0]
        raise UserError(f"{name}: {err} from {url} ({len(failures)} shards failed, listed in "
                        f"{os.path.join(args.out, 'download_failures.csv')})")
    return 0


def read_converted(shards, out, tasks):
    """labels {path: {task: name}}, classes {task: names}, unusable rows and the painter of
    each path (its artist label, else the slug of its source file name) of converted shards."""
    labels, classes, bad, painter = {}, {}, [], {}
    for i in shards:
        base = os.path.join(out, "shards", shard_name(i))
        for r in read_csv(base + ".csv", ("path", "source", *TASKS), what="converted shard list"):
            labels[r["path"]] = {t: r[t] for t in tasks if r[t]}
            painter[r["path"]] = r["artist"] or artist_of(r["source"])
        bad += [(r["path"], r["reason"]) for r in read_csv(base + ".unusable.csv")]
        with open(base + ".names.json", encoding="utf-8") as f:
            for t, names in json.load(f).items():
                classes.setdefault(t, names)
    seen = {t: {lab[t] for lab in labels.values() if t in lab} for t in tasks}
    for t in tasks:  # metadata order; without metadata, the sorted names seen
        known = classes.get(t) or sorted(seen[t])
        classes[t] = [c for c in known if c and not UNKNOWN.match(c)]
    return labels, classes, bad, painter


def cmd_hf_wikiart(args):
    tasks = parse_tasks(args.tasks, args.balance_on)
    check_fracs(args)
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
    labels, classes, bad, painter = read_converted(shards, args.out, tasks)
    report_unusable(args.out, bad)
    task = args.balance_on
    chosen, dropped, _ = balanced_subset(labels, classes[task], task, args.per_class,
                                         args.min_per_class, args.seed)
    report_small(chosen, dropped, args.min_per_class)
    if not chosen:
        raise UserError("nothing left after filtering (lower --min-per-class)")
    split = make_split(args, chosen, {}, painter)
    write_subset(args.out, tasks, task, labels, classes, split)
    return 0


# ----------------------------------------------------------------------------- pose keypoints
# COCO's person keypoints: 17 joints, each (x, y, v) in image pixels, v 0 = not labelled, 1 =
# labelled but hidden, 2 = visible. "left" is the figure's own left (on the viewer's right when
# it faces us). In memory a figure is {"box": [x0, y0, x1, y1], "keypoints": (17, 3) float32
# (x, y, confidence in [0, 1]), "score"}: v 0, 1, 2 read as confidence 0, 0.5, 1 (a labelled
# hidden joint still has a known place) and aspects.py counts a joint as there from 0.5 up.

KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
             "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
             "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
# each joint's mirror partner: a figure flipped left-right is x -> -x with these labels swapped
KEYPOINT_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
# the limbs drawn between joints, 0-based (COCO's files list the same pairs 1-based)
SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
            (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5),
            (4, 6))
V_CONFIDENCE = (0.0, 0.5, 1.0)  # COCO's v 0, 1, 2 as a confidence


def read_poses(path):
    """{relative image path: [figure, ...]} from a COCO keypoint file (`images` with id and
    file_name, `annotations` with image_id and keypoints) or from a plain list of {"file_name"
    or "path", "keypoints"}, one figure each, as MMPose and OpenPose results convert to. An
    image listed without annotations maps to []. Anything malformed is one line."""
    if not os.path.isfile(path):
        raise UserError(f"poses file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise UserError(f"{path}: not JSON ({one_line(e)})") from None
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
        return coco_figures(doc, path)
    if isinstance(doc, list):
        return listed_figures(doc, path)
    raise UserError(f"{path}: neither COCO keypoints (images + annotations lists) nor a list "
                    "of {file_name, keypoints}")


def coco_figures(doc, path):
    names, out = {}, {}
    images = doc.get("images")
    if not isinstance(images, list):
        raise UserError(f"{path}: COCO keypoints need an images list (id, file_name)")
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int | str):
            raise UserError(f"{path}: images[{i}] has no id")
        names[im["id"]] = pose_path(im.get("file_name"), path, f"images[{i}]")
        out.setdefault(names[im["id"]], [])
    for i, ann in enumerate(doc["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(image_id, int | str) or image_id not in names:
            raise UserError(f"{path}: annotations[{i}]: image_id {image_id!r} is not in images")
        out[names[image_id]].append(figure_from(ann, path, f"annotations[{i}]"))
    return out


def listed_figures(doc, path):
    out = {}
    for i, ann in enumerate(doc):
        if not isinstance(ann, dict):
            raise UserError(f"{path}: entry {i} is not an object with file_name and keypoints")
        rel = pose_path(ann.get("file_name", ann.get("path")), path, f"entry {i}")
        out.setdefault(rel, []).append(figure_from(ann, path, f"entry {i}"))
    return out


def pose_path(name, path, where):
    """An image's path as the index spells it: relative, '/'-separated, no './'."""
    why = unsafe_path(name) if isinstance(name, str) else "needs a file_name"
    if why:
        raise UserError(f"{path}: {where}: {why}" + (f": {name!r}" if name else ""))
    return posixpath.normpath(name.replace("\\", "/"))


def figure_from(ann, path, where):
    """One figure from an annotation: keypoints as 51 numbers or 17 (x, y, v) triples, or 17
    (x, y) pairs with MMPose's keypoint_scores; bbox [x, y, w, h] (else the joints' extent);
    score (else 1)."""
    k = keypoint_array(ann, path, where)
    box = ann.get("bbox")
    if box is not None:
        try:
            x, y, w, h = (float(c) for c in box)
        except (TypeError, ValueError):
            raise UserError(f"{path}: {where}: bbox must be [x, y, width, height]") from None
        box = [x, y, x + w, y + h]
    else:
        there = k[k[:, 2] > 0, :2]
        box = [*there.min(0), *there.max(0)] if len(there) else [0.0] * 4
    score = ann.get("score", 1.0)
    if not isinstance(score, int | float) or isinstance(score, bool):
        raise UserError(f"{path}: {where}: score must be a number")
    return {"box": np.asarray(box, np.float32), "keypoints": k, "score": float(score)}


def keypoint_array(ann, path, where):
    """(17, 3) float32 (x, y, confidence) from an annotation's keypoints."""
    scores = ann.get("keypoint_scores")
    bad = f"{path}: {where}: keypoints must be 17 (x, y, v) triples (51 numbers)"
    try:
        k = np.asarray(ann.get("keypoints"), np.float64)
        if scores is not None:  # MMPose: (x, y) pairs, scores apart
            k = np.concatenate([k.reshape(17, 2), np.asarray(scores, np.float64).reshape(17, 1)],
                               1)
        k = k.reshape(17, 3)
    except (TypeError, ValueError):
        raise UserError(bad + (" or 17 (x, y) pairs with 17 keypoint_scores" if scores
                               is not None else "")) from None
    if not np.isfinite(k).all():
        raise UserError(f"{path}: {where}: keypoints must be finite numbers")
    if scores is not None:
        if ((k[:, 2] < 0) | (k[:, 2] > 1)).any():
            raise UserError(f"{path}: {where}: keypoint_scores must lie in [0, 1]")
    elif not np.isin(k[:, 2], (0, 1, 2)).all():
        raise UserError(f"{path}: {where}: a keypoint's v must be 0, 1 or 2 (COCO), not "
                        f"{k[~np.isin(k[:, 2], (0, 1, 2)), 2][0]:g}")
    else:
        k[:, 2] = np.asarray(V_CONFIDENCE)[k[:, 2].astype(int)]
    return k.astype(np.float32)


def write_poses(path, poses):
    """COCO keypoint JSON that read_poses reads back, from {relative path: [figure, ...]}:
    one image per path, one annotation per figure. A confidence is written as v 2 from 0.75
    up, 1 from 0.5, else 0 (at x = y = 0, as COCO writes unlabelled joints)."""
    images, anns = [], []
    for i, (rel, figures) in enumerate(sorted(poses.items()), 1):
        images.append({"id": i, "file_name": rel})
        anns += [coco_annotation(f, i, len(anns) + j + 1) for j, f in enumerate(figures)]
    person = {"id": 1, "name": "person", "supercategory": "person",
              "keypoints": list(KEYPOINTS), "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}
    doc = {"info": {"description": "person keypoints, written by ArtExtract"},
           "images": images, "annotations": anns, "categories": [person]}
    atomic_write(path, json.dumps(doc, separators=(",", ":")) + "\n")


def coco_annotation(figure, image_id, ann_id):
    k = np.asarray(figure["keypoints"], np.float64)
    v = np.where(k[:, 2] >= 0.75, 2, np.where(k[:, 2] >= 0.5, 1, 0))
    xy = np.where(v[:, None] > 0, np.round(k[:, :2], 2), 0.0)
    x0, y0, x1, y1 = (round(float(c), 2) for c in figure["box"])
    flat = [c for (x, y), vis in zip(xy.tolist(), v.tolist(), strict=True) for c in (x, y, vis)]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "keypoints": flat, "num_keypoints": int((v > 0).sum()),
            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": round((x1 - x0) * (y1 - y0), 2), "score": round(figure.get("score", 1.0), 4)}


# ----------------------------------------------------------------------------- demo figures
# Stick figures with known joints, so that the pose and face search runs offline on the demo:
# a pose family sets the limb angles, forward kinematics gives the joints in torso lengths
# (mid-shoulder to mid-hip = 1, y down, the hips' middle at 0), and a small 3-D head turned by
# a yaw gives the face's five points and which of them show.

POSE_FAMILIES = ("standing", "arms_raised", "sitting", "bending", "walking", "pointing")
# bone lengths in torso lengths: upper arm, forearm, thigh, shin
BONES = {"upper_arm": 0.6, "forearm": 0.5, "thigh": 0.85, "shin": 0.8}
# head points (nose, left eye, right eye, left ear, right ear) around the head's centre, in
# torso lengths: across (the figure's left +), depth (towards where it faces +), down (+)
HEAD = np.array([[0.0, 0.22, 0.07], [0.07, 0.17, -0.02], [-0.07, 0.17, -0.02],
                 [0.16, 0.0, 0.02], [-0.16, 0.0, 0.02]])


def family_angles(family, rng):
    """(arm and leg angles, torso lean, half shoulder and hip widths, head yaw) of a family,
    jittered. Angles in degrees from straight down, + towards the viewer's right; a limb's
    pair is (upper bone, lower bone), both absolute; side views face the viewer's right."""
    def j(deg=12):  # a limb's own jitter, degrees
        return rng.normal(0, deg)

    side, lean = (0.08, 0.05), 0.0
    if family == "standing":
        arms, legs = ((15 + j(), 10 + j()), (-15 + j(), -10 + j())), ((5 + j(4), 5 + j(4)),
                                                                      (-5 + j(4), -5 + j(4)))
        side, yaw = (0.38, 0.2), rng.choice([0.0, 35.0, -35.0])
    elif family == "arms_raised":
        arms = ((155 + j(), 170 + j()), (-155 + j(), -170 + j()))
        legs = ((8 + j(4), 6 + j(4)), (-8 + j(4), -6 + j(4)))
        side, yaw = (0.38, 0.2), rng.choice([0.0, 30.0, -30.0])
    elif family == "sitting":  # side view, thighs forward, shins down
        arms = ((20 + j(), 70 + j()), (10 + j(), 60 + j()))
        legs, yaw = ((85 + j(8), 5 + j(8)), (80 + j(8), 0 + j(8))), 85.0
    elif family == "bending":  # side view, torso leaning forward, arms hanging
        lean, yaw = 50 + j(10), 80.0
        arms, legs = ((5 + j(), 0 + j()), (-5 + j(), 0 + j())), ((-8 + j(4), -8 + j(4)),
                                                                   (-4 + j(4), -4 + j(4)))
    elif family == "walking":  # side view, legs apart, arms swinging against them
        arms, legs = ((-25 + j(8), 5 + j(8)), (25 + j(8), 60 + j(8))), \
            ((28 + j(6), 10 + j(6)), (-22 + j(6), -35 + j(6)))
        yaw = 85.0
    elif family == "pointing":  # frontal, one arm out level, the other down
        arms = ((90 + j(8), 92 + j(8)), (-12 + j(), -8 + j()))
        legs = ((6 + j(4), 6 + j(4)), (-6 + j(4), -6 + j(4)))
        side, yaw = (0.38, 0.2), rng.choice([0.0, 60.0])
    else:
        raise ValueError(f"unknown pose family {family!r} ({', '.join(POSE_FAMILIES)})")
    return arms, legs, lean, side, float(yaw) + rng.normal(0, 5)


def limb(start, angles, lengths):
    """The two joints at the ends of a limb's bones, from its start (x, y) and angles."""
    a, b = np.radians(angles)
    mid = start + lengths[0] * np.array([math.sin(a), math.cos(a)])
    return mid, mid + lengths[1] * np.array([math.sin(b), math.cos(b)])


def demo_pose(rng, family=None, mirror=None, hide=None):
    """(17, 3) keypoints (x, y, confidence 0 or 1) of a random pose in torso lengths, the hips'
    middle at (0, 0), y down. family: one of POSE_FAMILIES (default: drawn); mirror: flipped
    left-right (default: half the time); hide: the joints left out, as a limb hidden behind
    something or cut by the frame (default: one limb a third of the time)."""
    family = family or POSE_FAMILIES[rng.integers(len(POSE_FAMILIES))]
    arms, legs, lean, (ws, wh), yaw = family_angles(family, rng)
    t = math.radians(lean)
    up, across = np.array([math.sin(t), -math.cos(t)]), np.array([math.cos(t), math.sin(t)])
    k = np.zeros((17, 3))
    k[[11, 12], :2] = [wh * across, -wh * across]  # the figure's left hip on the viewer's right
    k[[5, 6], :2] = [up + ws * across, up - ws * across]
    for (s, e, w), ang in zip(((5, 7, 9), (6, 8, 10)), arms, strict=True):
        k[[e, w], :2] = limb(k[s, :2], ang, (BONES["upper_arm"], BONES["forearm"]))
    for (h, kn, an), ang in zip(((11, 13, 15), (12, 14, 16)), legs, strict=True):
        k[[kn, an], :2] = limb(k[h, :2], ang, (BONES["thigh"], BONES["shin"]))
    k[:5] = head_points(up * 1.45, yaw)
    k[5:, 2] = 1.0
    if mirror if mirror is not None else rng.random() < 0.5:
        k = k[list(KEYPOINT_FLIP)] * [-1, 1, 1]
    hidden = hide if hide is not None else demo_hidden(rng)
    k[list(hidden), 2] = 0.0
    return k.astype(np.float32)


def head_points(centre, yaw):
    """(5, 3) nose, eyes, ears (x, y, shown) of a head at centre turned by yaw degrees (+ to
    the viewer's right): seen from the front, orthographically; a point on the far side of the
    head is not shown."""
    c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    across, depth, down = HEAD.T
    x = across * c + depth * s  # yaw 0: the figure's left (across +) on the viewer's right
    towards_us = depth * c - across * s
    shown = towards_us > -0.03
    return np.stack([centre[0] + x, centre[1] + down, shown.astype(float)], 1)


def demo_hidden(rng):
    """The joints of one limb a third of the time (an arm, a leg, or both legs), else none."""
    if rng.random() > 1 / 3:
        return ()
    return [(7, 9), (8, 10), (13, 15), (14, 16), (13, 14, 15, 16)][rng.integers(5)]


def draw_figure(im, keypoints, colour, width):
    """A stick figure on a PIL image, in place: the shown limbs as lines `width` px thick, the
    torso filled, a head disc; keypoints (17, 3) in the image's pixels."""
    draw, k = ImageDraw.Draw(im), np.asarray(keypoints, np.float64)
    there = k[:, 2] > 0
    for a, b in SKELETON:
        if a >= 5 and there[a] and there[b]:
            draw.line([tuple(k[a, :2]), tuple(k[b, :2])], fill=colour, width=width)
    for j in np.flatnonzero(there[5:]) + 5:  # round joints
        x, y = k[j, :2]
        draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=colour)
    if there[[5, 6, 11, 12]].all():
        draw.polygon([tuple(k[j, :2]) for j in (5, 6, 12, 11)], fill=colour)
    head = k[:5][there[:5], :2]
    if len(head):
        (x, y), r = head.mean(0), 2 * width  # ~0.26 torso lengths, as a head is
        if there[[5, 6]].all():  # the neck
            draw.line([tuple(k[[5, 6], :2].mean(0)), (x, y)], fill=colour, width=width)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def demo_figures(im, rng, most=2):
    """Paint 0 to `most` stick figures (random poses, placed and scaled to fit) onto a PIL
    image, in place; returns their figures (box and keypoints in the image's pixels), the
    poses file's entries for this image."""
    figures = []
    for _ in range(int(rng.integers(0, most + 1))):
        k = demo_pose(rng)
        lo, hi = k[:, :2].min(0) - 0.3, k[:, :2].max(0) + 0.3  # + the head disc and limb width
        scale = rng.uniform(0.35, 0.8) * min(im.height / (hi[1] - lo[1]),
                                             im.width / (hi[0] - lo[0]))  # px per torso length
        at = rng.uniform(0, 1, 2) * (np.array(im.size) - scale * (hi - lo)) - scale * lo
        k[:, :2] = k[:, :2] * scale + at
        tone = np.asarray(im.convert("L"), np.float64).mean()
        colour = tuple(int(c) for c in (rng.uniform(0, 60, 3) if tone > 110 else
                                        rng.uniform(190, 255, 3)))
        draw_figure(im, k, colour, max(2, round(0.13 * scale)))
        shown = k[k[:, 2] > 0, :2]
        figures.append({"box": np.concatenate([shown.min(0), shown.max(0)]).astype(np.float32),
                        "keypoints": k, "score": 1.0})
    return figures


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


def demo_tail_sizes(n, ratio):
    """Class sizes falling geometrically, largest : smallest = ratio, summing to n (largest
    remainders), each at least 1: n 360, ratio 100 -> 218, 87, 34, 14, 5, 2."""
    k = len(DEMO_STYLES)
    share = ratio ** (-np.arange(k) / (k - 1))
    raw = n * share / share.sum()
    sizes = np.maximum(np.floor(raw).astype(int), 1)
    for c in np.argsort(-(raw - np.floor(raw)), kind="stable")[:max(0, n - sizes.sum())]:
        sizes[c] += 1
    return sizes


def demo_tail_styles(n, ratio, rng):
    """--tail: the style of each of n images, exact geometric class sizes in a seeded order of
    the styles (the rarest is not always the same one), shuffled."""
    if n < len(DEMO_STYLES) or ratio < 1:
        raise UserError(f"--tail {ratio} --n {n}: need a ratio >= 1 and at least "
                        f"{len(DEMO_STYLES)} images (one per style)")
    order = rng.permutation(len(DEMO_STYLES))
    styles = np.repeat(order, demo_tail_sizes(n, ratio))
    return rng.permutation(styles).tolist()


def demo_pick(i, hands, tail, rng):
    """(artist, style) of image i. Balanced demo: artists take turns and paint one of their two
    styles 80% of the time. --tail: the style is given, and 80% of the time painted by one of
    the two artists who favour it."""
    if tail is None:
        a = i % len(hands)
        st = int(rng.choice(hands[a]["styles"])) if rng.random() < 0.8 else \
            int(rng.integers(len(DEMO_STYLES)))
        return a, st
    st = tail[i]
    fans = [a for a, h in enumerate(hands) if st in h["styles"]]
    return (int(rng.choice(fans)) if rng.random() < 0.8 else int(rng.integers(len(hands)))), st


def cmd_demo(args):
    args.out = args.out or ("demo-tail" if args.tail else "demo")
    rng = np.random.default_rng(args.seed)
    hands = demo_artists(rng)
    items, prog, reused = [], Progress(args.n, "demo", every=5.0), 0
    tail = demo_tail_styles(args.n, args.tail, rng) if args.tail else None
    for i in range(args.n):
        a, st = demo_pick(i, hands, tail, rng)
        hand = hands[a]
        g = int(rng.integers(len(DEMO_GENRES)))
        path = f"{DEMO_STYLES[st]}/{hand['slug']}_{DEMO_GENRES[g].replace('_', '-')}-{i}.jpg"
        # painted every time, so that the random stream (and all that follows) never depends
        # on which files a previous run left: the same command gives the same data
        reused += write_if_changed(os.path.join(args.out, "images", path),
                                   demo_painting(DEMO_STYLES[st], DEMO_GENRES[g], hand, rng))
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
           "--per-class", "0", "--min-per-class", "1", "--split", "random", "--val-frac", "0.25",
           "--seed", str(args.seed)]
    cmd_wikiart(build_parser().parse_args(sub))
    write_demo_gallery(args.out, items)
    if reused:
        print(f"{reused} of the {args.n} images were already in {args.out} with the same bytes "
              "(kept as they were)")
    listed = {os.path.normpath(it["path"]) for it in items}
    others = [p for p in scan_files(os.path.join(args.out, "images")) if p not in listed]
    if others:
        print(f"note: {len(others)} other files in {os.path.join(args.out, 'images')} are not "
              f"part of this demo (another --seed or --n?), e.g. {others[0]}; the manifests "
              "leave them out")
    print(f"SYNTHETIC demo data (not real paintings): {args.n} images in "
          f"{os.path.join(args.out, 'images')}; classification manifest "
          f"{os.path.join(args.out, 'manifest.csv')}; retrieval gallery "
          f"{os.path.join(args.out, 'gallery.csv')}")
    return 0


def write_if_changed(dest, im):
    """Saves im as a q90 JPEG at dest unless dest holds those very bytes; 1 if it did."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    if os.path.isfile(dest):
        with open(dest, "rb") as f:
            if f.read() == buf.getvalue():
                return 1
    atomic_write(dest, buf.getvalue(), "wb")
    return 0


def scan_files(root):
    """Relative paths (os.sep) of every file under root."""
    return [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
            for f in files]


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

def add_balance_args(p):
    p.add_argument("--tasks", default="style,artist,genre", help="label columns to carry")
    p.add_argument("--balance-on", default="style", help="task whose classes are balanced")
    p.add_argument("--per-class", type=int, default=500,
                   help="cap per class (0: no cap); --split official caps train only")
    p.add_argument("--min-per-class", type=int, default=SMALL_CLASS,
                   help="drop classes with fewer usable (train) images, named; below "
                   f"{SMALL_CLASS} (too few to learn) the small classes kept are named in a "
                   "warning")


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
                       "converted once into a resized cache", formatter_class=Help)
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
                                formatter_class=Help)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("wikiart", help="class-balanced subset from the ArtGAN WikiArt lists",
                       formatter_class=Help)
    w.add_argument("--lists", required=True, help="folder of the ArtGAN list files")
    w.add_argument("--out", required=True, help="writes OUT/manifest.csv and OUT/classes.json")
    add_balance_args(w)
    add_split_args(w, ("official", "random", "artist"))
    w.add_argument("--images", help="image folder or .zip (read in place): keep only images "
                   "that are there and decode; the others are listed in OUT/unusable.csv")
    w.set_defaults(func=cmd_wikiart)

    n = sub.add_parser("nga", help="paintings with images from the NGA open-data CSVs",
                       formatter_class=Help)
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
                       formatter_class=Help)
    d.add_argument("--manifest", required=True, help="CSV with path and url columns")
    d.add_argument("--root", required=True, help="images go to ROOT/<path>")
    d.add_argument("--size", type=int, default=512, help="IIIF size to ask for (0: url as is)")
    d.add_argument("--workers", type=int, default=4, help="requests in flight at most")
    d.add_argument("--retries", type=int, default=5, help="tries after the first, per file")
    d.add_argument("--backoff", type=float, default=1.0, help="first retry wait, s (x2 each)")
    d.add_argument("--timeout", type=float, default=30.0, help="per request, s")
    d.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                   help="largest response accepted per file, bytes")
    d.add_argument("--failures", help="CSV of failures (default ROOT/download_failures.csv)")
    d.set_defaults(func=cmd_download)

    r = sub.add_parser("resize", help="pre-resize a manifest's images into a cache folder",
                       formatter_class=Help)
    r.add_argument("--manifest", required=True, help="CSV with a path column")
    r.add_argument("--root", required=True, help="original images: a folder, or a .zip read "
                   "in place (bad members are listed in OUT/unreadable.csv)")
    r.add_argument("--out", required=True, help="cache folder, same relative paths")
    r.add_argument("--size", type=int, default=256, help="shorter side, px")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decoding threads")
    r.set_defaults(func=cmd_resize)

    add_hf_parser(sub)

    m = sub.add_parser("demo", help="small SYNTHETIC dataset in the real formats",
                       formatter_class=Help)
    m.add_argument("--out", help="writes images/, lists/ and the manifests (default: demo, "
                   "demo-tail with --tail)")
    m.add_argument("--n", type=int, default=360, help="number of images")
    m.add_argument("--tail", type=float, metavar="RATIO",
                   help="a long tail: style class sizes fall geometrically, largest : smallest "
                   "= RATIO (100: 218, 87, 34, 14, 5, 2 of 360), same painter and label noise")
    m.add_argument("--seed", type=int, default=0, help="the same seed gives the same data")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    tolerant_stdout()
    try:
        status = args.func(args)
    except UserError as e:
        raise SystemExit(f"data.py: error: {e}") from None
    except OSError as e:  # a full disk, a folder not ours
        raise SystemExit(f"data.py: error: {os_error_line(e)}") from None
    if status:  # failures were listed above; the shell (or notebook) sees the status
        raise SystemExit(status)
    return status


if __name__ == "__main__":
    main()
