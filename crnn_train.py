"""Training the CNN-RNN: the losses and the --balance ways, the optimizer step, one epoch, dev
scores with the collapse guard, checkpoints, and DistributedDataParallel under torchrun.

Holds no model definition (crnn_model.py), no manifest reading or batches (crnn_data.py) and no
command line (crnn.py: `python crnn.py --train` calls cmd_train here).

    import crnn_train
    state = crnn_train.cmd_train(args, device)     # args: crnn.py's flags, parsed
"""

import io
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import files
import metrics
import nets
import wikiart
from crnn_data import (
    Augmented,
    CachedBatches,
    EpochBatches,
    RankShare,
    announce_splits,
    check_images,
    class_counts,
    epoch_seed,
    image_loader,
    learnable_tasks,
    read_table,
    seed_all,
    selection_split,
    sequential,
    shared_feature_cache,
    train_tasks,
)
from crnn_model import ARCH, CRNN, to_device
from files import UserError

# ----------------------------------------------------------------------------- losses and --balance

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


# ----------------------------------------------------------------------------- steps and epochs

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
    """One optimizer step on the batch x, y (x None: no image decoded). Returns (loss, images);
    loss None when no image in it has a label (no step)."""
    if x is None:
        return None, 0
    with nets.autocast(fit.device, fit.amp):
        logits = fit.fwd(to_device(x, fit.device))
    loss = multitask_loss(logits, y.to(fit.device), fit.ce_weights, fit.smoothing, fit.offsets)
    if loss is None:
        return None, len(y)
    if torch.isfinite(loss):
        optimizer_step(fit, loss)
    return loss.item(), len(y)


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
    """The one training loop: mean loss, images used and the [(row, reason)] skipped as
    unreadable. Under torchrun (fit.ddp) the loader yields this rank's share of each global
    batch in `batches` and every rank takes one step per global batch (ddp_train_step); loss,
    images and skipped then count all ranks. A loss that is not finite ends the epoch (on
    every rank: each sees the same summed loss) and is returned."""
    train_mode(fit)
    if fit.ddp is not None:
        seed_all(torch.initial_seed() + 104_729 * nets.rank())  # own dropout (crops: Augmented)
    step = train_step if fit.ddp is None else ddp_train_step
    prog = files.Progress(sum(len(b) for b in batches), label)
    total, seen, skipped = 0.0, 0, []
    for expected, (x, idx, failed) in zip(batches, loader, strict=True):
        skipped += failed
        got = [] if x is None else idx.tolist()
        loss, n = step(fit, x if got else None, torch.from_numpy(y[got]))
        total, seen = total + (loss or 0.0) * n, seen + n
        if loss is not None and not math.isfinite(loss):
            break
        prog.update(len(expected), f"loss {total / max(seen, 1):.3f}")
    if fit.ddp is not None:
        skipped = sum(nets.all_gather_objects(skipped), [])
    return {"loss": total / max(seen, 1) if math.isfinite(total) else total, "images": seen,
            "skipped": skipped}


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


# ------------------------------------------------------------------------ checkpoints and feeds

def plain_args(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool)
            or v is None}


def train_counts(table):
    """{task: train images per class}: --eval's majority baseline is the most frequent one."""
    tr = table.y[table.split == "train"]
    return {t: class_counts(tr[:, j], len(table.classes[t])).tolist()
            for j, t in enumerate(table.tasks)}


RESUME_STATE = ("optimizer", "scheduler", "scaler")  # last.pt only: --resume reads last.pt


def save_checkpoint(fit, out, state, table, args, is_best):
    """last.pt every epoch (and best.pt when improved): temp file + rename, never half. best.pt
    leaves out the optimizer's state (AdamW's two moments: twice the model's size)."""
    ckpt = {"arch": ARCH, "model": fit.model.state_dict(), "optimizer": fit.opt.state_dict(),
            "scheduler": fit.sched.state_dict(), "args": plain_args(args),
            "scaler": fit.scaler.state_dict() if fit.scaler is not None else None,
            "classes": table.classes, "tasks": table.tasks, "train_counts": train_counts(table),
            **state}
    for name, keep in (("last.pt", ckpt), ("best.pt", None)):
        if keep is None and not is_best:
            continue
        buf = io.BytesIO()
        torch.save(keep or {k: v for k, v in ckpt.items() if k not in RESUME_STATE}, buf)
        files.atomic_write(os.path.join(out, name), buf.getvalue(), "wb")


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
    dev: object  # the selection split's batches: dev, else val
    cache_failed: list  # [(manifest row, why)] left out of the feature cache
    skipped: dict = field(default_factory=dict)  # row -> why it did not decode: skipped.csv


