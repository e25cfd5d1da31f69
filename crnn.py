"""CNN-RNN for painting style, artist and genre: train, evaluate, find outliers, predict.

Holds the CRNN model and its training, evaluation and prediction loops. Data reading is
data.py's, the backbone, device and precision nets.py's, pictures pages.py's; no FAISS here.

Shell:
    python data.py demo                                   # synthetic data in demo/
    python crnn.py --train --weights none                 # demo/manifest.csv -> runs/demo/
    python crnn.py --eval --outliers 20                   # runs/demo/best.pt on the test split
    python crnn.py --predict painting.jpg more_paintings/ -k 3
    python crnn.py --predict painting.jpg --explain        # runs/demo/explain/painting_<task>.png
    python crnn.py --train --data subset/manifest.csv --root wikiart --out runs/r50 \
        --freeze-backbone
    python crnn.py --train --resume --out runs/r50 --epochs 20   # last.pt's own flags, extended
    python crnn.py --train --data hf/manifest.csv --root wikiart.zip --tasks style,genre
    torchrun --nproc-per-node 4 crnn.py --train --data subset/manifest.csv --root cache256 \
        --out runs/ddp                                    # 4 GPUs (or CPU processes): DDP

Notebook:
    import crnn
    crnn.main(["--train", "--data", "subset/manifest.csv", "--root", "wikiart", "--out", "runs/a"])
    crnn.main(["--eval", "--ckpt", "runs/a/best.pt", "--outliers", "20"])
    model, ckpt = crnn.load_checkpoint("runs/a/best.pt")   # model.embed(x) -> (B, 2 * hidden)

Model: a torchvision ResNet's last feature map (B, C, H, W), H = W = img_size / 32, is projected
by a 1x1 conv to --hidden channels and read as a sequence of the H*W grid positions in raster
order (row by row, left to right) by a bidirectional LSTM or GRU. Attention pooling (a learned
linear score per position, softmax over positions) gives one vector per image, and one linear
head per task scores its classes. Tasks are the manifest's label columns (style, artist, genre)
with at least one label; an empty cell adds no loss for that task (ignore_index=-1).

Splits: best.pt is selected on `dev` when the manifest has one (else on `val`), and --eval
reports on `test` (else `val`; --split picks), so the reported figures are not the ones the
checkpoint was chosen on. --root may be a folder or a .zip read in place (files.image_source).

Files (OUT = --out, default runs/<the manifest's folder>): log.jsonl (one JSON object per epoch),
last.pt every epoch and best.pt (best mean macro-F1 over tasks on dev/val), skipped.csv (images
that did not decode, with why), cache/ (--freeze-backbone features). --eval writes report.txt,
report.html (the same tables, confusion grids and outlier cards with attention maps: one file),
metrics.json, predictions.csv, confusion_<task>.csv/.png and, with --outliers N, outliers.csv and
outliers.png. An outlier's score is p(pred) - p(true) over misclassified (image, task) pairs.

Where the model looked: attention_maps() gives the attention pooling's weight per grid cell,
grad_cam() the Grad-CAM of any task's class at the backbone's last block; --predict --explain
draws both over the crop the model saw, in explain/<name>_<task>.png.

Training is deterministic for --seed: each epoch reseeds from (seed, epoch) and each image's
augmentation draws from its own seed, so --resume after a kill, in a new process, repeats
exactly what an uninterrupted run does (bit-exact on the CPU, at any --workers, with or without
--amp, which --resume takes from last.pt). Checkpoints hold model, optimizer, scheduler, scaler,
epoch, best, args and class lists, written atomically every epoch.

Under torchrun (DistributedDataParallel: nccl on CUDA, gloo on the CPU) every rank takes its share
of each --batch-size batch of the 1-process order, so steps, schedule and checkpoints do not depend
on the number of processes, and --resume works at any number; validation gathers all ranks'
predictions; rank 0 alone prints and writes. --freeze-backbone: each rank caches its share of the
images, rank 0 joins the shares. OUT (and --cache) must be one folder all ranks see.

Unreadable images are skipped and counted, never fatal: the epoch line (and log.jsonl), the
cache and the eval report say how many. Bad input ends with one line on stderr.
"""

import argparse
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import data
import files
import metrics
import nets
import pages
import wikiart

BACKBONES = ("resnet18", "resnet34", "resnet50")
DEFAULT_DATA = os.path.join("demo", "manifest.csv")
ARCH = "crnn-v1"  # stored in every checkpoint; load_checkpoint refuses anything else
UserError, one_line = files.UserError, files.one_line
# --eval/--predict rebuild the model from the checkpoint: only these flags mean anything there
EVAL_ARGS = ("eval", "predict", "ckpt", "data", "root", "classes", "out", "outliers", "k",
             "split", "drop_leaks", "outliers_split", "explain", "batch_size", "workers", "amp",
             "device")


# ----------------------------------------------------------------------------- model

class CRNN(nn.Module):
    """ResNet map -> 1x1 conv -> bidirectional RNN over the H*W positions in raster order ->
    attention pooling -> one linear head per task. n_classes: {task: number of classes}."""

    def __init__(self, n_classes, backbone="resnet50", weights="none", hidden=256, rnn="lstm",
                 dropout=0.2):
        super().__init__()
        if isinstance(backbone, nn.Module):  # any trunk of (B, C, H, W) maps (tests: tiny)
            self.backbone, channels = backbone, nets.trunk_channels(backbone)
        else:
            self.backbone, channels = nets.backbone(backbone, weights)  # C = 512 or 2048
        self.proj = nn.Conv2d(channels, hidden, 1)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn](hidden, hidden, batch_first=True,
                                                         bidirectional=True)
        self.dim = 2 * hidden  # forward + backward states
        self.score = nn.Linear(self.dim, 1)
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(self.dim, n) for t, n in n_classes.items()})

    def attend(self, fmap):
        """(B, C, H, W) backbone features -> (attention weights (B, H*W) over the grid cells in
        raster order, each row summing to 1; RNN states (B, H*W, D))."""
        seq = self.proj(fmap).flatten(2).transpose(1, 2)  # (B, H*W, hidden), raster order
        if seq.device.type == "cpu":  # oneDNN's bf16 LSTM trained 1.7x slower than fp32
            with torch.autocast("cpu", enabled=False):
                h, _ = self.rnn(seq.float())  # (B, H*W, D)
        else:
            h, _ = self.rnn(seq)
        return torch.softmax(self.score(h).squeeze(-1).float(), dim=1), h

    def pool(self, fmap):
        """(B, C, H, W) backbone features -> (B, D) attention-weighted mean of RNN states."""
        a, h = self.attend(fmap)
        return torch.einsum("bn,bnd->bd", a, h.float())

    def classify(self, fmap):
        """Backbone features -> {task: logits}; --freeze-backbone trains this from the cache."""
        z = self.drop(self.pool(fmap))
        return {t: head(z) for t, head in self.heads.items()}

    def embed(self, x):
        """Images (B, 3, S, S) -> (B, D) pooled vectors before the heads (retrieval by style)."""
        return self.pool(self.backbone(x))

    def forward(self, x):
        return self.classify(self.backbone(x))


class Inference(nn.Module):
    """A trained CRNN for inference (--eval, --predict, retrieve.py --ckpt): its backbone
    BN-folded and in `precision` (nets.for_inference), the RNN, attention and heads in fp32 as
    trained. model itself stays as it was (Grad-CAM and attention maps hook its backbone)."""

    def __init__(self, model, precision="fp32"):
        super().__init__()
        self.model, self.dtype = model, nets.PRECISIONS[precision]
        self.body = nets.for_inference(model.backbone, precision)
        self.heads = model.heads  # predict_probs names the tasks by them

    def fmap(self, x):
        return self.body(x.to(self.dtype)).float()

    def embed(self, x):
        return self.model.pool(self.fmap(x))

    def forward(self, x):
        return self.model.classify(self.fmap(x))


def inference_model(model, device, enabled=True):
    """Inference(model) in the precision nets.inference_precision picks (printed once)."""
    name, why = nets.inference_precision(device, enabled)
    nets.say_precision(name, why)
    return Inference(model, name).to(device).eval()


def build_model(a, classes, weights="none"):
    """CRNN from a plain args dict and {task: [class names]} (as stored in checkpoints)."""
    return CRNN({t: len(c) for t, c in classes.items()}, a["backbone"], weights, a["hidden"],
                a["rnn"], a["dropout"])


