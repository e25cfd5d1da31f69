"""Metadata filters and the filtered search: --where on meta.csv's columns, and a FAISS search
that keeps only the selected rows, so k hits come back whenever k rows match.

Holds no embedding, no aspect and no command line (retrieve.py): faiss and numpy over an index
index.py opened. Sits above index.py, below embed.py and by.py.

    import filters
    keep = filters.where_rows(meta, ["style=Baroque", "year<1700", "artist=rembrandt|vermeer"])
    ix = filters.Filtered(index, xb, keep)      # .search(xq, k) -> D, I over the kept rows only
    D, I = ix.search(xq, 5)                    # I: meta.csv row numbers, as an index's own

A filter is COLUMN OP VALUE, OP one of = != < <= > >=; `|` separates values of which any may
match (= and the orderings) or none may (!=). A value and a cell that both read as numbers are
compared as numbers (a cell like "c. 1630" reads as its first number, 1630); otherwise as text,
case-insensitive. Several filters must all hold.
"""

import re

import faiss
import numpy as np

from files import UserError
from index import inner

# FAISS names (index.py): xb (n, d) stored vectors, xq (nq, d) queries, D scores, I row ids.

OPS = ("<=", ">=", "!=", "=", "<", ">")  # two-character ones first: 'a<=1' is not 'a<' '=1'
NUMBER = re.compile(r"\d+(?:\.\d+)?")
EXACT_MAX = 50_000  # selected rows up to which an exact search is cheaper than FAISS's filtered
# one (bench.py: 1% of 100k x 2048 exact ~5x faster than the unfiltered flat search)


# ----------------------------------------------------------------------------- --where

def parse_where(text):
    """(column, op, [values]) from 'style=Baroque', 'year<1700', 'artist=rembrandt|vermeer'."""
    m = re.fullmatch(r"\s*([^=!<>]+?)\s*(<=|>=|!=|=|<|>)\s*(.*?)\s*", text)
    if not m or not m[1]:
        raise UserError(f"--where {text!r}: expected COLUMN OP VALUE with OP one of "
                        f"{' '.join(OPS)}, e.g. 'year<1700' or 'style=Baroque|Rococo'")
    values = [v.strip() for v in m[3].split("|")]
    return m[1], m[2], values


def as_number(text):
    """The cell's number (the whole cell, else its first number: 'c. 1630' -> 1630), or None."""
    try:
        return float(text)
    except (TypeError, ValueError):
        m = NUMBER.search(text or "")
        return float(m[0]) if m else None


