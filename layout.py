"""The collection map's 2-D layout: PCA, a k-nearest-neighbour graph, a seeded force layout
of that graph (near = similar), how well a layout keeps each painting's neighbours, and the
map's colour column and staleness. numpy and faiss: no model, no page (pages.py).

    import layout
    y = layout.layout_2d(xb, seed=0)          # (n, 2) positions for xb (n, d) unit vectors
    layout.map_kept(xb, y, k=15)              # share of the 15 nearest kept on the map
"""

import os
import re

import faiss
import numpy as np

import metrics
from files import UserError
from index import CHUNK, drop_self, generation

LAYOUT_DIMS = 50  # PCA dims before the layout, as usual before t-SNE: drops the noisy tail
LAYOUT_K = 15  # neighbours per painting in the layout's graph (UMAP's default)


def pca_project(xb, d=LAYOUT_DIMS):
    """(n, min(d, n - 1, dim)) float32: xb centred and projected on its top principal axes.
    n <= dim: an SVD of the rows; else the covariance, summed CHUNK rows at a time, then eigh."""
    n, dim = xb.shape
    d = max(1, min(d, n - 1, dim))
    chunks = range(0, n, CHUNK)
    mean = sum(np.asarray(xb[i:i + CHUNK], np.float64).sum(0) for i in chunks) / n
    if n <= dim:
        u, s, _ = np.linalg.svd(np.asarray(xb, np.float64) - mean, full_matrices=False)
        return (u[:, :d] * s[:d]).astype(np.float32)
    cov = np.zeros((dim, dim))
    for i in chunks:
        a = np.asarray(xb[i:i + CHUNK], np.float32) - mean.astype(np.float32)
        cov += a.T @ a  # float32 products, float64 sum: 2x faster, plenty for a picture
    axes = np.linalg.eigh(cov)[1][:, ::-1][:, :d]  # eigh: ascending eigenvalues
    return np.concatenate([(np.asarray(xb[i:i + CHUNK], np.float64) - mean) @ axes
                           for i in chunks]).astype(np.float32)


def knn_graph(z, k):
    """(n, k) ids of each row's k nearest other rows of z (exact, squared L2)."""
    index = faiss.IndexFlatL2(z.shape[1])
    index.add(np.ascontiguousarray(z, np.float32))
    _, I = index.search(np.ascontiguousarray(z, np.float32), k + 1)
    return I[drop_self(I, np.arange(len(z)), k)].reshape(len(z), k)


def graph_layout(nn, y, seed=0, epochs=200, draws=None, push_rate=5):
    """Positions (n, 2) for the k-nearest-neighbour graph nn (n, k), from y (n, 2): each
    epoch every edge pulls its two ends together and random pairs push apart, with the
    Student-t forces of t-SNE, LargeVis and UMAP (clipped to 4, as UMAP) and a step that falls
    linearly to 0. Each painting draws `draws` random others, weighted to stand for push_rate
    pushes per edge (UMAP's negative sampling); steps are divided by the node's degree.
    draws: 32 up to 5,000 paintings (less noise in the push than 8: neighbours kept on the
    demo 0.49 -> 0.51, 0.81 -> 0.85 with a CRNN checkpoint), down to 8 at 20,000 (time)."""
    rng = np.random.default_rng(seed)
    n, k = nn.shape
    draws = draws or max(8, min(32, 160_000 // n))
    a, b = np.repeat(np.arange(n), k), nn.ravel()
    degree = (np.bincount(a, minlength=n) + np.bincount(b, minlength=n))[:, None]
    for e in range(epochs):
        d = y[a] - y[b]
        pull = np.clip(-2 * d / (1 + (d * d).sum(1, keepdims=True)), -4, 4)
        step = np.stack([np.bincount(a, pull[:, c], n) - np.bincount(b, pull[:, c], n)
                         for c in (0, 1)], 1)
        d = y[:, None, :] - y[rng.integers(0, n, (n, draws))]
        d2 = (d * d).sum(2, keepdims=True)
        push = np.clip(2 * d / ((0.001 + d2) * (1 + d2)), -4, 4).sum(1) * (push_rate * k / draws)
        y = y + (1 - e / epochs) * (step + push) / degree
    return y


def layout_2d(xb, seed=0):
    """(n, 2) float64 map positions: near = similar embeddings. PCA to LAYOUT_DIMS, the
    LAYOUT_K-nearest-neighbour graph there, then graph_layout from the first two components
    (keeps the collection's global arrangement; UMAP starts from a spectral layout the same way)."""
    z = pca_project(xb)
    n = len(z)
    y = np.zeros((n, 2))
    y[:, :min(2, z.shape[1])] = z[:, :2]
    y = y / max(np.abs(y).max(), 1e-12) * 10  # UMAP's starting scale: +-10
    if n < 3:
        return y
    return graph_layout(knn_graph(z, min(LAYOUT_K, n - 1)), y, seed)


def map_kept(xb, y, k=LAYOUT_K):
    """Share of each painting's k nearest neighbours in xb (cosine: xb unit rows) that stay
    among its k nearest on the map y (n, 2), averaged over paintings (1 = all kept; a map of
    random points ~k/n). bench.py and the tests compare layouts with it."""
    return metrics.neighbours_kept(knn_graph(np.asarray(xb, np.float32), k),
                                   knn_graph(np.asarray(y, np.float32), k))


def colour_column(flag, meta, label_columns):
    """retrieve.py --map --color-by: a column of meta.csv, or none; by default the first of
    label_columns that has at least two values."""
    cols = list(meta[0])
    if flag is None:
        return next((c for c in label_columns if c in cols and
                     len({r[c] for r in meta if r[c]}) > 1), None)
    if flag == "none":
        return None
    if flag not in cols:
        raise UserError(f"--color-by {flag}: not a column of the index's meta.csv "
                        f"({', '.join(cols)}, or none)")
    return flag


def stale_map_note(index_dir):
    """After retrieve.py --build/--add: say so when INDEX/map.html draws an older generation
    (pages.map_page records the one it drew); returns True when it is stale."""
    path = os.path.join(index_dir, "map.html")
    try:
        with open(path, encoding="utf-8") as f:
            m = re.search(r'"generation":"([^"]*)"', f.read())
    except OSError:
        return None
    drawn, now = m[1] if m else "an older index", os.path.basename(generation(index_dir))
    if drawn != now:
        print(f"note: {path} draws {drawn}, the index is now {now}: it lacks the changes; "
              f"run --map --index {index_dir} again")
    return drawn != now