def read_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (train one with --train)")
    try:  # checkpoints are untrusted files: tensors and plain containers only
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's text would suggest weights_only=False: never, for such a file
        raise UserError(f"cannot read checkpoint {path}: not a file that torch.save wrote, or "
                        "one cut short or damaged") from None
    if not isinstance(ckpt, dict) or ckpt.get("arch") != ARCH:
        raise UserError(f"{path} is not a crnn.py checkpoint (another architecture or format)")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict); no pretrained download needed."""
    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt["args"], ckpt["classes"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: checkpoint does not match crnn.py's model ({one_line(e)})") \
            from None
    model.to(memory_format=torch.channels_last)  # the convolutions: backbone and projection
    print(model_line(ckpt, path))
    return model.to(device).eval(), ckpt


def model_line(ckpt, path):
    a = ckpt["args"]
    return (f"model: {a['backbone']} + {a['rnn']} {a['hidden']}, {a['img_size']} px, from {path} "
            f"(epoch {ckpt.get('epoch')})")


# ----------------------------------------------------------------------------- data

@dataclass
class Table:
    """A manifest as arrays: y[i, j] = class index of row i for tasks[j], -1 = no label."""
    paths: list
    split: np.ndarray
    tasks: list
    classes: dict
    y: np.ndarray


def resolve_data(args, ckpt_args=None):
    """--data defaults to demo/manifest.csv (--eval/--predict: the checkpoint's); --root and
    --classes default to images/ and classes.json beside the manifest."""
    if args.data is None:
        args.data = ckpt_args["data"] if ckpt_args else DEFAULT_DATA
        if ckpt_args and args.root is None:
            args.root = ckpt_args["root"]
        if not ckpt_args and not os.path.isfile(args.data):
            raise UserError(f"manifest not found: {args.data} (make the demo data with "
                            "`python data.py demo`, or pass --data)")
    base = os.path.dirname(args.data)
    args.root = args.root or os.path.join(base, "images")
    args.classes = args.classes or os.path.join(base, "classes.json")


def default_out(manifest):
    """runs/<the manifest's folder name>: the demo trains into runs/demo, subset/ into
    runs/subset, so that runs on different data never share a folder."""
    name = os.path.basename(os.path.dirname(os.path.abspath(manifest))) or "run"
    return os.path.join("runs", name)


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


def read_table(manifest, classes_path, tasks=None, classes=None, drop_leaks=False):
    """Rows of a manifest with a split column; labels checked against the class lists."""
    rows = split_hygiene(files.read_manifest(manifest, ("path", "split")), manifest, drop_leaks)
    have = [t for t in wikiart.TASKS if any(r.get(t) for r in rows)]
    tasks = have if tasks is None else tasks
    missing = [t for t in tasks if t not in have]
    if missing:
        raise UserError(f"{manifest}: no {missing[0]} labels (tasks with labels here: "
                        f"{', '.join(have) or 'none'})")
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
                                    f"class list ({len(classes[t])} {t} classes)")
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
    unknown = [t for t in tasks if t not in wikiart.TASKS]
    if unknown or not tasks:
        raise UserError(f"--tasks {text!r}: expected a comma list of {', '.join(wikiart.TASKS)}")
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
          "macro-F1, each averaged over all the task's classes (" +
          ", ".join(f"{t} {len(table.classes[t])}" for t in table.tasks) + ")")
    for j, t in enumerate(table.tasks):
        there = set(table.y[table.split == sel, j].tolist())
        absent = [c for i, c in enumerate(table.classes[t]) if i not in there]
        if absent:
            k = len(table.classes[t])
            print(f"  {t}: no {sel} image of {', '.join(absent)}: F1 0 in that mean (the "
                  f"{t} macro-F1 is at most {(k - len(absent)) / k:.2f})")
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
        w += f"@{os.path.getsize(w)}:{int(os.path.getmtime(w))}"
    seed = f"|seed {args.seed}" if w == "none" else ""  # random weights depend on the seed
    return f"{args.backbone}|{w}|{args.img_size}px{seed}" + \
        (f"|{precision}" if precision != "fp32" else "")


def feature_cache(model, table, rows, split, args, device, precision, said=False, part=False):
    """(fp16 memmap (n, C, H, W) of the frozen backbone's maps for `rows`, ok mask, failed
    [(position, reason)]). A cache for other paths or settings, or one that does not load
    (a run killed while writing it, a full disk), is built anew. said: the caller has
    already said where this cache came from. part: one torchrun rank's share, which may hold
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
    """feature_cache under torchrun: each rank builds the cache of its contiguous share of rows
    (split.part-R-of-W.npy, kept if an earlier run finished it), rank 0 joins the shares into
    the one cache, and every rank reads that whole. One process: feature_cache itself.
    A rank whose share is empty (more ranks than rows) or unreadable writes an empty part
    and joins every barrier; only a split with no readable image at all is an error, the
    same one on every rank."""
    if nets.world() == 1:
        return feature_cache(model, table, rows, split, args, device, precision)
    d = args.cache or os.path.join(args.out, "cache")
    joined = not cache_ready(d, split, [table.paths[i] for i in rows], cache_key(args, precision))
    if joined:
        lo, hi = nets.rank_span(len(rows))
        feature_cache(model, table, rows[lo:hi], part_name(split, nets.rank()), args, device,
                      precision, part=True)
        nets.barrier()
        if nets.is_main():
            join_cache_parts(d, split)
    nets.barrier()
    feats, ok, failed = feature_cache(model, table, rows, split, args, device, precision,
                                      said=joined)
    if not ok.any():
        raise UserError(f"no readable image among {len(rows)} in {args.root}")
    return feats, ok, failed


def part_name(split, r):
    return f"{split}.part-{r}-of-{nets.world()}"


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


def join_cache_parts(d, split, chunk=4096):
    """Rank 0: the ranks' part caches, in rank order, into split.npy and split.json (temp file
    + rename, chunk rows at a time: bounded memory); then the parts are removed."""
    names = [os.path.join(d, part_name(split, r)) for r in range(nets.world())]
    parts = [np.load(n + ".npy", mmap_mode="r") for n in names]
    metas = []
    for n in names:
        with open(n + ".json", encoding="utf-8") as f:
            metas.append(json.load(f))
    npy = os.path.join(d, f"{split}.npy")
    tmp = f"{npy}.{os.getpid()}.tmp.npy"
    out = files.open_memmap(tmp, np.float16, (sum(len(a) for a in parts),) + parts[0].shape[1:])
    at, ok, failed = 0, [], []
    for a, m in zip(parts, metas, strict=True):
        for i in range(0, len(a), chunk):
            out[at + i:at + min(i + chunk, len(a))] = a[i:i + chunk]
        ok += m["ok"]
        failed += [(at + i, why) for i, why in m["failed"]]  # positions in the whole cache
        at += len(a)
    out.flush()
    del out, parts
    os.replace(tmp, npy)
    print(f"cache: joined {len(names)} parts into {npy} ({at} images)")
    files.atomic_write(os.path.join(d, f"{split}.json"), json.dumps(
        {"key": metas[0]["key"], "paths": sum((m["paths"] for m in metas), []), "ok": ok,
         "failed": failed}))
    for n in names:
        for ext in (".npy", ".json"):
            os.remove(n + ext)


def open_cache(tmp, n, shape):
    """A new fp16 memmap (n, *shape) at tmp, its folder made."""
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    return files.open_memmap(tmp, np.float16, (n, *shape))  # reserved: ENOSPC, no SIGBUS


@torch.no_grad()
def build_cache(model, paths, npy, meta, key, args, device, precision, part=False):
    ds = files.ImageDataset(paths, args.root, nets.make_transform(args.img_size), args.img_size)
    batches = sequential(np.arange(len(paths)), args.batch_size)
    loader = image_loader(ds, batches, args, device)
    # a BN-folded copy in the inference precision: frozen, eval only
    backbone, dtype = nets.for_inference(model.backbone, precision), nets.PRECISIONS[precision]
    ok, arr, failed = np.zeros(len(paths), bool), None, []
    tmp = f"{npy}.{os.getpid()}.tmp.npy"  # this process's own: no clash with another run
    prog = files.Progress(len(paths), f"cache {os.path.basename(npy)}")
    try:
        for expected, (x, i, bad) in zip(batches, loader, strict=True):
            failed += bad
            if x is not None:
                f = backbone(to_device(x, device).to(dtype)).float().cpu().numpy()
                if arr is None:  # shape known after the first batch: (n, C, H, W)
                    arr = open_cache(tmp, len(paths), f.shape[1:])
                arr[i.numpy()] = np.clip(f, -65504, 65504)  # fp16 range
                ok[i.numpy()] = True
            prog.update(len(expected))
        if arr is None and not part:
            raise UserError(f"no readable image among {len(paths)} in {args.root}")
        if arr is None:  # a rank's share with nothing readable: rows of zeros, none ok
            zero = torch.zeros(1, 3, args.img_size, args.img_size, device=device, dtype=dtype)
            arr = open_cache(tmp, len(paths), backbone(zero).shape[1:])
        arr.flush()
        del arr
        os.replace(tmp, npy)
    finally:
        if os.path.exists(tmp):  # interrupted: no half cache left behind
            os.remove(tmp)
    files.atomic_write(meta, json.dumps({"key": key, "paths": paths, "ok": ok.tolist(),
                                        "failed": failed}))
    print(f"cache: wrote {npy} ({ok.sum()} images, {len(paths) - ok.sum()} unreadable, {key})")
    return np.load(npy, mmap_mode="r"), ok, failed


# ----------------------------------------------------------------------------- training

def to_device(x, device):
    """x on device in channels_last, float. Asynchronous only on CUDA (from pinned memory): a
    non_blocking CPU-to-MPS copy can read its source after the loop has dropped it, silently
    wrong values (pytorch/pytorch#139550, #189690, open in 2026)."""
    return x.to(device, non_blocking=device.type == "cuda",
                memory_format=torch.channels_last).float()


def balance_line(how, feeds, tasks):
    """What --balance does, in numbers: the range of each task's weights or log priors."""
    parts = [f"{t} class weights {w.min():.2f}..{w.max():.2f}" if w is not None else
             f"{t} log prior {o.min():.2f}..{o.max():.2f}" if o is not None else ""
             for t, w, o in zip(tasks, feeds.ce_weights, feeds.offsets, strict=True)]
    what = {"none": "plain cross-entropy", "sampler": "plain cross-entropy, images drawn "
            "1/count of their style class"}.get(how, "; ".join(p for p in parts if p))
    return f"--balance {how}: {what}"


def task_loss(out, y, weight, offset, smoothing, reduction="mean"):
    """One task's cross-entropy over the rows labelled for it (y -1: not labelled): their mean
    (weighted: over their weights' sum) or their sum. offset: tau * log(prior) under --balance
    logit-adjust, added to the logits here only (evaluation and prediction read the plain
    ones). Its label smoothing spreads the smoothing mass by the prior, not uniformly: the
    uniform eps / K, divided by a tiny prior, would make the plain logits favour the rarest
    classes (measured: the long-tailed demo collapses onto them); by the prior, the plain
    logits keep the order of p(class | image) / prior, as without smoothing."""
    if offset is None:
        return F.cross_entropy(out.float(), y, weight=weight, ignore_index=-1,
                               label_smoothing=smoothing, reduction=reduction)
    z, lab = out.float() + offset, y >= 0
    logp = F.log_softmax(z, 1)
    prior = torch.softmax(offset / TAU, 0)  # offset = tau * log(prior), prior summing to 1
    nll = -logp.gather(1, y.clamp(min=0)[:, None])[:, 0]
    per_row = torch.where(lab, (1 - smoothing) * nll - smoothing * (logp * prior).sum(1), 0.0)
    return per_row.sum() / lab.sum() if reduction == "mean" else per_row.sum()


def multitask_loss(logits, y, weights, smoothing, offsets=None):
    """Sum over tasks of the cross-entropy over rows labelled for it; None if no row is.
    Skipping an all-unlabelled task avoids cross_entropy's 0/0 = NaN mean."""
    offsets = offsets or [None] * len(weights)
    terms = [task_loss(out, y[:, j], weights[j], offsets[j], smoothing)
             for j, out in enumerate(logits.values()) if (y[:, j] >= 0).any()]
    return sum(terms) if terms else None


def class_counts(y, n):
    return np.bincount(y[y >= 0], minlength=n)


# --balance: how the loss (or the draw) treats classes of unequal size. Measured on the demo
# and a 100:1 long-tailed demo (README, "Imbalanced classes"): sqrt is the one whose accuracy
# never fell below the majority class's, with the best macro-F1 of those. `loss` is inverse's
# old name (the default before; it collapses onto the rarest classes of a long tail).
BALANCES = ("sqrt", "none", "logit-adjust", "capped", "effective", "inverse", "sampler")
DEFAULT_BALANCE = "sqrt"
ALIASES = {"loss": "inverse"}
CAP = 10  # capped: a class counts as at least 1/CAP of the largest one
BETA = 0.999  # effective: Cui et al.'s beta; the effective number saturates at 1/(1-beta)
TAU = 1.0  # logit-adjust: Menon et al.'s tau (1: the Bayes-optimal balanced-error shift)


def balance_name(how):
    return ALIASES.get(how, how)


def class_weights(counts, how):
    """Cross-entropy weights per class from the train counts, scaled so that the mean weight
    over the training images is 1; None for the unweighted ways. A class without a train
    image is weighted as one with one image."""
    how, c = balance_name(how), np.maximum(counts, 1).astype(np.float64)
    if how == "inverse":
        w = 1 / c  # n / (K * count) when every class has an image
    elif how == "sqrt":
        w = 1 / np.sqrt(c)
    elif how == "capped":
        w = 1 / np.maximum(c, c.max() / CAP)
    elif how == "effective":
        w = (1 - BETA) / (1 - BETA ** c)  # 1 / the effective number of images
    else:
        return None
    return w * max(counts.sum(), 1) / max((w * counts).sum(), 1e-12)


def logit_offsets(counts, how):
    """tau * log(prior) per class (a class without a train image counts as one) under
    logit-adjust, else None."""
    if balance_name(how) != "logit-adjust":
        return None
    c = np.maximum(counts, 1).astype(np.float64)
    return TAU * np.log(c / c.sum())


def balance_weights(table, rows, args, device):
    """(per-task CE class weights or Nones, per-task logit offsets or Nones, per-row sampler
    weights or None), from the train rows' class counts."""
    y = table.y[rows]
    counts = [class_counts(y[:, j], len(table.classes[t])) for j, t in enumerate(table.tasks)]

    def tensor(a):
        return None if a is None else torch.tensor(a, dtype=torch.float32, device=device)
    ce = [tensor(class_weights(c, args.balance)) for c in counts]
    offsets = [tensor(logit_offsets(c, args.balance)) for c in counts]
    if args.balance != "sampler":
        return ce, offsets, None
    lab = y[:, 0] >= 0  # balance on the first task (style)
    w = np.where(lab, 1.0 / np.maximum(counts[0], 1)[np.maximum(y[:, 0], 0)], 0.0)
    return ce, offsets, np.where(lab, w, w[lab].mean() if lab.any() else 1.0)  # unlabelled: mean


def make_scheduler(opt, total_steps, warmup):
    """Linear warm-up (a fraction of all steps when < 1, else steps), then cosine to 0."""
    warm = int(warmup * total_steps) if warmup < 1 else int(warmup)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Fit:
    """What a training step needs, so the loop functions keep short signatures."""
    model: nn.Module
    fwd: object  # model (images) or model.classify (cached features)
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    ce_weights: list
    smoothing: float
    device: torch.device
    amp: object  # autocast dtype or None
    frozen: bool
    ddp: object = None  # under torchrun: DistributedDataParallel around what trains (see join_ddp)
    dummy: object = None  # under torchrun: a (1, ...) zero input for a rank with no image
    ce_host: list = None  # under torchrun: ce_weights on the host (batch_divisors, each step)
    offsets: list = None  # per task: tau * log(prior) for the loss (logit-adjust), or None


def train_step(fit, x, y):
    with nets.autocast(fit.device, fit.amp):
        logits = fit.fwd(to_device(x, fit.device))
    loss = multitask_loss(logits, y.to(fit.device), fit.ce_weights, fit.smoothing, fit.offsets)
    if loss is None:
        return None
    if not torch.isfinite(loss):
        return loss.item()
    optimizer_step(fit, loss)
    return loss.item()


def optimizer_step(fit, loss, idle=()):
    """Backward, step, zero the gradients, advance the learning-rate schedule (when the
    optimizer did step). idle: parameters whose zero gradient is no gradient (AdamW then
    leaves them alone, decay and moments included, as when they are not in the graph)."""
    stepped = True
    if fit.scaler is not None:  # fp16 on CUDA: scale the loss so small gradients survive
        scale = fit.scaler.get_scale()
        fit.scaler.scale(loss).backward()
        for p in idle:
            p.grad = None
        fit.scaler.step(fit.opt)  # skipped when a gradient overflowed...
        fit.scaler.update()
        stepped = fit.scaler.get_scale() >= scale  # ...which is when update() lowers the scale
    else:
        loss.backward()
        for p in idle:
            p.grad = None
        fit.opt.step()
    fit.opt.zero_grad(set_to_none=True)
    if stepped:  # the schedule counts optimizer steps, not skipped ones
        fit.sched.step()


def train_one_epoch(fit, loader, batches, y, label):
    """Mean loss, images used and the [(row, reason)] skipped as unreadable."""
    fit.model.train()
    if fit.frozen:
        fit.model.backbone.eval()  # frozen BatchNorm keeps its running statistics
    prog = files.Progress(sum(len(b) for b in batches), label)
    total, seen, skipped = 0.0, 0, []
    for expected, (x, idx, failed) in zip(batches, loader, strict=True):
        skipped += failed
        if x is not None:
            got = idx.tolist()
            loss = train_step(fit, x, torch.from_numpy(y[got]))
            if loss is not None and not math.isfinite(loss):
                return {"loss": loss, "images": seen, "skipped": skipped}
            total, seen = total + (loss or 0.0) * len(got), seen + len(got)
        prog.update(len(expected), f"loss {total / max(seen, 1):.3f}")
    return {"loss": total / max(seen, 1), "images": seen, "skipped": skipped}


@torch.no_grad()
def predict_probs(model, fwd, loader, device, amp):
    """(row indices that decoded, {task: (n, K) float32 softmax probabilities}, [(row, reason)]
    for those that did not)."""
    model.eval()
    idx, probs, skipped = [], {t: [] for t in model.heads}, []
    for x, i, failed in loader:
        skipped += failed
        if x is None:
            continue
        with nets.autocast(device, amp):
            logits = fwd(to_device(x, device))
        for t, out in logits.items():
            probs[t].append(torch.softmax(out.float(), 1).cpu().numpy())
        idx.append(i.numpy())
    if not idx:
        return np.zeros(0, np.int64), {}, skipped
    return np.concatenate(idx), {t: np.concatenate(p) for t, p in probs.items()}, skipped


def gather_predictions(idx, probs, skipped):
    """All ranks' (row indices, {task: probabilities}, skipped) in row order, on every rank,
    the order and arrays a 1-process predict_probs gives; unchanged for one process."""
    if nets.world() == 1:
        return idx, probs, skipped
    parts = nets.all_gather_objects((idx, probs, skipped))
    idx = np.concatenate([p[0] for p in parts])
    order = np.argsort(idx, kind="stable")
    tasks = next((list(p[1]) for p in parts if p[1]), [])
    probs = {t: np.concatenate([p[1][t] for p in parts if p[1]])[order] for t in tasks}
    return idx[order], probs, sum((p[2] for p in parts), [])


def evaluate(model, fwd, loader, y, tasks, device, amp):
    """{task: {acc, macro_f1, n, collapse}} on the rows the loader yields, plus mean_f1 over
    tasks."""
    idx, probs, skipped = gather_predictions(*predict_probs(model, fwd, loader, device, amp))
    out = {}
    for j, t in enumerate(tasks):
        yt = y[idx, j]
        m = yt >= 0
        if t in probs and m.any():
            rep = metrics.classification_report(yt[m], probs[t][m].argmax(1), probs[t].shape[1])
            out[t] = {"acc": rep["accuracy"], "macro_f1": rep["macro"]["f1"], "n": int(m.sum()),
                      "collapse": collapse(rep)}
    mean_f1 = float(np.mean([v["macro_f1"] for v in out.values()])) if out else 0.0
    return {"tasks": out, "mean_f1": mean_f1, "images": len(idx), "skipped": skipped}


# The guard: when the fewest classes that take more than 90% of the predictions are under 20%
# of the true labels, the model has collapsed onto them (on a long tail, weighted losses do
# this onto the rarest classes: issue 20 saw 486 paintings called 4 styles of 1-2 images).
COLLAPSE_PREDICTED, COLLAPSE_TRUE = 0.9, 0.2


def collapse(rep):
    """{classes, predicted, true}: the fewest classes (indices, most predicted first) that
    take more than 90% of a report's predictions, their share of the predictions and of the
    true labels, when that is under 20%; else None."""
    pred = np.array([c["predicted"] for c in rep["per_class"]])
    true = np.array([c["support"] for c in rep["per_class"]])
    order, n = np.argsort(-pred, kind="stable"), rep["n"]
    top = order[:np.searchsorted(np.cumsum(pred[order]), COLLAPSE_PREDICTED * n, "right") + 1]
    if true[top].sum() < COLLAPSE_TRUE * n:
        return {"classes": top.tolist(), "predicted": float(pred[top].sum() / n),
                "true": float(true[top].sum() / n)}
    return None


def collapse_warning(task, col, names, split, balance):
    """The guard's one line: which classes, how often, and what to try."""
    how, small = balance_name(balance), wikiart.SMALL_CLASS
    fix = (f"train longer or from --weights imagenet, and leave classes with too few train "
           f"images out of the subset (data.py --min-per-class {small})")
    if how == DEFAULT_BALANCE:
        fix = f"try --balance none, or {fix}"
    elif how != "none":
        fix = (f"--balance {balance} pushes the model toward rare classes: train with the "
               f"default --balance {DEFAULT_BALANCE}, or none (README: Imbalanced classes)")
    called = " or ".join(names[c] for c in col["classes"])
    onto = "one class" if len(col["classes"]) == 1 else f"{len(col['classes'])} rare classes"
    return (f"warning: {task}: {col['predicted']:.0%} of the {split} images are called {called}, "
            f"which {col['true']:.0%} of them are: the model has collapsed onto {onto}; {fix}")


def task_baselines(table, split):
    """{task: metrics.baselines} on `split`'s labels, the majority class from train's."""
    out = {}
    for j, t in enumerate(table.tasks):
        y, k = table.y[:, j], len(table.classes[t])
        there = y[(table.split == split) & (y >= 0)]
        if len(there):
            out[t] = metrics.baselines(there, k, metrics.majority_class(
                y[(table.split == "train") & (y >= 0)], k))
    return out


def baseline_line(split, base, classes):
    """The baselines of each task on one line, for the start of training."""
    parts = []
    for t, b in base.items():
        m, u = b["majority"], b["uniform"]
        maj = "no train label" if m is None else (
            f"majority class {classes[t][m['class']]} acc {m['accuracy']:.3f} f1 "
            f"{m['macro_f1']:.3f}")
        parts.append(f"{t} {maj}, uniform random acc {u['accuracy']:.3f} f1 {u['macro_f1']:.3f}")
    return f"{split} baselines (macro-F1): {'; '.join(parts)}"


def plain_args(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool)
            or v is None}


