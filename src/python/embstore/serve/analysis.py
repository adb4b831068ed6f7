"""What the server computes from rows: labels, 2-D PCA bases, projections, nearest neighbours."""
from __future__ import annotations

import csv
import json
from typing import Optional

import numpy as np

# Bytes of one float64 copy of the rows gathered and compared per step of a neighbour scan: a
# step holds a few such copies, so this bounds the server's memory whatever the dim.
kScanChunkBytes = 16 << 20
# A PCA basis is fitted on at most this many of the sampled rows (all of them are projected).
kFitRows = 2000
# Up to this dim the basis is exact (eigenvectors of the dim x dim covariance, n * dim^2 work);
# above it, randomized subspace iteration (n * dim * ~140 work): with 10 directions for the 2
# wanted, the error shrinks by (lambda_11 / lambda_2)^(2q+1), negligible for a plot.
kExactMaxDim = 128
kSubspaceDirections = 10
kPowerIterations = 6


class LabelsError(Exception):
    """The labels file cannot be used; the message names the file, line and value."""


def _parse_key(text, where: str) -> int:
    try:
        key = int(str(text).strip(), 10)
    except ValueError:
        raise LabelsError(f"{where}: key {text!r} is not an integer") from None
    if not 0 <= key < 2**64:
        raise LabelsError(f"{where}: key {key} is outside 0 .. 2**64-1")
    return key


class Labels:
    """Keys -> labels, looked up for many keys at once.

    File formats (chosen by the first non-blank character):
      * JSON: an object ``{"KEY": LABEL, ...}``; KEY a decimal integer string, LABEL a string
        or a number (shown as text).
      * CSV: lines ``KEY,LABEL``; an optional first line ``key,label`` is skipped; LABEL may be
        quoted (CSV rules) and may contain commas.
    Keys absent from the file have no label (null in the API).
    """

    def __init__(self, mapping: dict) -> None:
        keys = np.fromiter(mapping.keys(), np.uint64, len(mapping))
        order = np.argsort(keys)
        self.keys = keys[order]
        names = [str(v) for v in mapping.values()]
        self.names = sorted(set(names))
        index = {name: i for i, name in enumerate(self.names)}
        self.codes = np.array([index[n] for n in names], np.int64)[order]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, path: str) -> "Labels":
        try:
            # utf-8-sig: Excel's "CSV UTF-8" and Windows editors start the file with a BOM.
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise LabelsError(f"cannot read the labels file {path}: {e}") from None
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except ValueError as e:
                raise LabelsError(f"{path}: not valid JSON: {e}") from None
            mapping = {}
            for k, v in data.items():
                if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise LabelsError(f"{path}: the label of key {k!r} is {v!r}; labels must "
                                      "be strings or numbers")
                mapping[_parse_key(k, path)] = v
            return cls(mapping)
        mapping = {}
        for number, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if number == 1 and [c.strip().lower() for c in row] == ["key", "label"]:
                continue
            where = f"{path} line {number}"
            if len(row) != 2:
                raise LabelsError(f"{where}: expected KEY,LABEL; got {len(row)} fields")
            mapping[_parse_key(row[0], where)] = row[1].strip()
        return cls(mapping)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Label index (into ``names``) per key, -1 where the key has no label."""
        keys = np.asarray(keys, np.uint64)
        if not len(self.keys):
            return np.full(len(keys), -1, np.int64)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[at] == keys, self.codes[at], -1)


def as_float(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """Rows as float64 for a float64 store (float32 would make values above 3.4e38 infinite and
    merge values closer than 6e-8 relative), else as float32 (half the memory of float64, and
    exact for the other dtypes). bfloat16 stores hold uint16 bit patterns."""
    if dtype == "bfloat16":
        return (np.asarray(vectors).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(vectors, dtype=np.float64 if dtype == "float64" else np.float32)


class Basis:
    """A 2-D PCA basis: the sample mean and the first two principal directions."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, explained: list) -> None:
        self.mean = mean
        self.components = components  # (2, dim)
        self.explained = explained  # fraction of the sample's variance along each direction

    @classmethod
    def fit(cls, sample: np.ndarray) -> "Basis":
        """PCA of ``sample`` (rows), or of a random kFitRows of them. Not an SVD of the whole
        sample: that costs seconds at 10,000 x 128 on Debian's reference BLAS."""
        sample = np.asarray(sample, np.float64)
        rows, dim = sample.shape
        rng = np.random.default_rng(0)  # the same sample gives the same basis
        if rows > kFitRows:
            sample = sample[np.sort(rng.choice(rows, kFitRows, replace=False))]
        mean = sample.mean(axis=0) if rows else np.zeros(dim)
        components = np.zeros((2, dim))
        explained = [0.0, 0.0]
        if rows >= 2:
            centered = sample - mean
            # Divided by its largest element (directions and variance fractions stay): a float64
            # store's values can be finite with squares that are not (above 1.3e154).
            peak = float(np.abs(centered).max())
            if 0 < peak < np.inf:
                centered /= peak
            if dim <= kExactMaxDim:
                values, vectors = np.linalg.eigh(centered.T @ centered)
                variances, directions = values[::-1][:2], vectors[:, ::-1][:, :2].T
            else:
                k = min(kSubspaceDirections, dim, len(centered))
                q = np.linalg.qr(centered.T @ rng.standard_normal((len(centered), k)))[0]
                for _ in range(kPowerIterations):
                    q = np.linalg.qr(centered.T @ (centered @ q))[0]
                _, s, vt = np.linalg.svd(centered @ q, full_matrices=False)
                variances, directions = s[:2] ** 2, (vt @ q.T)[:2]
            take = len(directions)
            components[:take] = directions
            total = float((centered**2).sum())
            if total > 0:
                explained[:take] = [max(0.0, float(v)) / total for v in variances]
            # SVD signs are arbitrary: fix them so that a redraw does not mirror the plot.
            for c in components:
                if c[np.argmax(np.abs(c))] < 0:
                    c *= -1
        return cls(mean, components, explained)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        return (np.asarray(vectors, np.float64) - self.mean) @ self.components.T


