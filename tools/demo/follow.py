"""The demo's reader: follows the store while training runs, evaluates each completed epoch.

Sleeps in Reader.wait() (woken by commits from any writer process). As soon as every sample of an
epoch is in the store, takes that epoch's rows from the key index (Reader.epoch_rows) and computes
the k-NN accuracy of held-out embeddings against training embeddings of that epoch, straight from
the zero-copy views. At the end, follows a few held-out samples across epochs (Reader.history):
how far each one's embedding moved from one epoch to the next. Saves a 2-D projection (PCA) of
each epoch's held-out embeddings and those distances to projections.npz; run.py draws the PNG
from it once training ends (so the plotting does not compete with the training processes for the
2 cores).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import embstore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

K = 5


def knn_accuracy(train_x, train_y, test_x, test_y, k=K):
    """Cosine k-NN (majority vote) accuracy of test against train."""
    def normalize(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    sims = normalize(test_x) @ normalize(train_x).T
    nearest = np.argpartition(-sims, k, axis=1)[:, :k]
    votes = train_y[nearest]
    predicted = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    return float((predicted == test_y).mean())


def pca_2d(x):
    centered = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T


def samples_moved(r, keys, labels):
    """Every version of each key (Reader.history: (row, epoch) in commit order), and the cosine
    distance of its embedding from one epoch to the next; printed and returned for the plot."""
    moved = []
    for key in keys.tolist():
        versions = r.history(key)
        latest = {}
        for row, epoch in versions:  # a later row of the same epoch wins
            latest[epoch] = row
        epochs = sorted(latest)
        v = r.vectors[[latest[e] for e in epochs]].astype(np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        steps = 1.0 - np.sum(v[1:] * v[:-1], axis=1)
        moved.append(steps)
        print(f"[reader] held-out sample {key} (digit {labels[key]}): {len(versions)} versions "
              f"via history(), rows {[row for row, _ in versions]}; cosine distance moved per "
              f"epoch: {' '.join(f'{d:.3f}' for d in steps)}", flush=True)
    width = max((len(m) for m in moved), default=0)
    table = np.full((len(moved), width), np.nan)
    for i, m in enumerate(moved):
        table[i, :len(m)] = m
    return np.asarray(keys, np.int64), table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    args = parser.parse_args()
    store = os.path.join(args.run, "digits.emb")
    r = embstore.Reader(store)
    meta = r.metadata
    epochs, per_epoch = meta["epochs"], meta["samples"]
    heldout = np.zeros(per_epoch, bool)
    heldout[common.split(per_epoch, meta["split_seed"])[1]] = True
    labels = np.load(os.path.join(args.run, "digits.npz"))["labels"]
    counts = np.zeros(epochs, np.int64)
    seen, next_epoch = 0, 0
    projections, figures = [], []
    while next_epoch < epochs:
        # Epoch e cannot be complete before the store holds (e + 1) * per_epoch rows: sleep in
        # the C++ wait until then instead of waking this process for every append.
        if not r.wait(max(seen + 1, (next_epoch + 1) * per_epoch), timeout=300):
            raise SystemExit(f"[reader] no new rows for 300 s after {seen}")
        n = len(r)
        new_epochs = r.epochs[seen:n]  # zero-copy strided view of the index
        counts += np.bincount(new_epochs[new_epochs < epochs].astype(np.int64),
                              minlength=epochs)
        seen = n
        while next_epoch < epochs and counts[next_epoch] == per_epoch:
            start = time.perf_counter()
            rows = r.epoch_rows(next_epoch)  # the key index: no scan of the store
            keys = r.keys[rows].astype(np.int64)
            vectors = r.vectors[rows]  # fancy indexing gathers this epoch's rows
            is_heldout = heldout[keys]
            acc = knn_accuracy(vectors[~is_heldout], labels[keys[~is_heldout]],
                               vectors[is_heldout], labels[keys[is_heldout]])
            figures.append((next_epoch, acc))
            projections.append((pca_2d(vectors[is_heldout]), labels[keys[is_heldout]]))
            print(f"[reader] epoch {next_epoch + 1}/{epochs} complete in the store "
                  f"({per_epoch} rows; {n} rows total): {K}-NN held-out accuracy from stored "
                  f"embeddings {100 * acc:.1f}% ({1000 * (time.perf_counter() - start):.0f} ms)",
                  flush=True)
            next_epoch += 1

    moved_keys, moved = samples_moved(r, np.flatnonzero(heldout)[:3], labels)
    np.savez(os.path.join(args.run, "projections.npz"),
             accuracy=np.array([a for _, a in figures]),
             moved_keys=moved_keys, moved=moved,
             **{f"xy{e}": xy for e, (xy, _) in enumerate(projections)},
             **{f"y{e}": y for e, (_, y) in enumerate(projections)})
    with open(os.path.join(args.run, "reader.json"), "w") as f:
        json.dump({"knn_accuracy": [a for _, a in figures]}, f)


if __name__ == "__main__":
    main()


def plot(run, png):
    """Draws projections.npz (written by main) as one scatter plot per epoch into `png`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = np.load(os.path.join(run, "projections.npz"))
    accuracy = data["accuracy"]
    epochs = len(accuracy)
    panels = epochs + 1  # the last one: how far a few held-out samples moved (history)
    cols = min(4, panels)
    rows_n = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for epoch, ax in zip(range(epochs), axes.flat):
        xy, y = data[f"xy{epoch}"], data[f"y{epoch}"]
        points = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
        ax.set_title(f"epoch {epoch + 1}: {K}-NN {100 * accuracy[epoch]:.1f}%", fontsize=9)
    ax = axes.flat[epochs]
    ax.axis("on")
    for key, steps in zip(data["moved_keys"].tolist(), data["moved"]):
        ax.plot(range(2, len(steps) + 2), steps, marker="o", ms=3, label=f"sample {key}")
    ax.set_title("held-out samples: distance moved\nsince the previous epoch (history)",
                 fontsize=9)
    ax.set_xticks(range(2, epochs + 1))
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("cosine distance", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.colorbar(points, ax=axes.ravel().tolist(), ticks=range(10), label="digit", shrink=0.8)
    fig.suptitle("Held-out digits: penultimate-layer embeddings per epoch (PCA), read from "
                 "the store")
    fig.savefig(png, dpi=100)