def train_counts(table):
    """{task: train images per class}: --eval's majority baseline is the most frequent one."""
    tr = table.y[table.split == "train"]
    return {t: class_counts(tr[:, j], len(table.classes[t])).tolist()
            for j, t in enumerate(table.tasks)}


def save_checkpoint(fit, out, state, table, args, is_best):
    """last.pt every epoch (and best.pt when improved): temp file + rename, never half."""
    ckpt = {"arch": ARCH, "model": fit.model.state_dict(), "optimizer": fit.opt.state_dict(),
            "scheduler": fit.sched.state_dict(), "args": plain_args(args),
            "scaler": fit.scaler.state_dict() if fit.scaler is not None else None,
            "classes": table.classes, "tasks": table.tasks, "train_counts": train_counts(table),
            **state}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    files.atomic_write(os.path.join(out, "last.pt"), buf.getvalue(), "wb")
    if is_best:
        files.atomic_write(os.path.join(out, "best.pt"), buf.getvalue(), "wb")


# What a run is: --resume takes these from last.pt unless typed (a larger --epochs extends the
# run: the cosine schedule is recomputed over the new total); RUN_FLAGS tell two runs apart.
RESUME_FLAGS = ("data", "root", "classes", "tasks", "backbone", "weights", "rnn", "hidden",
                "dropout", "img_size", "epochs", "batch_size", "lr", "weight_decay", "warmup",
                "label_smoothing", "balance", "patience", "freeze_backbone", "cache", "seed",
                "drop_leaks", "skip_missing", "amp")
