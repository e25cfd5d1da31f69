"""Your own paintings: a manifest from a folder tree (labels from the folder names, as
torchvision's ImageFolder) or from any CSV of image paths and labels, split by wikiart.py's rules.

Holds no command line (data.py's `folder` and `csv` call cmd_folder and cmd_csv here) and no
split rule of its own beyond `random` with a dev and a test part (wikiart.stratified_split twice).

Shell:
    python data.py folder --images paintings --out mine          # paintings/<style>/x.jpg
    python data.py folder --images paintings --levels style,artist --out mine --split artist
    python data.py csv --csv labels.csv --path-col file --label-cols style,artist \
        --images paintings --out mine --split group:collection

The manifest (OUT/manifest.csv: path, the label columns, split) and OUT/classes.json are those
`data.py wikiart` writes, so crnn.py and retrieve.py read them unchanged (with --root IMAGES).
"""

import argparse
import os
import re
from collections import Counter

import files
import wikiart
from files import UserError

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a label column: a CSV header and a JSON key
RESERVED = ("path", "split")


def parse_names(text, flag):
    """--levels / --label-cols as a list of distinct label names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if not NAME.match(t) or t in RESERVED]
    if bad or not names or len(set(names)) < len(names):
        raise UserError(f"{flag} {text!r}: expected a comma list of distinct label names "
                        f"(letters, digits and _, not {' or '.join(RESERVED)})")
    return names


def split_rule(text):
    """argparse type of --split: random, artist or group:COLUMN."""
    if text in ("random", "artist") or (text.startswith("group:") and len(text) > 6):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected random, artist or group:COLUMN")


def folder_labels(source, levels, skip_dir):
    """{path: {level: folder name}} for the image files at least len(levels) folders deep under
    the source (deeper folders do not label, as in torchvision's ImageFolder); prints how many
    files were left out and why."""
    labels, shallow, other = {}, [], 0
    for rel in source.members(skip_dir=skip_dir):
        if not rel.lower().endswith(files.IMAGE_EXTS):
            other += 1
            continue
        parts = rel.split("/")
        if len(parts) <= len(levels):
            shallow.append(rel)
            continue
        labels[rel] = dict(zip(levels, parts, strict=False))
    if shallow:
        print(f"left out {len(shallow)} images less than {len(levels)} folder(s) deep "
              f"(<{'>/<'.join(levels)}>/image), e.g. {shallow[0]}")
    if other:
        print(f"left out {other} files that are not images by their extension "
              f"({' '.join(files.IMAGE_EXTS)})")
    return labels


def cmd_folder(args):
    levels = parse_names(args.levels, "--levels")
    source = files.image_source(args.images)
    labels = folder_labels(source, levels, args.out)
    if not labels:
        raise UserError(f"no images {len(levels)} folder(s) deep or more in {args.images} "
                        f"(expected "
                        f"{args.images}/<{'>/<'.join(levels)}>/image.jpg; --levels names the "
                        "folders)")
    groups = {p: dict(lab) for p, lab in labels.items()}  # before thin_labels empties some
    return write_manifest(args, labels, levels, source, groups)


def csv_paths(rows, path_col, images):
    """The CSV's paths as paths under the image root: relative ones as they are (under --images),
    absolute ones relative to their common folder when there is no --images. Returns
    ({row index: path}, root)."""
    raw = {i: r[path_col].strip().replace("\\", "/") for i, r in enumerate(rows)
           if r[path_col].strip()}
    absolute = [p for p in raw.values() if os.path.isabs(p)]
    if absolute and not images and len(absolute) == len(raw):
        root = os.path.commonpath([os.path.dirname(p) for p in absolute])
        return {i: os.path.relpath(p, root).replace(os.sep, "/") for i, p in raw.items()}, root
    unsafe = [p for p in raw.values() if files.unsafe_path(p)]
    if unsafe:
        raise UserError(f"{len(unsafe)} paths in --path-col are absolute or leave the image "
                        f"root (e.g. {unsafe[0]!r}): give paths relative to --images (or all "
                        "absolute, without --images)")
    return raw, images or "."


def cmd_csv(args):
    cols = parse_names(args.label_cols, "--label-cols")
    rows = files.read_csv(args.csv, (args.path_col, *cols), what="--csv")
    if not rows:
        raise UserError(f"--csv {args.csv}: no rows")
    paths, root = csv_paths(rows, args.path_col, args.images)
    if not args.images:
        print(f"image root: {root} (paths in {args.csv} are read under it; pass --images to "
              "check what decodes)")
    labels, groups, clash = {}, {}, Counter()
    for i, p in paths.items():
        lab = {t: rows[i][t].strip() for t in cols if rows[i][t].strip()}
        if p in labels:  # listed twice: a label the two rows disagree on is left empty
            clash.update(t for t in cols if labels[p].get(t) != lab.get(t))
            labels[p] = {t: v for t, v in lab.items() if labels[p].get(t) == v}
            continue
        labels[p], groups[p] = lab, {k: (v or "").strip() or None for k, v in rows[i].items()}
    if clash:
        print("paths listed twice with other labels, left unlabelled for that column: "
              + ", ".join(f"{t} {n}" for t, n in clash.items()))
    args.root = root
    source = files.image_source(args.images) if args.images else None
    return write_manifest(args, labels, cols, source, groups)


def group_of(rule, groups, labels, tasks):
    """{path: group} for --split artist (the artist label) or group:COLUMN; None for random."""
    if rule == "random":
        return None
    col = "artist" if rule == "artist" else rule.split(":", 1)[1]
    some = next(iter(groups.values()))
    if col not in some:
        where = "--levels" if rule == "artist" or col in tasks else "the CSV's columns"
        raise UserError(f"--split {rule}: no {col} column (have: {', '.join(some)}); name one "
                        f"of {where}, or use --split random")
    return {p: g.get(col) for p, g in groups.items() if p in labels}


def train_counter(args):
    """n -> how many of a class's n images own_split leaves to train (random: the stratified
    test, then dev, taken out), for --min-per-class; None for whole groups."""
    if args.split != "random":
        return None

    def left(n):
        rest = n - wikiart.stratified_out(args.test_frac, n)
        return rest - wikiart.stratified_out(args.dev_frac, rest)
    return left


def own_split(args, chosen, groups):
    """{path: train|dev|test}: random = a stratified --test-frac, then a stratified --dev-frac
    of the rest, per class of the first label column; by group = whole groups (wikiart's
    artist rule), none shared between train, dev and test."""
    if groups is not None:
        rule = argparse.Namespace(split="artist", balance_on=args.task, test_frac=args.test_frac,
                                  dev_frac=args.dev_frac, seed=args.seed, val_frac=0.0)
        return wikiart.make_split(rule, chosen, {}, groups)
    split = wikiart.stratified_split(chosen, args.test_frac, args.seed, "test")
    rest = {c: [p for p in ps if split[p] == "train"] for c, ps in chosen.items()}
    split.update(wikiart.stratified_split(rest, args.dev_frac, args.seed + 10, "dev"))
    n = Counter(split.values())
    print(f"split random: {n['test']} test (--test-frac {args.test_frac}) and {n['dev']} dev "
          f"(--dev-frac {args.dev_frac}) per {args.task} class, {n['train']} train")
    for s in ("dev", "test"):
        lacking = [c for c, ps in chosen.items() if not any(split[p] == s for p in ps)]
        if lacking:
            print(f"warning: {len(lacking)} {args.task} classes have no {s} image (too few "
                  f"images): {', '.join(lacking[:8])}{' ...' if len(lacking) > 8 else ''}")
    return split


def thin_labels(labels, kept, tasks, least, split=None):
    """Labels of the other tasks' classes with fewer than `least` images among `kept` (train
    images where split {path: train|dev|test} is given: a random split's) are left empty (the
    images stay, for the first task): too few to learn or to score. A group split counts all:
    its held-out groups have no train image by design."""
    for t in tasks:
        n = Counter(labels[p][t] for p in kept
                    if labels[p].get(t) and (split is None or split[p] == "train"))
        have = {labels[p][t] for p in kept if labels[p].get(t)}
        small = {c for c in have if n[c] < least}
        if not small:
            continue
        for p in kept:
            if labels[p].get(t) in small:
                del labels[p][t]
        print(f"{t}: {len(small)} of {len(have)} classes have fewer than --min-per-class {least} "
              f"{'train ' if split else ''}images: their labels left empty "
              f"(e.g. {sorted(small)[0]}); {len(have) - len(small)} classes kept")


def write_manifest(args, labels, tasks, source, groups):
    """The subset and split of `data.py wikiart` over {path: {task: label}}: classes of the
    first task with fewer than --min-per-class usable images dropped (the images decode when
    source is given), then the other tasks thinned, split, written."""
    wikiart.check_fracs(argparse.Namespace(split="artist", val_frac=0.0,
                                           dev_frac=args.dev_frac, test_frac=args.test_frac))
    args.task = task = tasks[0]
    classes = {t: sorted({lab[t] for lab in labels.values() if lab.get(t)}) for t in tasks}
    before = Counter(lab[task] for lab in labels.values() if lab.get(task))
    if sum(before.values()) < len(labels):
        print(f"{len(labels) - sum(before.values())} images without a {task} label left out "
              f"(the first label column is the one every image needs)")
    print(wikiart.count_table(f"{task}: {sum(before.values())} labelled images", before,
                              classes[task]))
    to_train = train_counter(args)
    chosen, dropped, bad = wikiart.balanced_subset(labels, classes[task], task, args.per_class,
                                                   args.min_per_class, args.seed, source,
                                                   to_train=to_train)
    os.makedirs(args.out, exist_ok=True)
    wikiart.report_unusable(args.out, bad)
    wikiart.report_small(chosen, dropped, args.min_per_class, to_train=to_train)
    if not chosen:
        raise UserError("nothing left after filtering (lower --min-per-class, or check --images)")
    kept = [p for ps in chosen.values() for p in ps]
    split = own_split(args, chosen, group_of(args.split, groups, labels, tasks))
    thin_labels(labels, kept, tasks[1:], args.min_per_class,
                split if args.split == "random" else None)
    wikiart.write_subset(args.out, tasks, task, labels, classes, split)
    root = getattr(args, "root", None) or args.images
    print("next: python crnn.py --train --data " + os.path.join(args.out, "manifest.csv")
          + ("" if os.path.abspath(root) == os.path.abspath(os.path.join(args.out, "images"))
             else f" --root {root}"))
    return 0


def add_parsers(sub):
    """data.py's `folder` and `csv` subcommands."""
    f = sub.add_parser("folder", help="a manifest from a folder tree: DIR/<style>/x.jpg, labels "
                       "from the folder names", formatter_class=files.Help)
    f.add_argument("--images", required=True, help="the folder (or a .zip) of class folders")
    f.add_argument("--levels", default="style", help="the label each folder level gives, "
                   "outermost first: style,artist reads DIR/<style>/<artist>/x.jpg")
    add_own_args(f)
    f.set_defaults(func=cmd_folder)
    c = sub.add_parser("csv", help="a manifest from a CSV of image paths and labels",
                       formatter_class=files.Help)
    c.add_argument("--csv", required=True, help="a headed CSV, one row per image")
    c.add_argument("--path-col", default="path", help="the column of image paths (relative to "
                   "--images, or all absolute)")
    c.add_argument("--label-cols", required=True, help="label columns, e.g. style,artist; the "
                   "first is the one every image needs, split and filtered by class")
    c.add_argument("--images", help="the image folder or .zip the paths are under: keep only "
                   "images that are there and decode (the others listed in OUT/unusable.csv)")
    add_own_args(c)
    c.set_defaults(func=cmd_csv)


def add_own_args(p):
    p.add_argument("--out", required=True, help="writes OUT/manifest.csv and OUT/classes.json")
    p.add_argument("--split", default="random", type=split_rule, help="random: a stratified "
                   "--test-frac and --dev-frac per class of the first label; artist: whole "
                   "artists (the artist label) to test and dev; group:COLUMN: whole groups of "
                   "a column (a CSV column or a --levels name), none shared with train")
    p.add_argument("--test-frac", type=float, default=0.2, help="test share (--eval reports on it)")
    p.add_argument("--dev-frac", type=float, default=0.1, help="dev share (selects best.pt)")
    p.add_argument("--min-per-class", type=int, default=wikiart.SMALL_CLASS,
                   help="per label column: the first column's classes with fewer usable images "
                   "are dropped with their images, the other columns' are left unlabelled")
    p.add_argument("--per-class", type=int, default=0, help="cap per class of the first label "
                   "(0: no cap)")
    p.add_argument("--seed", type=int, default=0, help="the subset and the split")
