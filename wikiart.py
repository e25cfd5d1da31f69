"""The WikiArt rules: the ArtGAN list files read, class-balanced subsets, the three split rules
(official, random, artist) and a subset's manifest and class lists written.

Holds no command line (data.py), no download and no image decoding beyond checking a member
(files.py); `wikiart` and `hf-wikiart` both make their subsets here.

    import wikiart
    labels, classes, in_val = wikiart.load_wikiart("wikiart_csv", ["style", "genre"])
"""

import json
import os
import random
from collections import Counter, defaultdict

from files import UserError, atomic_write, check_member, unsafe_path, write_csv

TASKS = ("style", "artist", "genre")
# A class with fewer train images than this is too small to learn (or to score): subsets leave
# it out unless --min-per-class is set below it, and crnn.py names it at training start.
SMALL_CLASS = 5


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
                    held=frozenset(), to_train=None):
    """Per class of `task` (sorted, then seeded shuffle): up to per_class usable paths, plus
    every usable path in `held` (test images: never capped, not counted for the cap or for
    min_per_class). to_train: n -> how many of a class's n paths the split will leave to train
    (train_counter): min_per_class counts those. Returns ({class: paths}, {dropped class: the
    count compared}, [(path, why unusable)]).

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
        capped = per_class and len(keep) >= per_class  # a large class, cut: --per-class rules
        n = to_train(len(keep)) if to_train and not capped else len(keep)
        if n < max(min_per_class, 1):
            dropped[c] = n
        else:
            chosen[c] = keep + kept_held
    return chosen, dropped, bad


def report_small(chosen, dropped, min_per_class, held=frozenset(), to_train=None):
    """Names the classes balanced_subset dropped, and warns of the classes it kept with fewer
    than SMALL_CLASS images that go to train (held ones, the test lists, do not count; nor do
    those to_train says the split takes out)."""
    what = "usable train images" if held or to_train else "usable images"
    for c, n in dropped.items():
        print(f"dropped class {c}: {n} {what} < --min-per-class {min_per_class}"
              + (" (too few to learn)" if n < SMALL_CLASS else ""))
    small = {c: sum(p not in held for p in ps) for c, ps in chosen.items()}
    small = {c: to_train(n) if to_train else n for c, n in small.items()}
    small = {c: n for c, n in small.items() if n < SMALL_CLASS}
    if small:
        names = ", ".join(f"{c} ({n})" for c, n in sorted(small.items(), key=lambda x: x[1]))
        print(f"warning: {len(small)} class{'es' if len(small) > 1 else ''} kept with fewer than "
              f"{SMALL_CLASS} {what}, too few to learn (--min-per-class {min_per_class} or "
              f"--per-class asks for them): {names}; the defaults leave them out")


# ----------------------------------------------------------------------------- split rules
# One split column shared by every task (a multi-task model must never train on an image
# another task evaluates). random: today's train/val; official: the ArtGAN val lists are test,
# as in the papers; artist: test and dev painters are never seen in training.

def stratified_out(frac, n):
    """How many of a class's n paths stratified_split sends out of train."""
    n_out = round(frac * n)
    return min(max(n_out, 1), n - 1) if frac > 0 and n >= 2 else n_out


def train_counter(args):
    """n -> how many of a class's n images (held test lists apart) go to train under --split,
    for the --min-per-class floor; None where whole artists are split (no count per class)."""
    if args.split == "official":
        return lambda n: n - stratified_out(args.dev_frac, n)
    if args.split == "random":
        return lambda n: n - stratified_out(args.val_frac, n)
    return None


def stratified_split(chosen, frac, seed, name="val"):
    """{path: name|'train'}: per class, round(frac * n) to `name` (>= 1 when n >= 2)."""
    rng = random.Random(seed + 1)
    split = {}
    for c in sorted(chosen):
        paths = sorted(chosen[c])
        rng.shuffle(paths)
        n_out = stratified_out(frac, len(paths))
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