RETYPABLE = ("epochs", "amp")  # typed, these win over last.pt's: --no-amp after a NaN loss
RUN_FLAGS = ("data", "tasks", "backbone", "weights", "rnn", "hidden", "img_size",
             "freeze_backbone")
PATH_FLAGS = ("data", "root", "classes", "cache", "weights")


def typed_flags(parser, argv):
    """The dests of the flags argv types (parsed once more with every default suppressed), so
    that a typed value can be told from a default one."""
    saved = [(a, a.default) for a in parser._actions]
    for a, _ in saved:
        a.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in saved:
            a.default = d


def same_flag(k, a, b):
    if k == "balance":  # loss, the old name of inverse, is inverse
        return balance_name(a) == balance_name(b)
    if k in PATH_FLAGS and isinstance(a, str) and isinstance(b, str) and a not in (
            "imagenet", "none"):
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b


def resume_flags(args, typed):
    """OUT/last.pt, after setting args to its flags wherever the user typed none; typed flags
    that contradict it are refused, all named at once."""
    path = os.path.join(args.out, "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint to resume from: {path}")
    ckpt = read_checkpoint(path)
    was = ckpt["args"]
    clash = [f"--{k.replace('_', '-')} {getattr(args, k)} (it has {was.get(k)})"
             for k in RESUME_FLAGS if k in typed and k not in RETYPABLE
             and not same_flag(k, getattr(args, k), was.get(k))]
    if clash:
        raise UserError(f"--resume: {path} was trained with other flags: {'; '.join(clash)}; "
                        "drop them to continue it, or train anew into another --out")
    for k in RESUME_FLAGS:
        if k not in typed and k in was:
            setattr(args, k, was[k])
    if args.epochs <= ckpt["epoch"]:
        raise UserError(f"--resume: {path} has done its {ckpt['epoch']} of {args.epochs} "
                        "epochs: pass a larger --epochs to extend it")
    shown = " ".join(f"--{k.replace('_', '-')}" + ("" if was[k] is True else f" {was[k]}")
                     for k in RESUME_FLAGS if k not in typed and was.get(k) not in (None, False))
    shown += " --no-amp" if "amp" not in typed and was.get("amp") is False else ""
    print(f"resuming {path} after epoch {ckpt['epoch']} (best mean F1 {ckpt['best']:.4f}) "
          f"with its flags: {shown}")
    return ckpt


def check_out(args):
    """Refuses to train over another run's checkpoint in --out (other data or model flags)
    unless --overwrite; the same run again may start over."""
    path = os.path.join(args.out, "last.pt")
    if args.overwrite or not os.path.isfile(path):
        return
    try:
        was = read_checkpoint(path)["args"]
    except UserError:
        was = {}
    diff = [f"--{k.replace('_', '-')} {was.get(k)}" for k in RUN_FLAGS
            if not same_flag(k, getattr(args, k), was.get(k))]
    if diff:
        raise UserError(f"{args.out} holds another run ({' '.join(diff)}): pass another --out, "
                        "--resume to continue that one, or --overwrite to replace it")


def check_numbers(args):
    """One line for a number out of range, before anything is read or written."""
    rules = [("epochs", 1, None), ("batch_size", 1, None), ("lr", 0, None),
             ("weight_decay", 0, None), ("warmup", 0, None), ("label_smoothing", 0, 0.99),
             ("dropout", 0, 0.99), ("hidden", 1, None), ("img_size", 32, None),
             ("patience", 0, None), ("workers", 0, None), ("outliers", 0, None), ("k", 1, None)]
    for k, lo, hi in rules:
        v = getattr(args, k)
        if not lo <= v <= (hi if hi is not None else v) or isinstance(v, float) and v != v:
            limit = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise UserError(f"--{k.replace('_', '-')} {v}: must be {limit}")


def restore(fit, ckpt):
    """Optimizer, scheduler and scaler state; returns epoch, best and patience counters."""
    fit.opt.load_state_dict(ckpt["optimizer"])
    fit.sched.load_state_dict(ckpt["scheduler"])
    if fit.scaler is not None and ckpt.get("scaler"):
        fit.scaler.load_state_dict(ckpt["scaler"])
    return {k: ckpt[k] for k in ("epoch", "best", "bad_epochs")}


@dataclass
class Feeds:
    """Where batches come from: images (augmented) or the frozen backbone's cached maps."""
    fwd: object  # model (images) or model.classify (cached features)
    ce_weights: list
    offsets: list
    sampler: EpochBatches
    train: object
    val: object
    cache_failed: list  # [(manifest row, why)] left out of the feature cache
    skipped: dict = field(default_factory=dict)  # row -> why it did not decode: skipped.csv


def make_feeds(model, table, args, device):
    """Train batches, and `val`: the selection split's (dev, else val; never test)."""
    labelled, sel = (table.y >= 0).any(1), selection_split(table)
    rows = {s: np.flatnonzero((table.split == s) & labelled) for s in ("train", sel)}
    if not len(rows["train"]) or not len(rows[sel]):
        raise UserError(f"{args.data}: need labelled rows with split train and dev (or val) "
                        f"(have {len(rows['train'])} train, {len(rows[sel])} {sel})")
    ce, offsets, draw = balance_weights(table, rows["train"], args, device)
    if not args.freeze_backbone:
        sampler = EpochBatches(rows["train"], args.batch_size, args.seed, draw, seeds=True)
        ds = [files.ImageDataset(table.paths, args.root, nets.make_transform(args.img_size, aug),
                                args.img_size) for aug in (True, False)]
        val = image_loader(ds[1], RankShare(sequential(rows[sel], args.batch_size)), args,
                           device)
        return Feeds(model, ce, offsets, sampler,
                     image_loader(Augmented(ds[0]), RankShare(sampler), args, device), val, [])
    where, feats, skipped = np.full(len(table.paths), -1), {}, []
    precision, why = nets.inference_precision(device, args.amp)
    nets.say_precision(precision, why + ", the frozen backbone's cache")
    for s in ("train", sel):
        feats[s], ok, failed = shared_feature_cache(model, table, rows[s], s, args, device,
                                                    precision)
        where[rows[s]] = np.arange(len(rows[s]))  # manifest row -> position in its cache
        skipped += [(int(rows[s][i]), why) for i, why in failed]
        if s == "train" and draw is not None:
            draw = draw[ok]
        rows[s] = rows[s][ok]
    sampler = EpochBatches(rows["train"], args.batch_size, args.seed, draw)
    val = CachedBatches(feats[sel], where, RankShare(sequential(rows[sel], args.batch_size)))
    return Feeds(model.classify, ce, offsets, sampler,
                 CachedBatches(feats["train"], where, RankShare(sampler)), val, skipped)


