"""What the CNN-RNN reads: a manifest as a label table (classes, splits, repeated paths, leaks,
missing images), the batches that feed it (seeded epochs, rank shares) and the frozen-feature cache.

Holds no model, no loss and no optimizer (crnn_model.py, crnn_train.py) and no command line
(crnn.py): the same table and batches serve --train and --eval.

    import crnn_data
    table = crnn_data.read_table("demo/manifest.csv", "demo/classes.json")   # y: (n, tasks)
    batches = crnn_data.EpochBatches(rows, 32, seed=0)    # the same order for (seed, epoch)
"""

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

import data
import files
import nets
import wikiart
from crnn_model import to_device
from files import UserError, one_line

# ----------------------------------------------------------------------------- the label table

@dataclass
class Table:
    """A manifest as arrays: y[i, j] = class index of row i for tasks[j], -1 = no label."""
    paths: list
    split: np.ndarray
    tasks: list
    classes: dict
    y: np.ndarray


def read_class_file(path):
    """{task: [names]} from a classes.json (data.py writes one beside each manifest), or {}."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            listed = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read class lists {path}: {one_line(e)}") from None
    if not isinstance(listed, dict):
        raise UserError(f"{path}: expected {{task: [class names]}}")
    return {t: [str(c) for c in names] for t, names in listed.items()}


def class_lists(rows, tasks, path):
    """{task: names} from classes.json where it lists the task, else the sorted labels seen."""
    listed = read_class_file(path)
    return {t: listed[t] if t in listed else sorted({r[t] for r in rows if r.get(t)})
            for t in tasks}


def read_table(manifest, classes_path, tasks=None, classes=None, drop_leaks=False, whose=None):
    """Rows of a manifest with a split column; labels checked against the class lists (of
    `whose`, named in the error: a checkpoint's, for --eval)."""
    rows = split_hygiene(files.read_manifest(manifest, ("path", "split")), manifest, drop_leaks)
    known = dict.fromkeys([*wikiart.TASKS, *read_class_file(classes_path)])  # data.py folder/csv
    have = [t for t in known if any(r.get(t) for r in rows)]
    tasks = have if tasks is None else tasks
    missing = [t for t in tasks if t not in have]
    if missing:
        raise UserError(f"--tasks {','.join(tasks)!r}: {manifest} has no {missing[0]} labels "
                        f"(tasks with labels here: {', '.join(have) or 'none'})")
    if not tasks:
        raise UserError(f"{manifest}: no label column with labels (expected style, artist or "
                        f"genre; header: {','.join(rows[0])})")
    classes = classes or class_lists(rows, tasks, classes_path)
    index = {t: {c: i for i, c in enumerate(classes[t])} for t in tasks}
    y = np.full((len(rows), len(tasks)), -1, np.int64)
    for i, r in enumerate(rows):
        for j, t in enumerate(tasks):
            if r.get(t):
                if r[t] not in index[t]:
                    raise UserError(f"{manifest} line {i + 2}: {t} {r[t]!r} is not in the "
                                    f"class list ({len(classes[t])} {t} classes"
                                    + (f" of {whose})" if whose else ")"))
                y[i, j] = index[t][r[t]]
    return Table([r["path"] for r in rows], np.array([r["split"] for r in rows]), tasks,
                 classes, y)


def split_hygiene(rows, manifest, drop_leaks):
    """The rows with repeated paths collapsed; a path in two splits is refused (a model would
    train on images it is selected or evaluated on), or with drop_leaks left out of train."""
    leaks = data.split_leaks(rows)
    if leaks and not drop_leaks:
        p = sorted(leaks)[0]
        raise UserError(f"{manifest}: {len(leaks)} paths stand in more than one split (e.g. "
                        f"{p!r} in {' and '.join(sorted(leaks[p]))}): fix the manifest, or pass "
                        "--drop-leaks to leave them out of train")
    first, n_rows, dropped = {}, len(rows), 0
    for r in rows:
        if r["path"] in leaks and r["split"] == "train":
            dropped += 1
            continue
        first.setdefault(r["path"], r)
    rows, said = list(first.values()), []
    if n_rows - dropped > len(rows):
        said.append(f"{n_rows - dropped - len(rows)} repeated rows read once")
    if leaks:
        said.append(f"{len(leaks)} paths left out of train (--drop-leaks)")
    if said:
        print(f"note: {manifest}: {'; '.join(said)}")
    return rows


def train_tasks(text):
    """--tasks style,genre -> ['style', 'genre']; None (every task with labels) when not given."""
    if not text:
        return None
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:  # names are checked against the manifest's label columns (read_table)
        raise UserError(f"--tasks {text!r}: expected a comma list of label columns, e.g. "
                        f"{','.join(wikiart.TASKS)}")
    return list(dict.fromkeys(tasks))


def selection_split(table):
    """Where best.pt is chosen: dev when the manifest has one, else val (older manifests)."""
    return "dev" if (table.split == "dev").any() else "val"


def unseen_classes(table, split):
    """{task: names of classes labelled in `split` but never in train}: those images can only
    be scored wrong, and a per-class recall of 0 would otherwise pass without comment."""
    out = {}
    for j, t in enumerate(table.tasks):
        seen = set(table.y[table.split == "train", j].tolist())
        there = set(table.y[table.split == split, j].tolist()) - {-1}
        if there - seen:
            out[t] = [table.classes[t][c] for c in sorted(there - seen)]
    return out


def warn_unseen(table, split, show=True):
    lines = [f"warning: {t}: {split} classes never seen in train (always scored wrong): "
             f"{', '.join(names)}" for t, names in unseen_classes(table, split).items()]
    for ln in lines if show else ():
        print(ln)
    return lines


def check_images(table, args):
    """The table training reads, once its train and selection images are known to be there (a
    stat per row, or a zip lookup): most of them missing (another --root? a partial download)
    is one line, not an epoch of skips; --skip-missing leaves the missing rows out."""
    src, sel = files.image_source(args.root, must_exist=False), selection_split(table)
    used = np.flatnonzero((table.split == "train") | (table.split == sel))
    gone = [i for i in used if not src.exists(table.paths[i])]
    if not gone:
        return table
    what = (f"{len(gone)} of the {len(used)} train and {sel} images are not in {args.root} "
            f"(e.g. {', '.join(table.paths[i] for i in gone[:3])})")
    if args.skip_missing:
        print(f"{what}: left out (--skip-missing)")
        keep = np.setdiff1d(np.arange(len(table.paths)), gone)
        return Table([table.paths[i] for i in keep], table.split[keep], table.tasks,
                     table.classes, table.y[keep])
    if 2 * len(gone) > len(used):
        raise UserError(f"{what}: is --root right? --skip-missing trains on the "
                        f"{len(used) - len(gone)} there")
    print(f"note: {what}: skipped in every epoch and listed in skipped.csv (--skip-missing "
          "leaves them out)")
    return table


def announce_splits(table, manifest):
    """Print where best.pt is selected, over which classes, and which classes no train image
    has or too few have; returns the split."""
    sel = selection_split(table)
    print(f"selecting best.pt on {sel}" + ("" if sel == "dev" else
          f" ({manifest} has no dev split; --eval reports on test, or on this val if there is "
          "no test, where the scores are optimistic)") + ": the best mean over tasks of "
          "macro-F1, each averaged over the task's classes in the split or predicted (" +
          ", ".join(f"{t} {len(table.classes[t])}" for t in table.tasks) + ")")
    for j, t in enumerate(table.tasks):
        there = set(table.y[table.split == sel, j].tolist())
        absent = [c for i, c in enumerate(table.classes[t]) if i not in there]
        if absent:
            k = len(table.classes[t])
            print(f"  {t}: no {sel} image of {', '.join(absent)} ({len(absent)} of {k}): "
                  "left out of that macro-F1 unless predicted (then F1 0)")
    for s in sorted(set(table.split.tolist()) - {"train"}):
        warn_unseen(table, s)
    warn_small(table)
    return sel


def warn_small(table):
    """One warning per task naming the classes with 1 to wikiart.SMALL_CLASS - 1 train images."""
    for j, t in enumerate(table.tasks):
        counts = class_counts(table.y[table.split == "train", j], len(table.classes[t]))
        small = [f"{table.classes[t][c]} ({counts[c]})" for c in np.argsort(counts, kind="stable")
                 if 0 < counts[c] < wikiart.SMALL_CLASS]
        if small:
            print(f"warning: {t}: {len(small)} class{'es have' if len(small) > 1 else ' has'} "
                  f"fewer than {wikiart.SMALL_CLASS} train images, too few to learn: "
                  f"{', '.join(small)}; kept, trained on and "
                  "counted in macro-F1 like any class (data.py leaves such classes out of a "
                  f"subset unless --min-per-class is under {wikiart.SMALL_CLASS})")


def learnable_tasks(table, typed):
    """The table without the tasks too thin to learn when --tasks is not typed: a median under
    wikiart.SMALL_CLASS train images per class (186 artists over 433 images learn nothing, and
    their macro-F1, noise, would be half of the mean that chooses best.pt). One line each says
    why and how to keep it; the task with the most per class always stays."""
    if typed:
        return table
    tr = table.y[table.split == "train"]
    med = {t: float(np.median(class_counts(tr[:, j], len(table.classes[t]))))
           for j, t in enumerate(table.tasks)}
    keep = [t for t in table.tasks if med[t] >= wikiart.SMALL_CLASS] or \
        [max(table.tasks, key=med.get)]
    for t in table.tasks:
        if t not in keep:
            print(f"left out {t}: a median of {med[t]:g} train images per class over its "
                  f"{len(table.classes[t])} classes, under {wikiart.SMALL_CLASS}: too few to "
                  f"learn (--tasks {','.join([*keep, t])} keeps it)")
    idx = [table.tasks.index(t) for t in keep]
    return Table(table.paths, table.split, keep, {t: table.classes[t] for t in keep},
                 table.y[:, idx])


def class_counts(y, n):
    return np.bincount(y[y >= 0], minlength=n)


# ----------------------------------------------------------------------------- batches

def epoch_seed(seed, epoch):
    return seed * 1_000_003 + epoch


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(_):
    s = torch.initial_seed() % 2**32  # DataLoader gives each worker base_seed + id
    np.random.seed(s)
    random.seed(s)


class EpochBatches:
    """Batch sampler whose order depends only on (seed, epoch), so a resumed run draws the same
    batches as an uninterrupted one. weights: per-index draw weights (with replacement).
    seeds: iterating yields [(row, augmentation seed)] for Augmented instead of rows."""

    def __init__(self, indices, batch_size, seed, weights=None, seeds=False):
        self.indices, self.batch_size, self.seed = np.asarray(indices), batch_size, seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.seeds = seeds
        self.set_epoch(1)

    def set_epoch(self, epoch):
        g, n = torch.Generator().manual_seed(epoch_seed(self.seed, epoch)), len(self.indices)
        if self.weights is None:
            order = torch.randperm(n, generator=g)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        picked = self.indices[order.numpy()]
        self.batches = [picked[i:i + self.batch_size].tolist()
                        for i in range(0, n, self.batch_size)]
        # one seed per draw, after the order (which stays as it was): mt19937 keeps 32 bits
        draws = torch.randint(2**32, (n,), generator=g).tolist()
        self.keyed = [list(zip(b, draws[i * self.batch_size:], strict=False))
                      for i, b in enumerate(self.batches)]

    def __iter__(self):
        return iter(self.keyed if self.seeds else self.batches)

    def __len__(self):
        return len(self.batches)


class Augmented:
    """Item (row, seed) of a dataset with random augmentation: its crop and flip drawn from seed
    alone. Worker processes keep their own random streams from epoch to epoch, and a resumed
    run starts fresh ones; seeding each draw makes an image's augmentation in an epoch the same
    in any process, so --resume is exact at any --workers (and --workers changes nothing)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        row, seed = key
        with torch.random.fork_rng(devices=[]):  # the caller's stream (dropout) stays as it was
            torch.default_generator.manual_seed(seed)  # the CPU's only: CUDA dropout's untouched
            return self.ds[row]


def sequential(indices, batch_size):
    return [indices[i:i + batch_size].tolist() for i in range(0, len(indices), batch_size)]


class RankShare:
    """This rank's share of each batch of `batches` (EpochBatches or a list): rows b[rank::world],
    so that the ranks together take every batch of the 1-process order, split; a batch smaller
    than the world leaves some ranks an empty share. One process: the batches themselves."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        r, w = nets.rank(), nets.world()
        # EpochBatches: this epoch's, at each iter(); an empty share as an int array, since
        # np.asarray([]) is float and indexes nothing
        return (b[r::w] if len(b) > r else np.zeros(0, np.int64) for b in self.batches)

    def __len__(self):
        return len(self.batches)


def image_loader(ds, batches, args, device):
    """DataLoader over fixed/epoch batches of indices; unreadable images are dropped."""
    kw = {"persistent_workers": True, "worker_init_fn": seed_worker} if args.workers else {}
    return DataLoader(ds, batch_sampler=batches, num_workers=args.workers,
                      collate_fn=files.collate_skip, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(args.seed + nets.rank()), **kw)


class CachedBatches:
    """Iterates (features, row indices, []) from a memory-mapped fp16 cache, the shape an image
    loader yields (nothing fails here: unreadable images never entered the cache)."""

    def __init__(self, feats, where, batches):
        self.feats, self.where, self.batches = feats, where, batches  # where: row -> cache pos

    def __iter__(self):
        for b in self.batches:
            b = np.sort(np.asarray(b))  # ascending positions: sequential reads from the mmap
            yield torch.from_numpy(np.asarray(self.feats[self.where[b]])), torch.from_numpy(b), []


# ----------------------------------------------------------------------------- feature cache

def cache_key(args, precision):
    """What the cached maps depend on: a change rebuilds the cache."""
    w = args.weights
    if w not in ("imagenet", "none") and os.path.isfile(w):
        w += f"@sha256:{files.file_sha256(w)[:16]}"  # the file's bytes, not its name or date
    seed = f"|seed {args.seed}" if w == "none" else ""  # random weights depend on the seed
    return f"{args.backbone}|{w}|{args.img_size}px{seed}" + \
        (f"|{precision}" if precision != "fp32" else "")


def feature_cache(model, table, rows, split, args, device, precision, said=False, part=False):
    """(fp16 memmap (n, C, H, W) of the frozen backbone's maps for `rows`, ok mask, failed
    [(position, reason)]). A cache for other paths or settings, or one that does not load
    (a run killed while writing it, a full disk), is built anew. said: the caller has
    already said where this cache came from. part: one torchrun rank's part, which may hold
    no readable image (or none at all) and is still written."""
    d = args.cache or os.path.join(args.out, "cache")
    npy, meta = os.path.join(d, f"{split}.npy"), os.path.join(d, f"{split}.json")
    paths, key = [table.paths[i] for i in rows], cache_key(args, precision)
    if os.path.isfile(npy) and os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                m = json.load(f)
            if m.get("key") == key and m.get("paths") == paths:
                arr, ok = np.load(npy, mmap_mode="r"), np.array(m["ok"], bool)
                if arr.shape[0] == len(paths) == len(ok):
                    if not said:
                        print(f"cache: reusing {npy} ({len(paths)} images, {key})")
                    return arr, ok, [tuple(x) for x in m.get("failed", [])]
                raise ValueError(f"{arr.shape[0]} rows for {len(paths)} images")
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"cache: {npy} does not load ({one_line(e)}): building it again")
    return build_cache(model, paths, npy, meta, key, args, device, precision, part)


