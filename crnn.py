"""CNN-RNN for painting style, artist and genre: train, evaluate, find outliers, predict.

Holds the script: its flags, --resume, --eval, outliers, --predict and --explain. The model is
crnn_model.py's, the label table, batches and feature cache crnn_data.py's, the training loop
crnn_train.py's; the backbone, device and precision nets.py's, pictures pages.py's; no FAISS.

Shell:
    python data.py demo                                   # synthetic data in demo/
    python crnn.py --train --weights none                 # demo/manifest.csv -> runs/demo/
    python crnn.py --eval --outliers 20                   # runs/demo/best.pt on the test split
    python crnn.py --predict painting.jpg more_paintings/ -k 3   # runs/demo/predict/predictions.csv
    python crnn.py --eval --data mine/manifest.csv        # runs/mine/best.pt: where --train put it
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
last.pt every epoch and best.pt (best mean macro-F1 over tasks on dev/val; the model without the
optimizer state, which only --resume needs, from last.pt), skipped.csv (images
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
import json
import os

import numpy as np
import torch

import files
import metrics
import nets
import pages
from crnn_data import (
    class_counts,
    image_loader,
    read_class_file,
    read_table,
    sequential,
    warn_unseen,
)
from crnn_model import (
    attention_maps,
    grad_cam,
    inference_model,
    load_checkpoint,
    model_line,
    read_checkpoint,
    seen,
    to_device,
)
from crnn_train import (
    ALIASES,
    BALANCES,
    DEFAULT_BALANCE,
    balance_name,
    cmd_train,
    collapse,
    collapse_warning,
    predict_probs,
)

BACKBONES = ("resnet18", "resnet34", "resnet50")
DEFAULT_DATA = os.path.join("demo", "manifest.csv")
UserError, one_line = files.UserError, files.one_line
# --eval/--predict rebuild the model from the checkpoint: only these flags mean anything there
EVAL_ARGS = ("eval", "predict", "ckpt", "data", "root", "classes", "out", "outliers", "k",
             "split", "drop_leaks", "outliers_split", "explain", "batch_size", "workers", "amp",
             "device")


# ----------------------------------------------------------------------------- data and runs

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
    elif ckpt_args and args.root is None and same_flag("data", args.data, ckpt_args["data"]):
        args.root = ckpt_args["root"]  # the manifest it was trained on: its --root too
    base = os.path.dirname(args.data)
    args.root = args.root or os.path.join(base, "images")
    args.classes = args.classes or os.path.join(base, "classes.json")


def default_ckpt(args):
    """--eval/--predict without --ckpt: best.pt of the run training on --data writes (runs/
    <the manifest's folder>), runs/demo/best.pt without --data. Names how to make it."""
    path = os.path.join(default_out(args.data or DEFAULT_DATA), "best.pt")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path} (train it with `python crnn.py --train"
                        f"{' --data ' + args.data if args.data else ''}`, or pass --ckpt)")
    return path


def default_out(manifest):
    """runs/<the manifest's folder name>: the demo trains into runs/demo, subset/ into
    runs/subset, so that runs on different data never share a folder."""
    name = os.path.basename(os.path.dirname(os.path.abspath(manifest))) or "run"
    return os.path.join("runs", name)


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
    """Refuses to train over a run already in --out (another run, or the same flags again: a
    shorter run would replace a better best.pt) unless --overwrite; --resume continues it."""
    path = os.path.join(args.out, "last.pt")
    if args.overwrite or not os.path.isfile(path):
        return
    try:
        ckpt = read_checkpoint(path)
        was, done = ckpt["args"], f" ({ckpt['epoch']} epochs, best mean F1 {ckpt['best']:.4f})"
    except (UserError, KeyError):
        was, done = {}, ""
    diff = [f"--{k.replace('_', '-')} {was.get(k)}" for k in RUN_FLAGS
            if not same_flag(k, getattr(args, k), was.get(k))]
    what = f"another run ({' '.join(diff)})" if diff else f"a run with these flags{done}"
    raise UserError(f"{args.out} holds {what}: pass another --out, --resume to continue it, or "
                    "--overwrite to replace it")


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


# ----------------------------------------------------------------------------- evaluation