def make_feeds(model, table, args, device):
    """Train batches, and `dev`: the selection split's (dev, else val; never test)."""
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
        dev = image_loader(ds[1], RankShare(sequential(rows[sel], args.batch_size)), args,
                           device)
        return Feeds(model, ce, offsets, sampler,
                     image_loader(Augmented(ds[0]), RankShare(sampler), args, device), dev, [])
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
    dev = CachedBatches(feats[sel], where, RankShare(sequential(rows[sel], args.batch_size)))
    return Feeds(model.classify, ce, offsets, sampler,
                 CachedBatches(feats["train"], where, RankShare(sampler)), dev, skipped)


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


# ----------------------------------------------------------------------------- the run

def epoch_line(rec, epochs, mark):
    dev = rec["dev"]
    parts = [f"{t} acc {v['acc']:.3f} f1 {v['macro_f1']:.3f}" for t, v in dev["tasks"].items()]
    return (f"epoch {rec['epoch']}/{epochs}: loss {rec['loss']:.4f} | {rec['split']} "
            f"{', '.join(parts)} | "
            f"mean f1 {dev['mean_f1']:.4f}{mark} | {rec['time_s']:.1f} s, train "
            f"{rec['img_per_s']:.1f} img/s, lr {rec['lr']:.2e} | skipped {rec['skipped']} "
            f"train + {rec['skipped_dev']} {rec['split']}")


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
    tr = train_one_epoch(fit, feeds.train, feeds.sampler.batches, table.y, f"epoch {epoch}")
    if not math.isfinite(tr["loss"]):
        raise UserError(f"loss became {tr['loss']} in epoch {epoch}: training stopped; "
                        f"{os.path.join(args.out, 'last.pt')} holds the last good epoch "
                        "(try a lower --lr or --no-amp)")
    t_train = time.time() - t0
    dev = evaluate(fit.model, fit.fwd, feeds.dev, table.y, table.tasks, fit.device, fit.amp)
    skipped_dev = dev.pop("skipped")
    best, sel = dev["mean_f1"] > state["best"], selection_split(table)
    state = {"epoch": epoch, "best": max(dev["mean_f1"], state["best"]),  # "dev": the scores
             "bad_epochs": 0 if best else state["bad_epochs"] + 1, "dev": dev,  # on `sel`,
             "selected_on": sel}  # which is val for a manifest without a dev split
    if nets.is_main():  # under torchrun every rank holds the same weights: one writes them
        save_checkpoint(fit, args.out, state, table, args, best)
    rec = {"epoch": epoch, "loss": tr["loss"], "lr": fit.opt.param_groups[0]["lr"],
           "time_s": time.time() - t0, "img_per_s": tr["images"] / max(t_train, 1e-9),
           "skipped": len(tr["skipped"]), "skipped_dev": len(skipped_dev),
           "best": state["best"], "split": sel, "dev": dev}
    print(epoch_line(rec, args.epochs, " *" if best else ""))
    for t, v in dev["tasks"].items():
        if v["collapse"]:
            print(collapse_warning(t, v["collapse"], table.classes[t], sel, args.balance))
    list_skipped(feeds, table, args.out, tr["skipped"] + skipped_dev)
    if nets.is_main():
        files.append_jsonl(os.path.join(args.out, "log.jsonl"), rec)
    return state


def cmd_train(args, device, ckpt=None):
    """Trains into args.out; ckpt: last.pt to continue (--resume), its flags already in args."""
    table = read_table(args.data, args.classes, train_tasks(args.tasks),
                       drop_leaks=args.drop_leaks)
    table = learnable_tasks(table, args.tasks)
    if ckpt and ckpt["classes"] != table.classes:
        raise UserError(f"--resume: {os.path.join(args.out, 'last.pt')} was trained on other "
                        f"class lists than {args.data}")
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