def shared_feature_cache(model, table, rows, split, args, device, precision):
    """feature_cache under torchrun: each rank builds the cache of its contiguous part of rows
    (split.part-R-of-W.npy, kept if an earlier run finished it), rank 0 joins the parts into
    the one cache, and every rank reads that whole. One process: feature_cache itself.
    A rank whose part is empty (more ranks than rows) or unreadable writes an empty part
    and joins every barrier; only a split with no readable image at all is an error, the
    same one on every rank."""
    if nets.world() == 1:
        return feature_cache(model, table, rows, split, args, device, precision)
    d = args.cache or os.path.join(args.out, "cache")
    joined = not cache_ready(d, split, [table.paths[i] for i in rows], cache_key(args, precision))
    if joined:
        lo, hi = nets.rank_part(len(rows))
        stem = os.path.join(d, split)
        feature_cache(model, table, rows[lo:hi], os.path.basename(nets.part_stem(stem)), args,
                      device, precision, part=True)
        nets.barrier()
        if nets.is_main():
            join_cache_parts(stem)
    nets.barrier()
    feats, ok, failed = feature_cache(model, table, rows, split, args, device, precision,
                                      said=joined)
    if not ok.any():
        raise UserError(f"no readable image among {len(rows)} in {args.root}")
    return feats, ok, failed


