"""Hand-written metrics: numpy arrays in (callers do `.cpu().numpy()`), Python numbers out.

Holds classification and retrieval metrics and their baselines (majority class, random
ranking or calls); imports nothing of the project and no torch.

    import metrics
    rep = metrics.classification_report(y_true, y_pred, n_classes, names=classes)
    print(metrics.format_report(rep))
    metrics.baselines(y_true, n_classes, metrics.majority_class(y_train, n_classes))
    metrics.retrieval_metrics(I, gt, ks=(1, 5))   # D, I = index.search(xq, k)

Zero-division rule (sklearn zero_division=0, FAISS counts_to_PR): a ratio with denominator 0
is undefined: precision of a class never predicted, recall of a class with no true samples,
F1 = 2tp / (predicted + support) when both. Per class the report gives None there; every
average and scalar result counts it as 0. The macro average runs over the classes present in
y_true or y_pred, as sklearn's precision_recall_fscore_support(zero_division=0) without
labels: a class in neither (no image of it in the split, never predicted) says nothing about
the model and is left out (the report names it), so a small split of a many-class task is not
scored near 0 for the classes it lacks; weighted and micro do not depend on it. One exception:
(random_)map_at_k leave queries with no relevant item out of the mean (0.0 if none has one).
Bad shapes, dtypes or labels raise ValueError.
"""

import numpy as np

# --- input checks ---

def _labels(a, n_classes, name):
    """1-D int64 array with every label in [0, n_classes)."""
    a = np.asarray(a)
    if a.size == 0:
        a = a.astype(np.int64)  # np.asarray([]) is float64
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D int array, got shape {a.shape} dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{name} has labels outside [0, {n_classes}): {a.min()}..{a.max()}")
    return a.astype(np.int64)