def compare(a, op, b):
    return {"=": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def cell_matches(cell, op, values):
    """Whether one meta.csv cell passes `op values` (any value; != : none of them)."""
    if op == "!=":
        return not cell_matches(cell, "=", values)
    for v in values:
        if NUMBER.fullmatch(v.removeprefix("-")):  # a number: the cell's number, if it has one
            nc = as_number(cell)
            if nc is not None and compare(nc, op, float(v)):
                return True
        elif compare((cell or "").strip().casefold(), op, v.casefold()):  # text, any case
            return True
    return False


def where_rows(meta, wheres):
    """Sorted int64 row ids of meta (dicts) that pass every filter in wheres (strings); None
    when there are none. One line naming the columns for an unknown one, and the counts when
    nothing passes."""
    if not wheres:
        return None
    columns = list(meta[0]) if meta else ["path"]
    keep, counts = np.ones(len(meta), bool), []
    for text in wheres:
        col, op, values = parse_where(text)
        if col not in columns:
            raise UserError(f"--where {text!r}: no column {col!r} in meta.csv (columns: "
                            f"{', '.join(columns)})")
        ok = np.array([cell_matches(r.get(col), op, values) for r in meta], bool)
        counts.append(f"{text} keeps {int(ok.sum())}")
        keep &= ok
    if not keep.any():
        raise UserError(f"--where keeps none of the {len(meta)} rows ({'; '.join(counts)}; "
                        "together 0)")
    print(f"where: {int(keep.sum())} of {len(meta)} rows kept ({'; '.join(counts)})")
    return np.flatnonzero(keep)


# ----------------------------------------------------------------------------- filtered search

def chain_of(index):
    """The vector transforms (PCA, re-normalisation) an index applies before its inner part."""
    if isinstance(index, faiss.IndexPreTransform):
        return [index.chain.at(i) for i in range(index.chain.size())]
    return getattr(index, "chain", [])  # index.OnGpu keeps them too


def transformed(index, x):
    x = np.ascontiguousarray(x, np.float32)
    for vt in chain_of(index):
        x = vt.apply(x)
    return x


def exact_search(index, xb, keep, xq, k, chunk=16384):
    """D, I of the k best rows of xb among keep (ascending ids) for each query, by inner
    product in the index's own space (its transforms applied to both sides); -1 pads."""
    q = transformed(index, xq)
    D = np.full((len(q), k), -np.inf, np.float32)
    I = np.full((len(q), k), -1, np.int64)
    for lo in range(0, len(keep), chunk):
        ids = keep[lo:lo + chunk]
        s = q @ transformed(index, xb[ids]).T  # (nq, chunk)
        D2, I2 = np.concatenate([D, s], 1), np.concatenate([I, np.broadcast_to(ids, s.shape)], 1)
        top = np.argsort(-D2, 1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D2, top, 1), np.take_along_axis(I2, top, 1)
    D[I < 0] = -np.inf
    return D, I


def selector_params(index, keep):
    """(SearchParameters with an IDSelectorBitmap of keep, the bitmap to keep alive), or None
    where the index type takes no selector (a GPU copy)."""
    body = inner(getattr(index, "cpu", index))
    bits = np.packbits(np.isin(np.arange(body.ntotal), keep), bitorder="little")
    sel = faiss.IDSelectorBitmap(bits)
    if hasattr(body, "hnsw"):
        p = faiss.SearchParametersHNSW(sel=sel, efSearch=body.hnsw.efSearch)
    elif hasattr(body, "nprobe"):
        p = faiss.SearchParametersIVF(sel=sel, nprobe=body.nprobe)
    else:
        p = faiss.SearchParameters(sel=sel)
    cpu = getattr(index, "cpu", index)
    if isinstance(cpu, faiss.IndexPreTransform):
        p = faiss.SearchParametersPreTransform(index_params=p)
    return p, bits, sel


class Filtered:
    """An index's search limited to the rows keep (ascending ids): .search(xq, k) -> D, I with
    I in the index's own row ids, k hits whenever len(keep) >= k. Few rows (<= EXACT_MAX): an
    exact search over them; else FAISS with an IDSelector (flat, hnsw, ivf; on the CPU copy),
    and any query it leaves short (a graph or the probed lists hold too few kept rows) again
    exactly. positions=True: I as positions in keep instead (a subset that counts from 0)."""

    def __init__(self, index, xb, keep, positions=False):
        self.index, self.xb, self.keep = index, xb, np.asarray(keep, np.int64)
        self.ntotal, self.positions = len(self.keep), positions
        self.params = None if len(self.keep) <= EXACT_MAX else selector_params(index, self.keep)

    def search(self, xq, k):
        if self.params is None:
            D, I = exact_search(self.index, self.xb, self.keep, xq, k)
        else:
            cpu = getattr(self.index, "cpu", self.index)
            D, I = cpu.search(np.ascontiguousarray(xq, np.float32), k, params=self.params[0])
            short = np.flatnonzero((I < 0).any(1)) if self.ntotal >= k else []
            if len(short):
                D[short], I[short] = exact_search(self.index, self.xb, self.keep, xq[short], k)
        if self.positions:
            I = np.where(I >= 0, np.searchsorted(self.keep, I), -1)
        return D, I


def restrict(meta, xb, index, keep):
    """(meta, xb, index) of the rows keep only, numbered from 0 (--eval and --map work on the
    subset as on a smaller collection); all three as they were when keep is None."""
    if keep is None:
        return meta, xb, index
    return [meta[i] for i in keep], np.asarray(xb[keep]), Filtered(index, xb, keep, True)