def cache_ready(d, split, paths, key):
    """True when d holds split's finished cache for these paths and key (a json is written
    after its npy: a cache killed while written has none, or another one)."""
    try:
        with open(os.path.join(d, f"{split}.json"), encoding="utf-8") as f:
            m = json.load(f)
        n = np.load(os.path.join(d, f"{split}.npy"), mmap_mode="r").shape[0]
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("key") == key and m.get("paths") == paths and \
        n == len(paths)


def join_cache_parts(stem):
    """Rank 0: the ranks' part caches (nets.join_parts), in rank order, into STEM.npy and
    STEM.json, positions of failed images shifted to the whole cache's; then the parts go."""
    metas = nets.join_parts(stem, stem + ".npy")
    at, ok, failed = 0, [], []
    for m in metas:
        ok += m["ok"]
        failed += [(at + i, why) for i, why in m["failed"]]  # positions in the whole cache
        at += m["n"]
    print(f"cache: joined {len(metas)} parts into {stem}.npy ({at} images)")
    files.atomic_write(stem + ".json", json.dumps(
        {"key": metas[0]["key"], "paths": sum((m["paths"] for m in metas), []), "ok": ok,
         "failed": failed, "n": at}))
    nets.remove_parts(stem)


@torch.no_grad()
def build_cache(model, paths, npy, meta, key, args, device, precision, part=False):
    """The frozen backbone's maps of root/paths into npy (fp16, zeros where an image failed) by
    nets.rows_to_npy, then meta, the json that says what they are. part: a rank's part, which
    is written even when no image in it decodes (none, or too few rows for a batch)."""
    ds = files.ImageDataset(paths, args.root, nets.make_transform(args.img_size), args.img_size)
    loader = image_loader(ds, sequential(np.arange(len(paths)), args.batch_size), args, device)
    # a BN-folded copy in the inference precision: frozen, eval only
    backbone, dtype = nets.for_inference(model.backbone, precision), nets.PRECISIONS[precision]
    zero = torch.zeros(1, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    shape = tuple(backbone(zero).shape[1:])  # (C, H, W) of one image's maps

    def maps(x):
        f = backbone(to_device(x, device).to(dtype)).float().cpu().numpy()
        return np.clip(f, -65504, 65504)  # fp16 range

    ok, failed = nets.rows_to_npy(loader, maps, len(paths), npy, np.float16, shape,
                                  f"cache {os.path.basename(npy)}", empty=None if part else
                                  f"no readable image among {len(paths)} in {args.root}")
    files.atomic_write(meta, json.dumps({"key": key, "paths": paths, "ok": ok.tolist(),
                                        "failed": failed, "n": len(paths)}))
    print(f"cache: wrote {npy} ({ok.sum()} images, {len(paths) - ok.sum()} unreadable, {key})")
    return np.load(npy, mmap_mode="r"), ok, failed