def finite_rows(vectors: np.ndarray) -> np.ndarray:
    """True for each row (of float values) without a NaN or an infinite value: the rows a PCA
    or a distance can use."""
    return np.isfinite(vectors).all(axis=1)


def nearest(vectors: np.ndarray, dtype: str, rows: np.ndarray, query: np.ndarray, k: int,
            exclude: Optional[np.ndarray] = None):
    """The ``k`` rows (of ``rows``) nearest to ``query`` (finite) in Euclidean distance, nearest
    first (ties: lower row first), skipping rows where ``exclude`` is True and rows holding NaN or
    Inf (no distance). Returns (rows, distances, how many rows were skipped as not finite).
    """
    query = as_float(query[None, :], dtype)[0].astype(np.float64)
    best_rows = np.zeros(0, np.int64)
    best_dist = np.zeros(0, np.float64)
    non_finite = 0
    step = max(1, kScanChunkBytes // (8 * len(query)))
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        diff = as_float(vectors[chunk], dtype).astype(np.float64, copy=False) - query
        # Each difference scaled by its largest element: a float64 store's values can be finite
        # with squares that are not (above 1.3e154). A row holding Inf gets NaN (Inf / Inf).
        scale = np.abs(diff).max(axis=1, initial=0.0)
        scale[scale == 0] = 1.0
        with np.errstate(invalid="ignore"):
            dist = scale * np.sqrt(((diff / scale[:, None]) ** 2).sum(axis=1))
        if exclude is not None:
            keep = ~exclude[start:start + step]
            chunk, dist = chunk[keep], dist[keep]
        # A distance is finite unless the row holds NaN or Inf (or is further than 1.8e308).
        keep = np.isfinite(dist)
        non_finite += len(dist) - int(keep.sum())
        chunk, dist = chunk[keep], dist[keep]
        best_rows = np.concatenate([best_rows, chunk])
        best_dist = np.concatenate([best_dist, dist])
        if len(best_rows) > k:
            order = np.lexsort((best_rows, best_dist))[:k]
            best_rows, best_dist = best_rows[order], best_dist[order]
    order = np.lexsort((best_rows, best_dist))
    return best_rows[order], best_dist[order], non_finite
