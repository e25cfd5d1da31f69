"""Tests for metrics.py: hand-computed cases, sklearn cross-checks, random-baseline checks.

python -m pytest -q test_metrics_part.py
"""

import itertools

import numpy as np
import pytest

import metrics

# --- hand-computed classification case ---
# 5 classes a..e, n = 6:
#   y_true = 0 0 0 1 1 2     -> support   [3, 2, 1, 0, 0]  (d, e never true)
#   y_pred = 0 1 1 1 3 0     -> predicted [2, 3, 0, 1, 0]  (c, e never predicted)
#   hits at samples 0 and 3  -> tp        [1, 1, 0, 0, 0]
CLS_TRUE = [0, 0, 0, 1, 1, 2]
CLS_PRED = [0, 1, 1, 1, 3, 0]
CLS_NAMES = ["a", "b", "c", "d", "e"]


def test_metrics_confusion_matrix_hand():
    cm = metrics.confusion_matrix(CLS_TRUE, CLS_PRED, 5)
    expected = [
        [1, 2, 0, 0, 0],  # true a: predicted a once, b twice
        [0, 1, 0, 1, 0],  # true b: b once, d once
        [1, 0, 0, 0, 0],  # true c: predicted a
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    np.testing.assert_array_equal(cm, expected)


def test_metrics_classification_report_hand():
    rep = metrics.classification_report(CLS_TRUE, CLS_PRED, 5, names=CLS_NAMES)
    got = [(c["precision"], c["recall"], c["f1"]) for c in rep["per_class"]]
    expected = [
        (1 / 2, 1 / 3, 2 / 5),  # a: tp 1 / pred 2, tp 1 / support 3, 2*1 / (2+3)
        (1 / 3, 1 / 2, 2 / 5),  # b: 1/3, 1/2, 2*1 / (3+2)
        (None, 0.0, 0.0),  # c: never predicted; recall 0/1; f1 0 / (0+1)
        (0.0, None, 0.0),  # d: never true; precision 0/1; f1 0 / (1+0)
        (None, None, None),  # e: in neither y_true nor y_pred
    ]
    for g, e in zip(got, expected, strict=True):
        assert _metrics_close(g, e), (g, e)
    assert [c["support"] for c in rep["per_class"]] == [3, 2, 1, 0, 0]
    assert [c["predicted"] for c in rep["per_class"]] == [2, 3, 0, 1, 0]
    assert rep["accuracy"] == pytest.approx(2 / 6)
    # macro over all 5 classes, undefined as 0: p (1/2 + 1/3) / 5 = 1/6, r same,
    # f1 (2/5 + 2/5) / 5 = 4/25
    assert rep["macro"] == pytest.approx({"precision": 1 / 6, "recall": 1 / 6, "f1": 4 / 25})
    # weighted by support 3,2,1,0,0 over 6: p (3/2 + 2/3 + 0) / 6 = 13/36,
    # r (1 + 1 + 0) / 6 = 1/3, f1 (6/5 + 4/5 + 0) / 6 = 1/3
    assert rep["weighted"] == pytest.approx({"precision": 13 / 36, "recall": 1 / 3, "f1": 1 / 3})
    # micro: tp 2, predicted 6, support 6 -> 1/3 each
    assert rep["micro"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert rep["undefined_precision"] == ["c", "e"]
    assert rep["undefined_recall"] == ["d", "e"]
    assert rep["n"] == 6


def _metrics_close(got, expected):
    return all(
        (g is None and e is None) or (g is not None and e is not None and abs(g - e) < 1e-12)
        for g, e in zip(got, expected, strict=True)
    )


def test_metrics_classification_report_default_names():
    rep = metrics.classification_report([0, 1], [0, 0], 3)
    assert [c["name"] for c in rep["per_class"]] == ["0", "1", "2"]
    assert rep["undefined_precision"] == ["1", "2"] and rep["undefined_recall"] == ["2"]


def test_metrics_format_report_hand():
    rep = metrics.classification_report(CLS_TRUE, CLS_PRED, 5, names=CLS_NAMES)
    text = metrics.format_report(rep)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["a"] == ["0.500", "0.333", "0.400", "3"]
    assert rows["c"] == ["n/a", "0.000", "0.000", "1"]
    assert rows["d"] == ["0.000", "n/a", "0.000", "0"]
    assert rows["e"] == ["n/a", "n/a", "n/a", "0"]
    assert rows["accuracy"] == ["0.333", "6"]
    assert rows["macro"] == ["avg", "0.167", "0.167", "0.160", "6"]
    assert rows["weighted"] == ["avg", "0.361", "0.333", "0.333", "6"]  # 13/36 = 0.3611
    assert rows["micro"] == ["avg", "0.333", "0.333", "0.333", "6"]
    assert "n/a" in text.splitlines()[-1] and "0" in text.splitlines()[-1]
    # fixed width: header, class rows and average rows all end in the same column
    table = [line for line in text.splitlines()[:-1] if line.strip()]
    assert len({len(line) for line in table}) == 1
    assert "0.50 " in metrics.format_report(rep, digits=2)


def _metrics_sklearn_case(seed, n=300, n_classes=7):
    """Labels where class 4 is never predicted, 5 never true, 6 in neither."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 2, 3, 4], size=n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.choice([0, 1, 2, 3, 5], size=n))
    y_pred[y_pred == 4] = 0
    return y_true, y_pred, n_classes


@pytest.mark.parametrize("seed", range(5))
def test_metrics_classification_matches_sklearn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    y_true, y_pred, n_classes = _metrics_sklearn_case(seed)
    labels = list(range(n_classes))
    rep = metrics.classification_report(y_true, y_pred, n_classes)
    assert rep["undefined_precision"] == ["4", "6"] and rep["undefined_recall"] == ["5", "6"]

    p, r, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    for c, row in enumerate(rep["per_class"]):
        for key, ref in (("precision", p), ("recall", r), ("f1", f1)):
            assert (row[key] or 0.0) == pytest.approx(ref[c], abs=1e-12, rel=0)
        assert row["support"] == support[c]
    for avg in ("macro", "weighted", "micro"):
        ref = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )[:3]
        got = (rep[avg]["precision"], rep[avg]["recall"], rep[avg]["f1"])
        assert got == pytest.approx(ref, abs=1e-12, rel=0)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(y_true, y_pred, n_classes),
        skm.confusion_matrix(y_true, y_pred, labels=labels),
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.confusion_matrix([0, 3], [0, 1], 3), r"outside \[0, 3\)"),
        (lambda: metrics.confusion_matrix([0, -1], [0, 1], 3), r"outside \[0, 3\)"),
        (lambda: metrics.confusion_matrix([0, 1], [0, 1, 1], 3), "lengths differ"),
        (lambda: metrics.confusion_matrix([0.0, 1.0], [0, 1], 3), "1-D int array"),
        (lambda: metrics.confusion_matrix([[0, 1]], [[0, 1]], 3), "1-D int array"),
        (lambda: metrics.confusion_matrix([0], [0], 0), "n_classes must be a positive int"),
        (lambda: metrics.classification_report([], [], 3), "at least one sample"),
        (lambda: metrics.classification_report([0], [0], 2, names=["a"]), "1 names for 2"),
    ],
)
def test_metrics_classification_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- top-k ---


def test_metrics_topk_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.2], [0.2, 0.1, 0.7]])
    y_true = [1, 1, 1]
    # true class 1 ranks: row 0 first; row 1 second (tie with class 0, lower index first);
    # row 2 third
    assert metrics.topk_accuracy(y_true, scores, 1) == pytest.approx(1 / 3)
    assert metrics.topk_accuracy(y_true, scores, 2) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(y_true, scores, 3) == 1.0
    assert metrics.topk_accuracy(y_true, scores, 10) == 1.0  # clamped to 3 classes


def test_metrics_topk_matches_brute_force():
    rng = np.random.default_rng(1)
    n, n_classes = 300, 6
    scores = rng.integers(0, 4, size=(n, n_classes)).astype(float)  # many ties
    y_true = rng.integers(0, n_classes, size=n)
    for k in range(1, n_classes + 2):
        hits = 0
        for s, t in zip(scores, y_true, strict=True):
            ranked = sorted(range(n_classes), key=lambda c, s=s: -s[c])  # stable: low index first
            hits += t in ranked[:k]
        assert metrics.topk_accuracy(y_true, scores, k) == pytest.approx(hits / n)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.topk_accuracy([0, 1], np.zeros((3, 4)), 1), "matching scores"),
        (lambda: metrics.topk_accuracy([0, 4], np.zeros((2, 4)), 1), r"outside \[0, 4\)"),
        (lambda: metrics.topk_accuracy([0], np.zeros(4), 1), "scores must be"),  # 1-D
        (lambda: metrics.topk_accuracy([0], np.zeros((1, 4), int), 1), "scores must be"),
        (lambda: metrics.topk_accuracy([0], np.full((1, 4), np.nan), 1), "scores must be"),
        (lambda: metrics.topk_accuracy([0], np.zeros((1, 4)), 0), "k must be a positive"),
    ],
)
def test_metrics_topk_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- retrieval ---


def test_metrics_retrieval_hand():
    I = np.array([[5, 7, 9], [3, 1, -1], [2, -1, -1], [8, 8, 4]])
    gt = np.array([9, 3, 6, 8])
    # query 0: id 9 at rank 3 -> rr 1/3; query 1: rank 1 -> 1;
    # query 2: absent (only -1 after rank 1) -> 0; query 3: rank 1 (first of a duplicate) -> 1
    out = metrics.retrieval_metrics(I, gt, ks=(1, 2, 3))
    assert list(out) == ["top1", "recall@2", "recall@3", "mrr"]
    assert out["top1"] == pytest.approx(2 / 4)  # queries 1, 3
    assert out["recall@2"] == pytest.approx(2 / 4)  # query 0 needs rank 3
    assert out["recall@3"] == pytest.approx(3 / 4)  # all but query 2
    assert out["mrr"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)  # = 7/12


def test_metrics_retrieval_default_keys_and_missing():
    I = np.array([[-1, -1, -1, -1, -1], [4, 3, 2, 1, 0]])
    out = metrics.retrieval_metrics(I, np.array([0, 0]))  # ks=(1, 5)
    # query 0 returned nothing; query 1 finds id 0 at rank 5 -> rr 1/5
    assert out == pytest.approx({"top1": 0.0, "recall@5": 0.5, "mrr": (0 + 1 / 5) / 2})


I_ZEROS = np.zeros((2, 3), int)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.retrieval_metrics(I_ZEROS, np.array([1, -1]), ks=(1,)), "gt must be"),
        (lambda: metrics.retrieval_metrics(I_ZEROS, np.array([1, 2, 3]), ks=(1,)), "gt must be"),
        (lambda: metrics.retrieval_metrics(I_ZEROS, np.array([1, 2]), ks=(1, 5)), "k=5 exceeds"),
        (lambda: metrics.retrieval_metrics(I_ZEROS * 1.0, np.array([1, 2])), "I must be"),
        (lambda: metrics.retrieval_metrics(I_ZEROS[0], np.array([1])), "I must be"),
    ],
)
def test_metrics_retrieval_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_metrics_average_precision_hand():
    rel = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    # hits at ranks 1, 3, 6: precision 1/1, 2/3, 3/6, sum 13/6
    assert metrics.average_precision(rel) == pytest.approx(13 / 6 / 3)  # = 13/18
    assert metrics.average_precision(rel, n_relevant=4) == pytest.approx(13 / 6 / 4)  # one missed
    assert metrics.average_precision(np.zeros(4, bool)) == 0.0
    assert metrics.average_precision(np.zeros(4, bool), n_relevant=2) == 0.0
    assert metrics.average_precision(np.array([0, 1], bool)) == pytest.approx(1 / 2)


RANKED = np.array(
    [
        [1, 0, 1, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
    ],
    dtype=bool,
)


def test_metrics_map_at_k_hand():
    # k=3: query 0: (P@1 + P@3) / min(2, 3) = (1 + 2/3) / 2 = 5/6
    #      query 1: P@2 / min(5, 3) = (1/2) / 3 = 1/6; query 2: n_relevant 0, excluded
    assert metrics.map_at_k(RANKED, [2, 5, 0], 3) == pytest.approx((5 / 6 + 1 / 6) / 2)
    # same, but query 2 has one relevant item it never found: AP 0 joins the mean
    assert metrics.map_at_k(RANKED, [2, 5, 1], 3) == pytest.approx((5 / 6 + 1 / 6 + 0) / 3)
    # k=2: query 0: 1 / min(2, 2) = 1/2; query 1: (1/2) / min(5, 2) = 1/4
    assert metrics.map_at_k(RANKED, [2, 5, 0], 2) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert metrics.map_at_k(RANKED[2:], 0, 4) == 0.0  # no query with a relevant item


def test_metrics_map_at_k_equals_ap_when_k_covers_all():
    rng = np.random.default_rng(2)
    rel = rng.random((50, 12)) < 0.3
    n_rel = rel.sum(1) + rng.integers(0, 3, 50)  # some relevant items never retrieved
    n_rel = np.minimum(n_rel, 12)  # so min(n_rel, k) == n_rel
    keep = n_rel > 0
    aps = [metrics.average_precision(r, n) for r, n in zip(rel[keep], n_rel[keep], strict=True)]
    assert metrics.map_at_k(rel, n_rel, 12) == pytest.approx(np.mean(aps), abs=1e-12)


def test_metrics_precision_at_k_hand():
    assert metrics.precision_at_k(RANKED, 1) == pytest.approx((1 + 0 + 0) / 3)
    assert metrics.precision_at_k(RANKED, 3) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert metrics.precision_at_k(RANKED, 4) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.average_precision(np.array([1, 0, 1])), "1-D bool"),  # int, not bool
        (lambda: metrics.average_precision(RANKED), "1-D bool"),
        (lambda: metrics.average_precision(np.ones(2, bool), n_relevant=1), "below the 2 hits"),
        (lambda: metrics.map_at_k(RANKED, [2, 5, 0], 5), "k=5 exceeds"),  # RANKED has 4 columns
        (lambda: metrics.map_at_k(RANKED, [2, 5], 3), "n_relevant must be"),  # 3 queries
        (lambda: metrics.map_at_k(RANKED, [1, 5, 0], 3), "more hits"),  # query 0 has 2 hits
        (lambda: metrics.map_at_k(RANKED[0], 2, 3), "2-D bool"),
        (lambda: metrics.map_at_k(np.zeros((0, 4), bool), 1, 1), "2-D bool"),  # no queries
        (lambda: metrics.precision_at_k(RANKED, 0), "k must be a positive int"),
        (lambda: metrics.precision_at_k(RANKED.astype(int), 1), "2-D bool"),
        (lambda: metrics.precision_at_k(np.zeros((0, 4), bool), 1), "2-D bool"),
        (lambda: metrics.random_map_at_k(5, 4, 2), "n_relevant <= n_candidates"),
        (lambda: metrics.random_map_at_k(1, 4, 5), "k=5 exceeds"),
        (lambda: metrics.random_precision_at_k([1, 2], [4, 4, 4], 2), "n_relevant must be"),
        (lambda: metrics.random_precision_at_k(-1, 4, 2), "n_relevant must be"),
    ],
)
def test_metrics_ranking_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- random baselines ---


def test_metrics_random_baselines_hand():
    # 1 relevant of 2: rank 1 (AP 1) or rank 2 (AP 1/2), each with probability 1/2 -> 3/4
    assert metrics.random_map_at_k(1, 2, 2) == pytest.approx(3 / 4)
    # 2 relevant of 4, k=2, the 6 equally likely placements:
    # {1,2}: 1; {1,3},{1,4}: 1/2 each; {2,3},{2,4}: (1/2)/2 each; {3,4}: 0 -> 2.5/6 = 5/12
    assert metrics.random_map_at_k(2, 4, 2) == pytest.approx(5 / 12)
    assert metrics.random_map_at_k([1, 0], [2, 2], 2) == pytest.approx(3 / 4)  # 0 excluded
    assert metrics.random_precision_at_k([2, 5], [10, 20], 3) == pytest.approx((0.2 + 0.25) / 2)


@pytest.mark.parametrize("n_rel,n_cand,k", [(3, 6, 4), (1, 5, 3), (4, 7, 2), (5, 5, 5)])
def test_metrics_random_map_exact_by_enumeration(n_rel, n_cand, k):
    # every placement of n_rel relevant items among n_cand ranks is equally likely
    rows = []
    for pos in itertools.combinations(range(n_cand), n_rel):
        row = np.zeros(n_cand, bool)
        row[list(pos)] = True
        rows.append(row)
    exact = metrics.map_at_k(np.array(rows), n_rel, k)
    assert metrics.random_map_at_k(n_rel, n_cand, k) == pytest.approx(exact, abs=1e-12)


def test_metrics_random_baselines_monte_carlo():
    rng = np.random.default_rng(0)
    nq, n_cand, k = 40_000, 30, 10
    n_rel = rng.integers(0, 8, size=nq)
    ranks = rng.permuted(np.tile(np.arange(n_cand), (nq, 1)), axis=1)
    rel = ranks < n_rel[:, None]  # item at each rank is relevant if its id < n_rel
    # AP@10 per query has std <= 0.5, so the standard error of the mean over ~35k queries
    # is below 0.003; precision@10 is tighter still. Tolerance 0.01 is > 3 standard errors.
    assert metrics.map_at_k(rel, n_rel, k) == pytest.approx(
        metrics.random_map_at_k(n_rel, n_cand, k), abs=0.01
    )
    assert metrics.precision_at_k(rel, k) == pytest.approx(
        metrics.random_precision_at_k(n_rel, n_cand, k), abs=0.01
    )