def _positive_int(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")


def _check_k(k, limit=None, what="columns"):
    _positive_int(k, "k")
    if limit is not None and k > limit:
        raise ValueError(f"k={k} exceeds the {limit} {what} available")


def _rel(rel, ndim, k=None):
    """Checked bool relevance array; with k, (nq >= 1, >= k) and cut to the first k columns."""
    rel = np.asarray(rel)
    if rel.ndim != ndim or rel.dtype != bool or (k is not None and len(rel) == 0):
        raise ValueError(f"rel must be a {ndim}-D bool array, got shape {rel.shape} {rel.dtype}")
    if k is not None:
        _check_k(k, rel.shape[1], "ranked results per query")
        rel = rel[:, :k]
    return rel


def _counts(x, name, n=None):
    """Non-negative int count(s) as 1-D int64; a scalar is broadcast to length n."""
    x = np.atleast_1d(np.asarray(x))
    n = len(x) if n is None else n
    if x.ndim != 1 or x.dtype.kind not in "iu" or len(x) not in (1, n) or (x < 0).any():
        raise ValueError(f"{name} must be a count >= 0 or ({n},) counts, got {x.shape} {x.dtype}")
    return np.broadcast_to(x, (n,)).astype(np.int64)


def _div(num, den):
    """num / den elementwise, 0 where den == 0 (the zero-division rule)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


# --- classification ---

def confusion_matrix(y_true, y_pred, n_classes):
    """(n_classes, n_classes) int64 counts: rows are the true class, columns the predicted."""
    _positive_int(n_classes, "n_classes")
    y_true = _labels(y_true, n_classes, "y_true")
    y_pred = _labels(y_pred, n_classes, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred lengths differ: {len(y_true)} vs {len(y_pred)}")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def _prf(tp, predicted, support):
    """Precision, recall, F1 with undefined -> 0; F1 = 2tp / (predicted + support) as sklearn."""
    return _div(tp, predicted), _div(tp, support), _div(2 * tp, predicted + support)


def _avg(p, r, f1):
    return {"precision": float(p), "recall": float(r), "f1": float(f1)}


def classification_report(y_true, y_pred, n_classes, names=None):
    """Per-class and averaged precision/recall/F1; None marks undefined (module docstring)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    n = int(cm.sum())
    if n == 0:
        raise ValueError("classification_report needs at least one sample")
    names = [str(c) for c in range(n_classes)] if names is None else [str(s) for s in names]
    if len(names) != n_classes:
        raise ValueError(f"got {len(names)} names for {n_classes} classes")
    tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
    p, r, f1 = _prf(tp, predicted, support)
    seen = (predicted + support) > 0  # the macro average's classes (module docstring)
    per_class = [
        {"name": names[c], "precision": float(p[c]) if predicted[c] else None,
         "recall": float(r[c]) if support[c] else None,
         "f1": float(f1[c]) if predicted[c] + support[c] else None,
         "support": int(support[c]), "predicted": int(predicted[c])}
        for c in range(n_classes)
    ]
    return {
        "per_class": per_class,
        "accuracy": float(tp.sum() / n),
        "macro": _avg(p[seen].mean(), r[seen].mean(), f1[seen].mean()),
        "weighted": _avg(*(np.average(x, weights=support) for x in (p, r, f1))),
        "micro": _avg(*_prf(tp.sum(), predicted.sum(), support.sum())),
        "undefined_precision": [names[c] for c in range(n_classes) if predicted[c] == 0],
        "undefined_recall": [names[c] for c in range(n_classes) if support[c] == 0],
        "absent": [names[c] for c in range(n_classes) if not seen[c]],  # not in macro
        "n": n,
    }


NA_NOTE = ("n/a = undefined: precision of a class never predicted, recall of a class with no "
           "true samples; counted as 0 in macro and weighted avg (sklearn zero_division=0).")


def absent_line(report):
    """The line naming the classes the macro average leaves out, or None."""
    gone, k = report["absent"], len(report["per_class"])
    if not gone:
        return None
    return (f"left out of macro avg (no image here, never predicted): {', '.join(gone)}; it "
            f"averages the {k - len(gone)} of {k} classes in the truth or the predictions")


def format_report(report, digits=3, note=True):
    """Fixed-width text table laid out like sklearn's classification_report (its micro avg,
    equal to accuracy for single-label classes, left out); n/a = undefined, explained in a last
    line unless note=False (a caller with several tables says NA_NOTE once)."""
    width = max(len("weighted avg"), *(len(c["name"]) for c in report["per_class"]))

    def num(x):
        return "n/a" if x is None else f"{x:.{digits}f}"

    def row(name, *cells):
        return f"{name:>{width}} " + "".join(f" {cell:>9}" for cell in cells)

    lines = [row("", "precision", "recall", "f1-score", "support"), ""]
    for c in report["per_class"]:
        cells = num(c["precision"]), num(c["recall"]), num(c["f1"]), str(c["support"])
        lines.append(row(c["name"], *cells))
    n = str(report["n"])
    lines += ["", row("accuracy", "", "", num(report["accuracy"]), n)]
    for avg in ("macro", "weighted"):
        a = report[avg]
        lines.append(row(f"{avg} avg", num(a["precision"]), num(a["recall"]), num(a["f1"]), n))
    if absent_line(report):
        lines += ["", absent_line(report)]
    return "\n".join(lines + (["", NA_NOTE] if note else []))


# --- classification baselines ---
# What a classifier has to beat, on the split it is scored on. majority: every image called
# the most frequent class of the TRAIN labels (ties: the lower index), scored like any
# prediction. uniform: every image called one of the n_classes at random, each with
# probability 1 / n_classes, independently: the exact expected scores. majority's macro
# average runs over the classes in y_true or called (the report's rule); uniform's over the
# classes in y_true (a class absent from them scores F1 0 whether or not a random call names
# it; all classes present, the two rules agree).

def majority_class(y_train, n_classes):
    """The most frequent label of y_train, the lower index on a tie; None when it is empty."""
    y_train = _labels(y_train, n_classes, "y_train")
    return int(np.bincount(y_train, minlength=n_classes).argmax()) if len(y_train) else None


def majority_scores(y_true, n_classes, majority):
    """accuracy, macro_f1 and weighted_f1 of calling every row of y_true `majority`."""
    rep = classification_report(y_true, np.full(len(y_true), majority, np.int64), n_classes)
    return {"class": int(majority), "accuracy": rep["accuracy"],
            "macro_f1": rep["macro"]["f1"], "weighted_f1": rep["weighted"]["f1"]}


def uniform_scores(y_true, n_classes):
    """Exact expected accuracy (1 / n_classes), macro_f1 and weighted_f1 of uniform random
    calls. Class c with s true rows of n is called m ~ Binomial(n, 1/K) times; given m, the
    rows called c are a uniform m-subset, so E[tp | m] = m s / n and, F1 = 2 tp / (m + s)
    being linear in tp, E[F1_c] = sum over m of P(m) 2 m s / (n (m + s)) (0 when m + s = 0)."""
    _positive_int(n_classes, "n_classes")
    y_true = _labels(y_true, n_classes, "y_true")
    n = len(y_true)
    if n == 0:
        raise ValueError("uniform_scores needs at least one sample")
    m = np.arange(n + 1)
    if n_classes == 1:
        pmf = (m == n).astype(float)  # every row called the one class
    else:  # log C(n, m) as a running sum of log((n - m + 1) / m): no factorials
        log_c = np.concatenate([[0.0], np.cumsum(np.log(n - m[1:] + 1) - np.log(m[1:]))])
        pmf = np.exp(log_c - m * np.log(n_classes) + (n - m) * np.log1p(-1 / n_classes))
    m, pmf = m[pmf > 0], pmf[pmf > 0]  # the rest underflowed: a few hundred m stay at n 25k
    s = np.bincount(y_true, minlength=n_classes)[:, None]  # (K, 1) true rows per class
    f1 = (pmf * _div(2 * m * s, n * (m + s))).sum(1)
    return {"accuracy": 1 / n_classes, "macro_f1": float(f1[s[:, 0] > 0].mean()),
            "weighted_f1": float(np.average(f1, weights=s[:, 0]))}


def baselines(y_true, n_classes, majority):
    """{"majority": majority_scores (None when majority is None: no train labels),
    "uniform": uniform_scores} on y_true, the split being evaluated; majority comes from
    majority_class of the train labels, never of y_true."""
    return {"majority": None if majority is None else
            majority_scores(y_true, n_classes, majority),
            "uniform": uniform_scores(y_true, n_classes)}


def topk_accuracy(y_true, scores, k):
    """Fraction of rows whose true class is among its k highest scores (k clamped to
    n_classes). scores: (n, n_classes) float; ties go to the lower class index."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.dtype.kind != "f" or np.isnan(scores).any():
        raise ValueError(f"scores must be (n, n_classes) float without NaN, got {scores.shape}")
    y_true = _labels(y_true, scores.shape[1], "y_true")
    if len(y_true) != len(scores) or len(y_true) == 0:
        raise ValueError(f"need n > 0 with y_true ({len(y_true)}) matching scores ({len(scores)})")
    _check_k(k)
    top = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
    return float((top == y_true[:, None]).any(1).mean())


# --- retrieval ---

def retrieval_metrics(I, gt, ks=(1, 5)):
    """top1, recall@k (each k in ks other than 1) and MRR for one correct id per query.

    I: (nq, k) int result ids ranked best first, -1 for missing, as from index.search.
    gt: (nq,) the correct id of each query. recall@k: fraction of queries whose id is in the
    first k results. MRR: mean of 1 / rank (rank from 1) of the id, 0 when absent."""
    I, gt = np.asarray(I), np.asarray(gt)
    if I.ndim != 2 or I.dtype.kind not in "iu" or I.size == 0:
        raise ValueError(f"I must be a non-empty (nq, k) int array, got {I.shape} {I.dtype}")
    if gt.shape != (len(I),) or gt.dtype.kind not in "iu" or (gt < 0).any():
        raise ValueError(f"gt must be ({len(I)},) non-negative ints, got {gt.shape} {gt.dtype}")
    hits = I == gt[:, None]
    rr = np.where(hits.any(1), 1.0 / (hits.argmax(1) + 1), 0.0)  # argmax: first hit
    out = {"top1": float(hits[:, 0].mean())}
    for k in ks:
        _check_k(k, I.shape[1], "results per query")
        if k != 1:
            out[f"recall@{k}"] = float(hits[:, :k].any(1).mean())
    out["mrr"] = float(rr.mean())
    return out


def _sum_precision_at_hits(rel):
    """Sum over the last axis of P@i * rel_i, the numerator of average precision."""
    ranks = np.arange(1, rel.shape[-1] + 1)
    return (np.cumsum(rel, axis=-1) / ranks * rel).sum(-1)


def average_precision(rel, n_relevant=None):
    """AP of one ranked bool list: sum of precision at each hit / n_relevant, the number of
    relevant items in the whole collection (default rel.sum()); 0.0 when n_relevant is 0."""
    rel = _rel(rel, 1)
    hits = int(rel.sum())
    n_relevant = hits if n_relevant is None else int(_counts(n_relevant, "n_relevant", 1)[0])
    if n_relevant < hits:
        raise ValueError(f"n_relevant={n_relevant} is below the {hits} hits in rel")
    return float(_sum_precision_at_hits(rel) / n_relevant) if n_relevant else 0.0


def map_at_k(rel, n_relevant, k):
    """mAP@k: mean over queries of AP@k = sum_{i<=k} P@i * rel_i / min(n_relevant, k).

    rel: (nq, >=k) bool, ranked best first; n_relevant: int or (nq,) relevant items per
    query in the collection. Dividing by min(n_relevant, k) lets a perfect top k score 1
    (the common mAP@k). Queries with n_relevant == 0 are excluded from the mean."""
    top = _rel(rel, 2, k)
    n_rel = _counts(n_relevant, "n_relevant", len(top))
    if (top.sum(1) > n_rel).any():
        raise ValueError("a query has more hits in its first k than its n_relevant")
    keep = n_rel > 0
    if not keep.any():
        return 0.0
    return float((_sum_precision_at_hits(top[keep]) / np.minimum(n_rel[keep], k)).mean())


def precision_at_k(rel, k):
    """Mean over queries of (hits in the first k) / k. rel: (nq, >=k) bool."""
    top = _rel(rel, 2, k)
    return float(top.sum(1).mean() / k)


def _random_args(n_relevant, n_candidates, k):
    """Checked, equal-length (n_rel, n_cand) arrays for the random baselines."""
    nq = max(np.size(n_relevant), np.size(n_candidates))
    n_rel = _counts(n_relevant, "n_relevant", nq)
    n_cand = _counts(n_candidates, "n_candidates", nq)
    if nq == 0 or (n_rel > n_cand).any():
        raise ValueError("need at least one query and n_relevant <= n_candidates")
    _check_k(k, n_cand.min(), "candidates")
    return n_rel, n_cand


def random_precision_at_k(n_relevant, n_candidates, k):
    """Expected precision_at_k under a uniformly random ranking: mean of n_rel / n_cand."""
    n_rel, n_cand = _random_args(n_relevant, n_candidates, k)
    return float((n_rel / n_cand).mean())


def random_map_at_k(n_relevant, n_candidates, k):
    """Exact expected map_at_k under a uniformly random ranking of n_candidates items.

    p = n_rel / n_cand is the chance rank i is relevant, q = n_rel (n_rel-1) / (n_cand
    (n_cand-1)) the chance ranks i != j both are, so E[rel_i * hits in first i] = p + (i-1) q
    and E[P@i * rel_i] = (p + (i-1) q) / i; sum over i <= k, divide by min(n_rel, k).
    Queries with n_rel == 0 are excluded, as in map_at_k."""
    n_rel, n_cand = _random_args(n_relevant, n_candidates, k)
    keep = n_rel > 0
    if not keep.any():
        return 0.0
    n_rel, n_cand = n_rel[keep].astype(float), n_cand[keep].astype(float)
    p = n_rel / n_cand
    q = n_rel * (n_rel - 1) / np.maximum(n_cand * (n_cand - 1), 1)  # n_cand=1 -> numerator 0
    i = np.arange(1, k + 1)
    expected = ((p[:, None] + (i - 1) * q[:, None]) / i).sum(1)
    return float((expected / np.minimum(n_rel, k)).mean())


def neighbours_kept(nn_a, nn_b):
    """Mean share of each row's neighbours in nn_a (n, k) that are also in nn_b (n, k), order
    within a row ignored: 1.0 = the same k neighbours for every item, about k/n = unrelated.
    E.g. nn_a from the embeddings, nn_b from a 2-D map: the k-NN preservation of a layout
    (Lee and Verleysen's Q_NX(k)). Ids < 0 (not found) never match."""
    nn_a, nn_b = np.asarray(nn_a), np.asarray(nn_b)
    if nn_a.ndim != 2 or nn_a.shape != nn_b.shape or nn_a.size == 0:
        raise ValueError(f"nn_a and nn_b must be (n, k) of one shape, k >= 1: {nn_a.shape}, "
                         f"{nn_b.shape}")
    hits = sum(((nn_a == nn_b[:, [j]]) & (nn_a >= 0)).any(1) for j in range(nn_b.shape[1]))
    return float(hits.mean() / nn_a.shape[1])