def make_fit(model, feeds, args, device, amp):
    if args.freeze_backbone:
        model.backbone.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = make_scheduler(opt, args.epochs * len(feeds.sampler), args.warmup)
    scaler = None
    if amp == torch.float16:  # torch < 2.3 has only the torch.cuda.amp spelling
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else \
            torch.cuda.amp.GradScaler()
    return Fit(model, feeds.fwd, opt, sched, scaler, feeds.ce_weights, args.label_smoothing,
               device, amp, args.freeze_backbone, offsets=feeds.offsets)


# ----------------------------------------------------------------------------- torchrun
# `torchrun --nproc-per-node N crnn.py --train ...`: every rank holds the whole model and takes
# b[rank::N] of each global batch b (the 1-process EpochBatches order; --batch-size stays the
# global batch, so steps, schedule and checkpoints do not depend on N, and --resume works at
# any N). The per-rank losses are scaled so that DDP's averaged gradient is the gradient of the
# whole batch's loss, as one process computes it. Validation gathers all ranks' predictions.


class Classify(nn.Module):
    """model.classify as a module's forward: what DDP wraps under --freeze-backbone."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fmap):
        return self.model.classify(fmap)


def join_ddp(fit, feeds, args):
    """Wrap what trains in DistributedDataParallel (it starts every rank from rank 0's weights
    and all-reduces gradients in buckets during backward). Every parameter that trains is in
    every step's graph (share_loss), so DDP needs no search for unused ones."""
    from torch.nn.parallel import DistributedDataParallel
    module = Classify(fit.model) if fit.frozen else fit.model
    ids = [fit.device.index] if fit.device.type == "cuda" else None
    fit.ddp = DistributedDataParallel(module, device_ids=ids)
    shape = feeds.train.feats.shape[1:] if fit.frozen else (3, args.img_size, args.img_size)
    fit.dummy = torch.zeros(1, *shape)
    fit.ce_host = [None if w is None else w.cpu() for w in fit.ce_weights]  # no GPU read a step


def train_mode(fit):
    fit.model.train()
    if fit.frozen:
        fit.model.backbone.eval()  # frozen BatchNorm keeps its running statistics


def ddp_train_one_epoch(fit, loader, batches, y, label):
    """train_one_epoch under torchrun: the loader yields this rank's share of each global batch
    in `batches`; every rank takes one step per global batch. Loss, images and skipped count
    all ranks."""
    train_mode(fit)
    seed_all(torch.initial_seed() + 104_729 * nets.rank())  # own dropout draws (crops: Augmented)
    prog = files.Progress(sum(len(b) for b in batches), label)
    total, seen, skipped = 0.0, 0, []
    for expected, (x, idx, failed) in zip(batches, loader, strict=True):
        skipped += failed
        got = [] if x is None else idx.tolist()
        loss, n = ddp_train_step(fit, x if got else None, torch.from_numpy(y[got]))
        total, seen = total + (loss or 0.0) * n, seen + n
        if loss is not None and not math.isfinite(loss):
            break  # every rank sees the same summed loss, so every rank stops here
        prog.update(len(expected), f"loss {total / max(seen, 1):.3f}")
    skipped = sum(nets.all_gather_objects(skipped), [])
    return {"loss": total / max(seen, 1) if math.isfinite(total) else total, "images": seen,
            "skipped": skipped}


def ddp_train_step(fit, x, y):
    """One optimizer step on every rank for one global batch, of which x, y are this rank's
    share (x None: none). Returns (the whole batch's loss, its images); loss None when no
    image in it has a label (no step, as in 1 process)."""
    div = nets.all_sum([len(y), *batch_divisors(y, fit.ce_host)])
    n, div = int(div[0]), div[1:]
    if not (div > 0).any():
        return None, n
    loss = share_loss(fit, x, y, div)
    total = float(nets.all_sum(loss)[0])  # the whole batch's loss, on every rank
    if math.isfinite(total):  # DDP averages: N x mean = sum of shares
        idle = [p for j, head in enumerate(fit.model.heads.values()) if div[j] == 0
                for p in head.parameters()]  # no label, no gradient: as in 1 process
        optimizer_step(fit, loss * nets.world(), idle)
    return total, n


def batch_divisors(y, ce_weights):
    """Per task, what cross-entropy's mean divides by over these rows: the number of labelled
    rows, or the sum of their class weights (the weighted --balance ways)."""
    out = []
    for j, w in enumerate(ce_weights):
        lab = y[:, j][y[:, j] >= 0]
        out.append(float(len(lab)) if w is None else float(w.cpu()[lab].sum()))
    return out


def share_loss(fit, x, y, div):
    """This rank's part of the global batch's multitask_loss: per task, the summed cross-entropy
    of its rows over the whole batch's divisor, so the ranks' parts add up to the whole. A rank
    with no image runs the zero input, unlabelled (a zero loss): DDP needs every rank in
    every backward. In eval mode: BatchNorm would fail on one 1x1 map, and learns nothing.
    A task with no label in the whole batch adds a zero (its head stays in the graph, as DDP
    wants every parameter; ddp_train_step then drops the head's zero gradient)."""
    if x is None:
        x, y = fit.dummy, torch.full((1, y.shape[1]), -1)
        fit.ddp.module.eval()
    with nets.autocast(fit.device, fit.amp):
        logits = fit.ddp(to_device(x, fit.device))
    train_mode(fit)
    y, div = y.to(fit.device), np.where(div > 0, div, 1.0)  # 0 / 1 for a label-less task
    offsets = fit.offsets or [None] * len(fit.ce_weights)
    return sum(task_loss(out, y[:, j], fit.ce_weights[j], offsets[j], fit.smoothing, "sum")
               / div[j] for j, out in enumerate(logits.values()))


def epoch_line(rec, epochs, mark):
    val = rec["val"]
    parts = [f"{t} acc {v['acc']:.3f} f1 {v['macro_f1']:.3f}" for t, v in val["tasks"].items()]
    return (f"epoch {rec['epoch']}/{epochs}: loss {rec['loss']:.4f} | {rec['split']} "
            f"{', '.join(parts)} | "
            f"mean f1 {val['mean_f1']:.4f}{mark} | {rec['time_s']:.1f} s, train "
            f"{rec['img_per_s']:.1f} img/s, lr {rec['lr']:.2e} | skipped {rec['skipped']} "
            f"train + {rec['skipped_val']} val")


def list_skipped(feeds, table, out, failed):
    """Adds [(row, reason)] to feeds.skipped and rewrites OUT/skipped.csv when any is new."""
    if not nets.is_main():  # under torchrun the failures are gathered; rank 0 lists them
        return
    new = {i: why for i, why in failed if i not in feeds.skipped}
    if new:
        feeds.skipped.update(new)
        files.write_csv(os.path.join(out, "skipped.csv"), ["path", "split", "reason"],
                       [[table.paths[i], table.split[i], why]
                        for i, why in sorted(feeds.skipped.items())])
        print(f"  {len(feeds.skipped)} unreadable images so far, listed in "
              f"{os.path.join(out, 'skipped.csv')}")


def run_epoch(fit, feeds, table, args, epoch, state):
    """Train, validate, checkpoint and log one epoch; returns the new state."""
    # Reseeding from (seed, epoch) makes augmentation and dropout of epoch e the same whether
    # or not the run was resumed, so checkpoints need no RNG state for an exact resume.
    seed_all(epoch_seed(args.seed, epoch))
    feeds.sampler.set_epoch(epoch)
    t0 = time.time()
    train = train_one_epoch if fit.ddp is None else ddp_train_one_epoch
    tr = train(fit, feeds.train, feeds.sampler.batches, table.y, f"epoch {epoch}")
    if not math.isfinite(tr["loss"]):
        raise UserError(f"loss became {tr['loss']} in epoch {epoch}: training stopped; "
                        f"{os.path.join(args.out, 'last.pt')} holds the last good epoch "
                        "(try a lower --lr or --no-amp)")
    t_train = time.time() - t0
    val = evaluate(fit.model, fit.fwd, feeds.val, table.y, table.tasks, fit.device, fit.amp)
    skipped_val = val.pop("skipped")
    best, sel = val["mean_f1"] > state["best"], selection_split(table)
    state = {"epoch": epoch, "best": max(val["mean_f1"], state["best"]),  # "val": the scores
             "bad_epochs": 0 if best else state["bad_epochs"] + 1, "val": val,  # on `sel`
             "selected_on": sel}
    if nets.is_main():  # under torchrun every rank holds the same weights: one writes them
        save_checkpoint(fit, args.out, state, table, args, best)
    rec = {"epoch": epoch, "loss": tr["loss"], "lr": fit.opt.param_groups[0]["lr"],
           "time_s": time.time() - t0, "img_per_s": tr["images"] / max(t_train, 1e-9),
           "skipped": len(tr["skipped"]), "skipped_val": len(skipped_val),
           "best": state["best"], "split": sel, "val": val}
    print(epoch_line(rec, args.epochs, " *" if best else ""))
    for t, v in val["tasks"].items():
        if v["collapse"]:
            print(collapse_warning(t, v["collapse"], table.classes[t], sel, args.balance))
    list_skipped(feeds, table, args.out, tr["skipped"] + skipped_val)
    if nets.is_main():
        files.append_jsonl(os.path.join(args.out, "log.jsonl"), rec)
    return state