def read_eval_table(args, ckpt, typed_classes):
    """The manifest's rows labelled with the checkpoint's class lists. A --classes file the
    user typed must agree with them; a classes.json beside the manifest is not consulted."""
    rows = files.read_manifest(args.data, ("path", "split"))
    tasks = [t for t in ckpt["tasks"] if any(r.get(t) for r in rows)]
    if not tasks:
        raise UserError(f"{args.data}: no labels for the tasks of checkpoint {args.ckpt} "
                        f"({', '.join(ckpt['tasks'])}): another --ckpt or --data?")
    listed = read_class_file(typed_classes) if typed_classes else {}
    for t in tasks:
        if t in listed and listed[t] != ckpt["classes"][t]:
            raise UserError(f"{args.classes}: the {t} classes differ from those of checkpoint "
                            f"{args.ckpt} ({len(listed[t])} vs {len(ckpt['classes'][t])}); "
                            "evaluate on the manifest it was trained for")
    return read_table(args.data, args.classes, tasks, ckpt["classes"], args.drop_leaks,
                      whose=f"checkpoint {args.ckpt}, trained on {ckpt['args'].get('data')}")


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
        lines += [f"== {t}: {rep['n']} labelled {args.split} images ==",
                  metrics.format_report(rep, note=False),
                  f"accuracy {rep['accuracy']:.4f}  top-3 accuracy {r['top3']:.4f}",
                  *baseline_text(r["baselines"], rep["n"])]
        for what in ("precision", "recall"):
            if rep[f"undefined_{what}"]:
                lines.append(f"undefined {what} (n/a, counted as 0 in macro/weighted): "
                             + ", ".join(rep[f"undefined_{what}"]))
        lines.append("")
    return "\n".join(lines + [metrics.NA_NOTE])


def confusion_png(cm, names, task, path):
    """The confusion PNG; past pages.GRID_MAX classes (a grid nobody can read, and a 1,000-class
    one would be 12,000 px square) only the GRID_MAX classes in the most errors, as true or as
    predicted, each row still divided by all of that class's images."""
    title = f"{task}: rows true, columns predicted (row %)"
    keep = np.arange(len(names))
    if len(names) > pages.GRID_MAX:
        off = cm - np.diag(np.diag(cm))
        keep = np.sort(np.argsort(-(off.sum(0) + off.sum(1)), kind="stable")[:pages.GRID_MAX])
        title = f"{task}: {len(keep)} of {len(names)} classes, those in the most errors (all in " \
            f"confusion_{task}.csv); rows true, columns predicted (row % of all)"
    pages.confusion_png(cm[np.ix_(keep, keep)], [names[i] for i in keep], title, path,
                        cm.sum(1)[keep])


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
        confusion_png(r["confusion"], names, t, os.path.join(out, f"confusion_{t}.png"))
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
    return result({t: {"accuracy": r["report"]["accuracy"], "top3": r["top3"]}
                   for t, r in res.items()},
                  f"{args.split}: " + ", ".join(f"{t} accuracy {r['report']['accuracy']:.3f}"
                                                for t, r in res.items())
                  + f"; {os.path.join(out, 'report.txt')}")


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
            rel, others = files.scan_images(p)
            paths += [os.path.join(p, *r.split("/")) for r in rel]
            skipped += others
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
    csv_path = write_predictions(results, ckpt, args)
    print(f"{len(results)} images classified" + (f", {skipped} files skipped (not image "
          f"files by their extension)" if skipped else "") + (
              f", {unreadable} unreadable (why: above)" if unreadable else ""))
    return result(results, f"{len(results)} images classified: {csv_path}")


def write_predictions(results, ckpt, args):
    """OUT/predict/predictions.csv (OUT: --out, else the checkpoint's folder; --eval's own
    predictions.csv stays beside it): per image its path and, per task, the top-k classes and
    their probabilities. Returns its path."""
    path = os.path.join(args.out or os.path.dirname(os.path.abspath(args.ckpt)), "predict",
                        "predictions.csv")
    k = {t: min(args.k, len(ckpt["classes"][t])) for t in ckpt["tasks"]}
    header = ["path"] + [f"{t}_{what}{i}" for t in k for i in range(1, k[t] + 1)
                         for what in ("top", "p")]  # style_top1, style_p1, style_top2, ...
    rows = [[f] + [x for t in k for c, q in tops[t] for x in (c, f"{q:.4f}")]
            for f, tops in results.items()]
    files.write_csv(path, header, rows)
    print(f"wrote {path} ({len(rows)} images, top {args.k} per task with probabilities)")
    return path