def cmd_train(args, device, ckpt=None):
    """Trains into args.out; ckpt: last.pt to continue (--resume), its flags already in args."""
    table = read_table(args.data, args.classes, train_tasks(args.tasks),
                       drop_leaks=args.drop_leaks)
    if ckpt and ckpt["classes"] != table.classes:
        raise UserError(f"--resume: {args.out} was trained on other class lists than {args.data}")
    table = check_images(table, args)
    sel = announce_splits(table, args.data)
    seed_all(args.seed)
    amp = nets.autocast_dtype(device, args.amp)
    print(f"precision: {nets.precision_line(device, args.amp)}")
    model = CRNN({t: len(c) for t, c in table.classes.items()}, args.backbone,
                 "none" if ckpt else args.weights, args.hidden, args.rnn, args.dropout)
    if ckpt:  # before make_feeds: a missing feature cache is rebuilt from these weights
        model.load_state_dict(ckpt["model"])
    model.to(memory_format=torch.channels_last)  # the convolutions: backbone and projection
    feeds = make_feeds(model.to(device), table, args, device)
    fit = make_fit(model, feeds, args, device, amp)
    if nets.world() > 1:
        join_ddp(fit, feeds, args)
    state = restore(fit, ckpt) if ckpt else {"epoch": 0, "best": -1.0, "bad_epochs": 0}
    if not ckpt and nets.is_main():
        files.atomic_write(os.path.join(args.out, "log.jsonl"), "")
    print(f"tasks: {', '.join(f'{t} ({len(c)} classes)' for t, c in table.classes.items())}; "
          f"{len(feeds.sampler.indices)} train images, {len(feeds.sampler)} steps/epoch"
          + (f"; each step's {args.batch_size} images split over {nets.world()} processes"
             if fit.ddp else ""))
    list_skipped(feeds, table, args.out, feeds.cache_failed)
    print(balance_line(args.balance, feeds, table.tasks))
    base = task_baselines(table, sel)
    print(baseline_line(sel, base, table.classes))
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        state = run_epoch(fit, feeds, table, args, epoch, state)
        if args.patience and state["bad_epochs"] >= args.patience:
            print(f"early stop: no better {sel} mean F1 for {args.patience} epochs")
            break
    maj = [b["majority"]["macro_f1"] for b in base.values() if b["majority"]]
    print(f"best {sel} mean macro-F1 {state['best']:.4f} (majority class "
          f"{np.mean(maj) if maj else float('nan'):.4f}, uniform random "
          f"{np.mean([b['uniform']['macro_f1'] for b in base.values()]):.4f}): "
          f"{os.path.join(args.out, 'best.pt')}")
    return state


# ----------------------------------------------------------------------------- evaluation

def read_eval_table(args, ckpt, typed_classes):
    """The manifest's rows labelled with the checkpoint's class lists. A --classes file the
    user typed must agree with them; a classes.json beside the manifest is not consulted."""
    rows = files.read_manifest(args.data, ("path", "split"))
    tasks = [t for t in ckpt["tasks"] if any(r.get(t) for r in rows)]
    if not tasks:
        raise UserError(f"{args.data}: no labels for the checkpoint's tasks "
                        f"({', '.join(ckpt['tasks'])})")
    listed = read_class_file(typed_classes) if typed_classes else {}
    for t in tasks:
        if t in listed and listed[t] != ckpt["classes"][t]:
            raise UserError(f"{args.classes}: the {t} classes differ from the checkpoint's "
                            f"({len(listed[t])} vs {len(ckpt['classes'][t])}); evaluate on the "
                            "manifest it was trained for")
    return read_table(args.data, args.classes, tasks, ckpt["classes"], args.drop_leaks)


def task_result(y, probs, names, majority):
    """Report, top-3 accuracy, confusion matrix, baselines (majority: the train majority class,
    or None) and the guard's collapse (or None) of one task over its labelled rows."""
    m = y >= 0
    pred = probs[m].argmax(1)
    rep = metrics.classification_report(y[m], pred, len(names), names)
    base = metrics.baselines(y[m], len(names), majority)
    if base["majority"]:
        base["majority"]["name"] = names[majority]
    return {"report": rep, "top3": metrics.topk_accuracy(y[m], probs[m], 3),
            "confusion": metrics.confusion_matrix(y[m], pred, len(names)), "baselines": base,
            "collapse": collapse(rep)}


def train_majority(ckpt, table, t):
    """The most frequent train class of task t: from the checkpoint's train counts, else
    (checkpoints before they were stored) from the manifest's train rows; None if neither."""
    k, counts = len(table.classes[t]), (ckpt.get("train_counts") or {}).get(t)
    if counts is None:
        counts = class_counts(table.y[table.split == "train", table.tasks.index(t)], k)
    return metrics.majority_class(np.repeat(np.arange(k), counts), k)


def eval_split(args, table):
    """--split, else test when the manifest has one, else val (older train/val manifests)."""
    have = sorted(set(table.split[(table.y >= 0).any(1)].tolist()))
    for s in [args.split] if args.split else ["test", "val"]:
        if s in have:
            return s
    raise UserError(f"{args.data}: no labelled rows with split {args.split or 'test or val'} "
                    f"(splits here: {', '.join(have) or 'none'}; choose one with --split)")


def eval_notes(table, split, ckpt):
    """Warnings for the report (printed with it): classes never seen in train, and a split
    best.pt was chosen on."""
    notes = warn_unseen(table, split, show=False)
    if split == ckpt.get("selected_on", "val"):  # older checkpoints were chosen on val
        notes.append(f"note: best.pt was selected on this {split} split: optimistic scores")
    return notes


def baseline_text(base, n):
    """report.txt's lines for the baselines of one task on its n images."""
    m, u = base["majority"], base["uniform"]
    maj = ("majority class: no train label" if m is None else
           f"majority class ({m['name']}, the most frequent in train) for all: accuracy "
           f"{m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  weighted F1 {m['weighted_f1']:.4f}")
    return [f"baselines on the same {n} images: {maj}",
            f"  uniform random (each class 1/K, expected): accuracy {u['accuracy']:.4f}  "
            f"macro-F1 {u['macro_f1']:.4f}  weighted F1 {u['weighted_f1']:.4f}"]


def report_text(res, args, n_val, skipped, notes=()):
    lines = [f"checkpoint: {args.ckpt}", f"data: {args.data} ({args.split} split, {n_val} "
             f"images, {skipped} unreadable and skipped)", *notes, ""]
    for t, r in res.items():
        rep = r["report"]
        lines += [f"== {t}: {rep['n']} labelled {args.split} images ==", metrics.format_report(rep),
                  f"accuracy {rep['accuracy']:.4f}  top-3 accuracy {r['top3']:.4f}",
                  *baseline_text(r["baselines"], rep["n"])]
        for what in ("precision", "recall"):
            if rep[f"undefined_{what}"]:
                lines.append(f"undefined {what} (n/a, counted as 0 in macro/weighted): "
                             + ", ".join(rep[f"undefined_{what}"]))
        lines.append("")
    return "\n".join(lines)


def write_eval(out, res, table, idx, probs, text):
    os.makedirs(out, exist_ok=True)
    files.atomic_write(os.path.join(out, "report.txt"), text + "\n")
    summary = {t: {"top3": r["top3"], **r["report"], "baselines": r["baselines"],
                   "collapse": r["collapse"]} for t, r in res.items()}
    files.atomic_write(os.path.join(out, "metrics.json"), json.dumps(summary, indent=1) + "\n")
    for t, r in res.items():
        names = table.classes[t]
        files.write_csv(os.path.join(out, f"confusion_{t}.csv"), ["true \\ pred", *names],
                       [[n, *row.tolist()] for n, row in zip(names, r["confusion"], strict=True)])
        pages.confusion_png(r["confusion"], names, f"{t}: rows true, columns predicted (row %)",
                      os.path.join(out, f"confusion_{t}.png"))
    header, rows = ["path"], [[table.paths[i]] for i in idx]
    for t in res:
        header += [f"{t}_true", f"{t}_pred", f"{t}_p_pred", f"{t}_p_true"]
        y, p = table.y[idx, table.tasks.index(t)], probs[t]
        for k, row in enumerate(rows):
            pred = int(p[k].argmax())
            true = [table.classes[t][y[k]], f"{p[k, y[k]]:.4f}"] if y[k] >= 0 else ["", ""]
            row += [true[0], table.classes[t][pred], f"{p[k, pred]:.4f}", true[1]]
    files.write_csv(os.path.join(out, "predictions.csv"), header, rows)


def outliers(table, idx, probs, n):
    """The n misclassified (image, task) pairs with the highest p(pred) - p(true)."""
    found = []
    for t in probs:
        y, p = table.y[idx, table.tasks.index(t)], probs[t]
        for k in np.flatnonzero(y >= 0):
            pred, true = int(p[k].argmax()), int(y[k])
            if pred != true:
                found.append({"path": table.paths[idx[k]], "task": t,
                              "true": table.classes[t][true], "pred": table.classes[t][pred],
                              "p_true": float(p[k, true]), "p_pred": float(p[k, pred]),
                              "score": float(p[k, pred] - p[k, true])})
    return sorted(found, key=lambda o: -o["score"])[:n]


def cmd_eval(args, device):
    model, ckpt = load_checkpoint(args.ckpt, device)
    typed_classes = args.classes
    resolve_data(args, ckpt["args"])
    out, size = args.out or os.path.dirname(os.path.abspath(args.ckpt)), ckpt["args"]["img_size"]
    table = read_eval_table(args, ckpt, typed_classes)
    args.split = eval_split(args, table)
    rows = np.flatnonzero((table.split == args.split) & (table.y >= 0).any(1))
    notes = eval_notes(table, args.split, ckpt)
    searched = outlier_rows(table, args.outliers_split) if args.outliers else rows
    ds = files.ImageDataset(table.paths, args.root, nets.make_transform(size), size)
    fast = inference_model(model, device, args.amp)
    loader = image_loader(ds, sequential(np.union1d(rows, searched), args.batch_size), args,
                          device)
    all_idx, all_probs, _ = predict_probs(fast, fast, loader, device, None)
    keep = np.isin(all_idx, rows)
    idx, probs = all_idx[keep], {t: all_probs[t][keep] for t in table.tasks}
    if not len(idx):
        raise UserError(f"none of the {len(rows)} {args.split} images under {args.root} "
                        "could be read")
    res = {t: task_result(table.y[idx, j], probs[t], table.classes[t],
                          train_majority(ckpt, table, t))
           for j, t in enumerate(table.tasks) if (table.y[idx, j] >= 0).any()}
    notes += [collapse_warning(t, r["collapse"], table.classes[t], args.split,
                               ckpt["args"].get("balance", "loss"))
              for t, r in res.items() if r["collapse"]]
    text = report_text(res, args, len(rows), len(rows) - len(idx), notes)
    write_eval(out, res, table, idx, probs, text)
    print(text)
    keep = np.isin(all_idx, searched)
    found = write_outliers(table, all_idx[keep], {t: p[keep] for t, p in all_probs.items()},
                           args, out) if args.outliers else []
    if args.outliers:
        planted_found(found, table, searched, args.data)
    eval_html(model, found, res, text, args, ckpt, device, out)
    print(f"wrote report.txt, report.html, metrics.json, predictions.csv, "
          f"confusion_<task>.csv/.png to {out}")
    return {t: {"accuracy": r["report"]["accuracy"], "top3": r["top3"]} for t, r in res.items()}


def write_outliers(table, idx, probs, args, out):
    """The args.outliers most confident disagreements among the rows idx: outliers.csv and the
    contact sheet outliers.png in out; returns them."""
    found = outliers(table, idx, probs, args.outliers)
    keys = ["path", "task", "true", "pred", "p_true", "p_pred", "score"]
    files.write_csv(os.path.join(out, "outliers.csv"), keys,
                   [[o[k] if isinstance(o[k], str) else f"{o[k]:.4f}" for k in keys]
                    for o in found])
    outlier_sheet(found, args.root, os.path.join(out, "outliers.png"))
    print(f"outliers: {len(found)} most confident disagreements among {len(idx)} "
          f"{args.outliers_split} images, score = p(pred) - p(true) -> "
          f"{os.path.join(out, 'outliers.csv')}, outliers.png")
    return found


def outlier_rows(table, which):
    """Labelled rows to look for outliers in: heldout (every split but train: the model never
    fitted their labels), train, or all."""
    labelled = (table.y >= 0).any(1)
    if which == "train":
        print("note: training images score optimistically: the model has fitted their labels, "
              "wrong ones included")
        return np.flatnonzero(labelled & (table.split == "train"))
    if which == "all":
        print("note: --outliers-split all includes the training images, which score "
              "optimistically (the model has fitted their labels, wrong ones included)")
        return np.flatnonzero(labelled)
    return np.flatnonzero(labelled & (table.split != "train"))


def planted_found(found, table, searched, manifest):
    """With a label_noise.csv beside the manifest (the demo's deliberately wrong style labels):
    how many of them the outliers name. Returns (found, planted) or None."""
    path = os.path.join(os.path.dirname(manifest), "label_noise.csv")
    if not os.path.isfile(path):
        return None
    planted = {r["path"] for r in files.read_csv(path, ("path",))}
    there = planted & {table.paths[i] for i in searched}
    hits = planted & {o["path"] for o in found if o["task"] == "style"}
    print(f"planted label errors ({path}): {len(hits)} of {len(planted)} named as style "
          f"outliers ({len(there)} of them in the images searched)")
    return len(hits), len(planted)


def outlier_sheet(found, root, path, cols=5):
    """Contact sheet of the outliers: `task true: X` and `pred: Y (p)` under each thumbnail."""
    src = files.image_source(root, must_exist=False)  # a folder or a zip
    cells = [(src.thumb(o["path"]), f"{o['task']} true: {o['true']}",
              f"pred: {o['pred']} ({o['p_pred']:.2f})") for o in found]
    pages.contact_sheet([cells[i:i + cols] for i in range(0, len(cells), cols)], path)


# ----------------------------------------------------------------------- where the model looked

EXPLAIN_BATCH = 8  # images per Grad-CAM backward pass: a ResNet50 at 224 px keeps ~0.1 GB each