# ----------------------------------------------------------------------------- what main gives

def result(items, summary):
    """What main returns: a dict (result["epoch"], result["style"], result[path]) whose repr in
    a notebook cell is one line, not the scores of every image (files.Result)."""
    return files.Result(f"crnn.py: {summary}", items)


def next_commands(args):
    """Training's last lines: the evaluation, prediction and search commands for this run."""
    if not nets.is_main():
        return
    best = os.path.join(args.out, "best.pt")
    data = "" if os.path.abspath(args.data) == os.path.abspath(DEFAULT_DATA) else \
        f" --data {args.data}"
    which = data if os.path.abspath(args.out) == os.path.abspath(default_out(args.data)) \
        else f" --ckpt {best}"
    splits = {r.get("split") for r in files.read_manifest(args.data)}
    on = "the test split" if "test" in splits else "the val split (no test split here" + (
        ")" if "dev" in splits else "; best.pt was chosen on val: optimistic)")
    print(f"next: python crnn.py --eval{which}                  # scores on {on}\n"
          f"      python crnn.py --predict IMAGE_OR_FOLDER{which}  # predictions.csv\n"
          f"      python retrieve.py --build --ckpt {best} --images {args.root} --manifest "
          f"{args.data} --index {os.path.join(args.out, 'index')}   # then --query IMAGE "
          f"--index {os.path.join(args.out, 'index')}: paintings of a similar style")


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=files.Help)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train on the manifest's train split")
    mode.add_argument("--eval", action="store_true",
                      help="report on the test split of --data (else val; see --split)")
    mode.add_argument("--predict", nargs="+", metavar="IMG", help="image files or folders")
    p.add_argument("--data", "--manifest", help="manifest CSV from data.py (default: "
                   "demo/manifest.csv; --eval: the checkpoint's); --manifest as in retrieve.py")
    p.add_argument("--root", "--images", help="image folder or .zip read in place (default: "
                   "images/ beside --data); --images as in retrieve.py")
    p.add_argument("--classes", help="class lists (default: classes.json beside --data, else "
                   "the sorted labels of the manifest)")
    p.add_argument("--out", help="output folder (default: runs/<the manifest's folder>, "
                   "runs/demo for the demo; --eval: the checkpoint's)")
    p.add_argument("--ckpt", help="checkpoint for --eval/--predict (default: runs/<--data's "
                   "folder>/best.pt, where --train writes it; runs/demo/best.pt without --data)")
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
                   help="stop after N epochs without a better dev (else val) mean F1 (0: "
                   "never)")
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
    nets.add_runtime_flags(p, "lower precision where the hardware has it "
                           "(nets.choose_precision): CUDA sm >= 8.0 (A100, L4, H100) bf16 "
                           "autocast training and bf16 weights for inference (--eval, "
                           "--predict, the frozen cache); older GPUs (T4, V100) fp16 autocast "
                           "+ GradScaler and fp16 weights; AMX/Zen 4 CPUs bf16; --no-amp: fp32 "
                           "throughout")
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
        if args.predict:
            collect_images(args.predict)  # a missing file is named before the model loads
        if not args.train:
            args.ckpt = args.ckpt or default_ckpt(args)
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
            state = cmd_train(args, nets.init_distributed(device, hours=2), ckpt)
        next_commands(args)
        return result(state, f"best {state['selected_on']} mean macro-F1 {state['best']:.4f} "
                      f"after {state['epoch']} epochs: {os.path.join(args.out, 'best.pt')}")
    except UserError as e:
        raise SystemExit(f"crnn.py: error: {e}") from None
    except OSError as e:  # a full disk (no SIGBUS: memory maps are reserved), a folder not ours
        raise SystemExit(f"crnn.py: error: {files.os_error_line(e)}") from None
    finally:
        nets.close_distributed()


if __name__ == "__main__":
    main()