def seen(x):
    """(B, 3, S, S) normalised batch -> (B, S, S, 3) uint8: the crops the model saw."""
    mean = torch.tensor(nets.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(nets.IMAGENET_STD).view(1, 3, 1, 1)
    x = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return (x * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def attention_maps(model, x):
    """(B, H, W) numpy: the attention pooling's weight on each cell of the backbone's grid, each
    map summing to 1. Cell (i, j) stands for the crop's pixels [i S/H, (i+1) S/H) x
    [j S/W, (j+1) S/W) (its receptive field is wider)."""
    fmap = model.backbone(x)
    a, _ = model.attend(fmap)
    return a.reshape(len(x), *fmap.shape[2:]).cpu().numpy()


def last_block(model):
    """Where Grad-CAM reads: the backbone's last block (ResNet: layer4[-1]; its output is the
    map that the RNN reads)."""
    last = list(model.backbone.children())[-1]
    return last[-1] if isinstance(last, nn.Sequential) and len(last) else last


def grad_cam(model, x, task, classes=None):
    """(maps (B, h, w) numpy >= 0, classes (B,) tensor): Grad-CAM (Selvaraju et al. 2017) of each
    image's class for `task`, the predicted one when classes is None. map = ReLU(sum_k alpha_k
    A_k): A is the last block's output, alpha_k the grid mean of d logit / d A_k. Plain hooks: a
    forward hook keeps A and hangs a tensor hook on it for the gradient (full backward hooks
    fail on ResNet's in-place ReLU). Call with the model in eval mode."""
    got = {}

    def keep(module, inputs, out):
        got["A"] = out
        out.register_hook(lambda g: got.update(G=g))

    handle = last_block(model).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a path for gradients through a frozen trunk
            logits = model(x)[task].float()
            classes = logits.argmax(1) if classes is None else classes.to(logits.device)
            # images are independent in eval mode (BatchNorm uses running stats): one backward
            logits.gather(1, classes.view(-1, 1)).sum().backward(inputs=[x])
    finally:
        handle.remove()
    A, G = got["A"].detach().float(), got["G"].float()
    return torch.relu((G.mean((2, 3), keepdim=True) * A).sum(1)).cpu().numpy(), classes.cpu()


def look_at_outliers(model, found, root, size, device):
    """Adds to each outlier "seen" (the crop the model saw, None when the file no longer
    decodes) and "attention" (its (H, W) attention weights), for report.html."""
    tf, xs, ok = nets.make_transform(size), [], []
    for o in found:
        o["seen"] = o["attention"] = None
        try:
            xs.append(tf(files.load_image(files.safe_join(root, o["path"]), size)))
            ok.append(o)
        except files.DECODE_ERRORS:
            pass
    for i in range(0, len(ok), EXPLAIN_BATCH):
        x = to_device(torch.stack(xs[i:i + EXPLAIN_BATCH]), device)
        for o, crop, att in zip(ok[i:i + EXPLAIN_BATCH], seen(x), attention_maps(model, x),
                                strict=True):
            o["seen"], o["attention"] = crop, att


def eval_html(model, found, res, text, args, ckpt, device, out):
    """report.html beside report.txt: its head lines (which split), tables, confusion grids and
    the outliers with their attention maps."""
    look_at_outliers(model, found, args.root, ckpt["args"]["img_size"], device)
    head = [model_line(ckpt, args.ckpt)] + text.split("\n\n")[0].splitlines()
    return pages.eval_page(os.path.join(out, "report.html"), head, res, found, args.outliers)


def explain_stems(files, folder):
    """folder/<name> per image, distinct: photo.jpg and a/photo.jpg give photo and photo-2."""
    count, stems = {}, {}
    for f in files:
        name = os.path.splitext(os.path.basename(f))[0]
        count[name] = count.get(name, 0) + 1
        stems[f] = os.path.join(folder, name if count[name] == 1 else f"{name}-{count[name]}")
    return stems


def explain(model, xs, files, tops, stems, classes, device):
    """<stem>_<task>.png per image and task: the crop, the attention over the grid (one for all
    tasks) and the Grad-CAM of the top class in tops (top_k's). Returns {file: [png paths]}."""
    done = {f: [] for f in files}
    for i in range(0, len(xs), EXPLAIN_BATCH):
        x = to_device(torch.stack(xs[i:i + EXPLAIN_BATCH]), device)
        crops, att = seen(x), attention_maps(model, x)
        for t in model.heads:
            best = [top[t][0] for top in tops[i:i + EXPLAIN_BATCH]]  # (class name, p)
            cam, _ = grad_cam(model, x, t, torch.tensor([classes[t].index(c) for c, _ in best]))
            for j, f in enumerate(files[i:i + EXPLAIN_BATCH]):
                a, png = att[j], f"{stems[f]}_{t}.png"
                pages.explain_png(crops[j], [
                    (a, pages.attention_top(a), "attention (all tasks)",
                     f"peak {a.max():.2f}, uniform {1 / a.size:.2f}"),
                    (cam[j], None, f"Grad-CAM: {best[j][0]}", f"top {t}, p {best[j][1]:.3f}"),
                ], f"{os.path.basename(f)} - {t}", png)
                done[f].append(png)
    return done


# ----------------------------------------------------------------------------- prediction

def collect_images(inputs):
    """(files to classify, non-image files skipped): folders are walked recursively."""
    paths, skipped = [], 0
    for p in inputs:
        if os.path.isdir(p):
            for d, subdirs, names in os.walk(p):
                subdirs.sort()
                for name in sorted(names):
                    if name.lower().endswith(files.IMAGE_EXTS):
                        paths.append(os.path.join(d, name))
                    else:
                        skipped += 1
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise UserError(f"not found: {p}")
    return paths, skipped


def load_batch(paths, tf, size, alone):
    """(tensors, files that decoded); a lone explicit file that does not decode is an error."""
    xs, ok = [], []
    for f in paths:
        try:
            xs.append(tf(files.load_image(f, size)))
            ok.append(f)
        except files.DECODE_ERRORS as e:
            if alone:
                raise UserError(f"not an image ({files.decode_error(e)}): {f}") from None
            print(f"skipped ({files.decode_error(e)}): {f}")
    return xs, ok


@torch.no_grad()
def top_k(model, xs, classes, k, device):
    """[{task: [(class name, probability)] * k}] for a list of image tensors."""
    logits = model(to_device(torch.stack(xs), device))
    out = [{} for _ in xs]
    for t, z in logits.items():
        p, c = torch.softmax(z.float(), 1).topk(min(k, z.shape[1]))
        for r, pr, cl in zip(out, p.tolist(), c.tolist(), strict=True):
            r[t] = [(classes[t][j], q) for j, q in zip(cl, pr, strict=True)]
    return out


def cmd_predict(args, device):
    model, ckpt = load_checkpoint(args.ckpt, device)
    paths, skipped = collect_images(args.predict)
    if not paths:
        raise UserError(f"no images in {' '.join(args.predict)} (extensions "
                        f"{' '.join(files.IMAGE_EXTS)})")
    alone, unreadable = len(args.predict) == 1 and os.path.isfile(args.predict[0]), 0
    size = ckpt["args"]["img_size"]
    tf, fast = nets.make_transform(size), inference_model(model, device, args.amp)
    folder = os.path.join(args.out or os.path.dirname(os.path.abspath(args.ckpt)), "explain")
    results, stems = {}, explain_stems(paths, folder)
    for i in range(0, len(paths), args.batch_size):
        chunk = paths[i:i + args.batch_size]
        xs, ok = load_batch(chunk, tf, size, alone)
        unreadable += len(chunk) - len(ok)
        tops = top_k(fast, xs, ckpt["classes"], args.k, device) if xs else []
        shown = explain(model, xs, ok, tops, stems, ckpt["classes"], device) \
            if args.explain and xs else {}
        for f, per_task in zip(ok, tops, strict=True):
            results[f] = per_task
            print(f)
            for t, top in per_task.items():
                print(f"  {t}: " + ", ".join(f"{c} {q:.3f}" for c, q in top))
            if f in shown:
                print(f"  explained: {', '.join(shown[f])}")
    print(f"{len(results)} images classified" + (f", {skipped} files skipped (not image "
          f"files by their extension)" if skipped else "") + (
              f", {unreadable} unreadable (why: above)" if unreadable else ""))
    return results


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=files.Help)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train on the manifest's train split")
    mode.add_argument("--eval", action="store_true",
                      help="report on the test split of --data (else val; see --split)")
    mode.add_argument("--predict", nargs="+", metavar="IMG", help="image files or folders")
    p.add_argument("--data", help="manifest CSV from data.py (default: demo/manifest.csv; "
                   "--eval: the checkpoint's)")
    p.add_argument("--root", help="image folder or .zip read in place (default: images/ "
                   "beside --data)")
    p.add_argument("--classes", help="class lists (default: classes.json beside --data, else "
                   "the sorted labels of the manifest)")
    p.add_argument("--out", help="output folder (default: runs/<the manifest's folder>, "
                   "runs/demo for the demo; --eval: the checkpoint's)")
    p.add_argument("--ckpt", default=os.path.join(default_out(DEFAULT_DATA), "best.pt"),
                   help="checkpoint for --eval/--predict")
    p.add_argument("--tasks", help="with --train: a subset of the manifest's tasks, e.g. "
                   "style,genre (default: every task with labels)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="resnet50", choices=BACKBONES, help="torchvision ResNet")
    m.add_argument("--weights", default="imagenet",
                   help="imagenet (torchvision download), none (random init) or a state_dict PATH")
    m.add_argument("--rnn", default="lstm", choices=("lstm", "gru"),
                   help="bidirectional RNN over the feature grid")
    m.add_argument("--hidden", type=int, default=256, help="projection and RNN width per "
                   "direction; embed() gives 2 * hidden dims")
    m.add_argument("--dropout", type=float, default=0.2, help="before the heads")
    m.add_argument("--img-size", type=int, default=224, help="square crop side, px")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10, help="passes over the train split")
    t.add_argument("--batch-size", type=int, default=32, help="images per step")
    t.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate")
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW, decoupled")
    t.add_argument("--warmup", type=float, default=0.05,
                   help="linear warm-up: a fraction of all steps when < 1, else steps; then cosine")
    t.add_argument("--label-smoothing", type=float, default=0.1, help="in every task's loss")
    t.add_argument("--balance", default=DEFAULT_BALANCE, choices=BALANCES + tuple(ALIASES),
                   metavar="{" + ",".join(BALANCES) + "}",
                   help="class imbalance, per task (README: Imbalanced classes). Cross-entropy "
                   "weighted per class by sqrt = 1/sqrt(count) (measured best on a long tail "
                   "and as good as none on balanced data), capped = 1/count with counts below "
                   "1/10 of the largest raised to it, effective = (1-b)/(1-b^count), b=0.999 "
                   "(Cui et al. 2019), inverse (old name: loss, the default before) = "
                   "n/(K*count), which collapses onto the rarest classes of a long tail; none: "
                   "plain cross-entropy; logit-adjust: the loss sees logits + log(train prior) "
                   "(Menon et al. 2021), prediction the plain ones; sampler = draw images with "
                   "weight 1/count of their style class (rare ones repeat, common ones go "
                   "unseen)")
    t.add_argument("--patience", type=int, default=0,
                   help="stop after N epochs without a better val mean F1 (0: never)")
    t.add_argument("--freeze-backbone", action="store_true",
                   help="cache the frozen backbone's maps (fp16, OUT/cache) and train only the "
                   "RNN and heads from them: no augmentation, >= 20x faster epochs")
    t.add_argument("--cache", help="feature cache folder (default: OUT/cache)")
    t.add_argument("--resume", action="store_true", help="continue OUT/last.pt with its own "
                   "flags (a larger --epochs extends it)")
    t.add_argument("--overwrite", action="store_true",
                   help="train into an --out that holds another run's checkpoint")
    t.add_argument("--drop-leaks", action="store_true",
                   help="a path listed in two splits is left out of train (default: refused)")
    t.add_argument("--skip-missing", action="store_true",
                   help="train on the manifest's images that are there (default: refused when "
                   "most train and dev/val images are missing, skipped every epoch when few)")
    t.add_argument("--seed", type=int, default=0,
                   help="model init, batch order, augmentation, dropout")
    e = p.add_argument_group("evaluation and prediction")
    e.add_argument("--outliers", type=int, default=0, metavar="N",
                   help="with --eval: the N most confident disagreements with the labels")
    e.add_argument("--outliers-split", default="heldout", choices=("heldout", "train", "all"),
                   help="where --outliers looks: heldout = every split but train (the model "
                   "never fitted those labels), train, or all (train images score "
                   "optimistically)")
    e.add_argument("-k", type=int, default=3, help="top-k classes to print per task")
    e.add_argument("--split", choices=("dev", "val", "test"),
                   help="with --eval: the split to report on (default: test, else val)")
    e.add_argument("--explain", action="store_true",
                   help="with --predict: OUT/explain/<name>_<task>.png per image and task, the "
                   "crop, the attention over the grid and the Grad-CAM of the predicted class "
                   "(OUT: --out, else the checkpoint's folder)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    r.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding images (0: in the main process)")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="lower precision where the hardware has it (nets.choose_precision): "
                   "CUDA sm >= 8.0 (A100, L4, H100) bf16 autocast training and bf16 weights "
                   "for inference (--eval, --predict, the frozen cache); older GPUs (T4, "
                   "V100) fp16 autocast + GradScaler and fp16 weights; AMX/Zen 4 CPUs bf16; "
                   "--no-amp: fp32 throughout")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    nets.main_prints_only()
    files.tolerant_stdout()
    nets.tune_malloc()
    typed = typed_flags(parser, argv) if args.resume else None
    keep = typed if typed is not None else set(vars(args)) if args.train else EVAL_ARGS
    shown = {k: v for k, v in vars(args).items() if k in keep and v is not None}
    print(f"args{' typed (the rest from the checkpoint)' if args.resume else ''}: "
          + json.dumps(shown))
    try:
        check_numbers(args)
        device = nets.pick_device(args.device)
        if args.explain and not args.predict:
            raise UserError("--explain goes with --predict")
        if not args.train and not nets.is_main():
            return None  # under torchrun, --eval and --predict run on rank 0 alone
        if args.eval:
            return cmd_eval(args, device)
        if args.predict:
            return cmd_predict(args, device)
        args.out = args.out or default_out(args.data or DEFAULT_DATA)
        ckpt = resume_flags(args, typed) if args.resume else None
        resolve_data(args)
        if not ckpt:
            check_out(args)
        # under torchrun: rank 0 joins the feature cache (minutes for all of WikiArt) while
        # the others wait, past nccl's default 10 min
        with nets.deterministic_cudnn():
            return cmd_train(args, nets.init_distributed(device, hours=2), ckpt)
    except UserError as e:
        raise SystemExit(f"crnn.py: error: {e}") from None
    except OSError as e:  # a full disk (no SIGBUS: memory maps are reserved), a folder not ours
        raise SystemExit(f"crnn.py: error: {files.os_error_line(e)}") from None
    finally:
        nets.close_distributed()


if __name__ == "__main__":
    main()
