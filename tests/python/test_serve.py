"""`embstore serve`: its JSON API against a real server process on 127.0.0.1 while a writer
process appends, checked against numpy on the store; bad input, static files, damage, read-only."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import embstore
import embstore.shards
from serve_helpers import ServerProcess, WriterProcess, read_line

pytest.importorskip("aiohttp")
from embstore.serve import analysis, store as serve_store  # noqa: E402

DIM = 16


@pytest.fixture
def server_on(request):
    """server_on(store, *args) starts a server; every one started is stopped at the end and
    must have exited cleanly (exit 0 on SIGTERM)."""
    started = []

    def start(path, *args):
        server = ServerProcess(path, *args)
        started.append(server)
        return server
    yield start
    for server in started:
        code, err = server.stop()
        assert code == 0, err


def texts(values):
    """Keys or epochs as the API sends them: decimal strings (exact in JavaScript)."""
    return [str(int(v)) for v in values]


def numpy_pca(x):
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    return centred @ vt[:2].T


def test_api_follows_a_writer_and_answers_like_numpy(store, tmp_path, server_on):
    embstore.create(store, dim=DIM)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(k): f"class {k % 10}" for k in range(0, 400, 2)}))
    server = server_on(store, "--labels", str(labels))
    empty = server.ok("/api/stats")
    assert (empty["rows"], empty["epochs"], empty["labels"]) == (0, [], 200)
    assert empty["last_commit_unix"] is None  # the store records no commit yet
    status, body = server.get("/api/projection")
    assert status == 404 and "no rows yet" in body["error"]

    writer = WriterProcess(store, DIM)
    try:
        before = time.time()
        writer.append(0, 0, 400)
        after = time.time()
        stats = server.until("/api/stats", lambda s: s["rows"] == 400)
        assert stats["epochs"] == [{"epoch": "0", "rows": 400}]
        assert before <= stats["last_commit_unix"] <= after and stats["bytes_on_disk"] > 0

        # Epoch 1 appears while the writer is appending it, and the figures move.
        writer.send(1, 0, 400, batch=20)
        moving = server.until("/api/stats", lambda s: s["rows"] > 400)
        assert moving["rows_per_second"] > 0
        writer.done()
        after = time.time()
        stats = server.until("/api/stats", lambda s: s["rows"] == 800)
        assert stats["epochs"] == [{"epoch": "0", "rows": 400}, {"epoch": "1", "rows": 400}]
        assert moving["last_commit_unix"] <= stats["last_commit_unix"] <= after
        # Key 7 appended again at epoch 1: the later row is its vector there.
        writer.append(1, 7, 8)
        server.until("/api/stats", lambda s: s["rows"] == 801)
    finally:
        writer.close()

    r = embstore.Reader(store)
    keys, epochs, vectors = r.keys.astype(np.int64), r.epochs.astype(np.int64), r.vectors
    assert len(r) == 801
    assert server.ok("/api/epochs")["epochs"] == [{"epoch": "0", "rows": 400},
                                                  {"epoch": "1", "rows": 401}]

    # Projection: all rows of the epoch (under the sample size), PCA as numpy computes it.
    for epoch in (0, 1):
        p = server.ok(f"/api/projection?epoch={epoch}")
        rows = np.flatnonzero(epochs == epoch)
        assert p["rows"] == rows.tolist() and p["keys"] == texts(keys[rows])
        expected = numpy_pca(vectors[rows])
        got = np.stack([p["x"], p["y"]], axis=1)
        np.testing.assert_allclose(np.abs(got), np.abs(expected), rtol=1e-3, atol=1e-3)
        for i, key in enumerate(p["keys"]):
            code = p["labels"][i]
            assert (p["label_names"][code] if code >= 0 else None) == \
                (f"class {int(key) % 10}" if int(key) % 2 == 0 else None)
    sampled = server.ok("/api/projection?epoch=0&limit=50")
    assert sampled["sampled"] == len(sampled["x"]) == 50
    assert set(sampled["rows"]) <= set(np.flatnonzero(epochs == 0).tolist())
    assert server.ok("/api/projection?epoch=0&limit=50")["rows"] == sampled["rows"]

    # Neighbours of key 7 at epoch 1: from its later row, over the other keys' rows.
    n = server.ok("/api/neighbours?key=7&epoch=1&k=6")
    query_row = int(np.flatnonzero((keys == 7) & (epochs == 1))[-1])
    candidates = np.flatnonzero((epochs == 1) & (keys != 7))
    dist = np.linalg.norm(vectors[candidates].astype(np.float64) - vectors[query_row], axis=1)
    best = np.argsort(dist)[:6]
    assert n["row"] == query_row and n["exact"] and n["scanned"] == n["epoch_rows"] == 401
    assert [x["key"] for x in n["neighbours"]] == texts(keys[candidates[best]])
    np.testing.assert_allclose([x["distance"] for x in n["neighbours"]], dist[best], rtol=1e-6)
    assert n["label"] is None and server.ok("/api/neighbours?key=8&epoch=1")["label"] == "class 8"
    assert len(server.ok("/api/neighbours?key=8")["neighbours"]) == 10  # defaults

    # History: the key's row at each epoch (the later of two at epoch 1); one trajectory point
    # per epoch, in that epoch's basis.
    h = server.ok("/api/history?key=7")
    assert h["rows"] == [7, query_row] and h["epochs"] == ["0", "1"] and h["total_epochs"] == 2
    assert [(t["epoch"], t["row"]) for t in h["trajectory"]] == [("0", 7), ("1", query_row)]
    for point in h["trajectory"]:
        p = server.ok(f"/api/projection?epoch={point['epoch']}")
        if point["row"] in p["rows"]:
            at = p["rows"].index(point["row"])
            assert (point["x"], point["y"]) == pytest.approx((p["x"][at], p["y"][at]), abs=1e-4)
        else:  # the duplicate row: project it with numpy on that epoch's rows
            rows = np.flatnonzero(epochs == int(point["epoch"]))
            x = vectors[rows].astype(np.float64)
            mean = x.mean(axis=0)
            _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
            expected = (vectors[point["row"]] - mean) @ vt[:2].T
            assert np.abs([point["x"], point["y"]]) == pytest.approx(np.abs(expected), abs=1e-4)


def test_last_commit_is_what_the_store_recorded_not_when_the_server_saw_it(store, server_on):
    embstore.create(store, dim=DIM)
    before = time.time()
    with embstore.Writer(store) as w:
        w.append(np.arange(10), np.ones((10, DIM), np.float32))
    after = time.time()
    recorded = embstore.info(store)["last_commit_unix_ns"] / 1e9
    server = server_on(store)
    stats = server.ok("/api/stats")
    assert stats["rows"] == 10 and stats["last_commit_unix"] == recorded
    assert before <= recorded <= after <= stats["server_started_unix"]


def test_last_commit_of_several_shards_is_the_newest_and_none_when_unrecorded(tmp_path):
    paths = [str(tmp_path / name) for name in ("s0", "s1", "empty")]
    for i, path in enumerate(paths):
        embstore.create(path, dim=4)
        if path.endswith("empty"):
            continue
        with embstore.Writer(path) as w:
            w.append([i], np.ones((1, 4), np.float32))
    infos = embstore.ShardSet(paths).info()
    newest = max(info["last_commit_unix_ns"] for info in infos)
    assert newest == infos[1]["last_commit_unix_ns"] >= infos[0]["last_commit_unix_ns"] > 0
    assert serve_store.last_commit_unix(infos) == newest / 1e9
    assert serve_store.last_commit_unix(infos[2]) is None


def test_a_manifest_of_shards_is_served_and_follows_its_writers(tmp_path, server_on):
    """A manifest of two shards: the page's figures, projection, neighbours and history are those
    of the ShardSet's global rows, while a writer process appends to the second shard (which
    renumbers nothing before it, and the snapshot keeps its own numbering)."""
    paths = [str(tmp_path / name) for name in ("s0", "s1")]
    for path in paths:
        embstore.create(path, dim=DIM)
    first = WriterProcess(paths[0], DIM)
    try:
        first.append(0, 0, 300)
    finally:
        first.close()
    manifest = tmp_path / "run.json"
    shards = [{"path": name, "store_id": embstore.info(p)["store_id"], "rows": 0, "epochs": []}
              for name, p in zip(("s0", "s1"), paths)]
    embstore.shards.write_manifest(manifest, {"dim": DIM, "dtype": "float32", "metadata": "",
                                              "shards": shards})
    server = server_on(str(manifest))
    assert server.until("/api/stats", lambda s: s["rows"] == 300)["epochs"] == \
        [{"epoch": "0", "rows": 300}]
    writer = WriterProcess(paths[1], DIM)
    try:
        writer.append(0, 300, 500)
        writer.append(1, 0, 200)
        stats = server.until("/api/stats", lambda s: s["rows"] == 700)
    finally:
        writer.close()
    assert stats["epochs"] == [{"epoch": "0", "rows": 500}, {"epoch": "1", "rows": 200}]

    s = embstore.shards.ShardSet(str(manifest))
    keys, epochs = s.keys.astype(np.int64), s.epochs.astype(np.int64)
    vectors = s.gather(np.arange(len(s)))
    for epoch in (0, 1):
        p = server.ok(f"/api/projection?epoch={epoch}")
        rows = np.flatnonzero(epochs == epoch)
        assert p["rows"] == rows.tolist() and p["keys"] == texts(keys[rows])
        got = np.stack([p["x"], p["y"]], axis=1)
        np.testing.assert_allclose(np.abs(got), np.abs(numpy_pca(vectors[rows])), rtol=1e-3,
                                   atol=1e-3)
    # Key 5: row 5 of shard 0 at epoch 0, and at epoch 1 in shard 1 (global row 500 + 5).
    h = server.ok("/api/history?key=5")
    assert h["rows"] == [5, 505] and h["epochs"] == ["0", "1"]
    n = server.ok("/api/neighbours?key=5&epoch=1&k=4")
    candidates = np.flatnonzero((epochs == 1) & (keys != 5))
    dist = np.linalg.norm(vectors[candidates].astype(np.float64) - vectors[505], axis=1)
    best = np.argsort(dist)[:4]
    assert n["row"] == 505 and [x["key"] for x in n["neighbours"]] == \
        texts(keys[candidates[best]])
    np.testing.assert_allclose([x["distance"] for x in n["neighbours"]], dist[best], rtol=1e-6)
    # Rows of shard 0 (epoch 0) keep their place: key 250's neighbours come from both shards.
    assert server.ok("/api/neighbours?key=250&epoch=0&k=3")["row"] == 250


def test_a_truncated_store_is_followed_to_its_new_generation(store, server_on):
    """Writer.truncate() switches the store to a new generation with fewer rows: the page's
    figures follow it down (epoch counts recounted, not carried over), then up again."""
    embstore.create(store, dim=DIM)
    writer = WriterProcess(store, DIM)
    try:
        writer.append(0, 0, 300)
        writer.append(1, 0, 300)
    finally:
        writer.close()
    server = server_on(store)
    server.until("/api/stats", lambda s: s["rows"] == 600)
    with embstore.Writer(store) as w:
        assert w.truncate(from_epoch=1) == 300
    stats = server.until("/api/stats", lambda s: s["rows"] == 300)
    assert stats["epochs"] == [{"epoch": "0", "rows": 300}]
    assert server.ok("/api/history?key=5")["rows"] == [5]
    writer = WriterProcess(store, DIM)
    try:
        writer.append(2, 0, 100)
    finally:
        writer.close()
    stats = server.until("/api/stats", lambda s: s["rows"] == 400)
    assert stats["epochs"] == [{"epoch": "0", "rows": 300}, {"epoch": "2", "rows": 100}]
    assert server.ok("/api/history?key=5")["rows"] == [5, 305]
    assert server.ok("/api/neighbours?key=5&epoch=2&k=3")["row"] == 305


def test_a_manifest_entry_not_copied_yet_does_not_hide_the_shards_added_before_it(tmp_path):
    """The manifest grows by two shards, the second not copied beside it yet: the follower
    serves the first (its snapshot's rows and epochs count it at once, as its parts do) and says
    what is missing; once the second is there, it is served too."""
    paths = {name: str(tmp_path / name) for name in ("s0", "s1", "s2")}
    for name in ("s0", "s1"):
        embstore.create(paths[name], dim=4)
        with embstore.Writer(paths[name]) as w:
            w.append(np.arange(10) + (100 if name == "s1" else 0), np.ones((10, 4), np.float32),
                     1 if name == "s1" else 0)
    manifest = tmp_path / "run.json"

    def write(names, ids):
        embstore.shards.write_manifest(manifest, {
            "dim": 4, "dtype": "float32", "metadata": "",
            "shards": [{"path": n, "store_id": ids[n], "rows": 0, "epochs": []} for n in names]})

    ids = {n: embstore.info(paths[n])["store_id"] for n in ("s0", "s1")}
    write(["s0"], ids)
    follower = serve_store.Follower(str(manifest))
    assert follower.snapshot.rows == 10
    ids["s2"] = "00" * 16  # listed before its copy arrives (the id checked once it does)
    write(["s0", "s1", "s2"], ids)
    time.sleep(0.01)  # a manifest stamp of its own
    follower._advance()
    snap = follower.check()
    assert snap.rows == 20 and snap.epoch_counts == {0: 10, 1: 10}
    assert "shard 's2' is missing" in follower._manifest_problem
    assert follower.lookup.history(snap, 105).tolist() == [15]
    embstore.create(paths["s2"], dim=4)
    with embstore.Writer(paths["s2"]) as w:
        w.append(np.arange(5) + 200, np.ones((5, 4), np.float32), 2)
    ids["s2"] = embstore.info(paths["s2"])["store_id"]
    write(["s0", "s1", "s2"], ids)
    follower._advance()
    snap = follower.check()
    assert snap.rows == 25 and snap.epoch_counts == {0: 10, 1: 10, 2: 5}
    assert follower._manifest_problem is None


def test_a_truncate_back_to_the_same_row_count_is_followed(store):
    """A truncate and re-append that end on as many rows as the snapshot had: the follower takes
    the new generation (its epochs), not "no new rows"."""
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(100), np.ones((100, 4), np.float32), 0)
        w.append(np.arange(100), np.ones((100, 4), np.float32), 1)
    follower = serve_store.Follower(store)
    assert follower.snapshot.epoch_counts == {0: 100, 1: 100}
    with embstore.Writer(store) as w:
        w.truncate(rows=0)
        w.append(np.arange(5000, 5200), np.ones((200, 4), np.float32), 7)
    follower._advance()
    snap = follower.check()
    assert (snap.rows, snap.generation, snap.epoch_counts) == (200, 2, {7: 200})
    assert follower.lookup.history(snap, 5000).tolist() == [0]
    assert follower.lookup.history(snap, 3).tolist() == []


def test_a_truncate_during_a_refresh_or_a_check_is_not_taken_for_damage(store, monkeypatch):
    """A writer truncating often: the follower's snapshot carries the generation of the rows the
    Reader's refresh saw (Reader.generation), not the store's generation read afterwards, which a
    truncate in between makes newer (its files too small for the snapshot: "damaged"). And a check
    that finds the snapshot's files removed by a truncate re-reads the generation before it says
    the store is damaged."""
    embstore.create(store, dim=1024, segment_mb=1)
    with embstore.Writer(store) as w:
        w.append(np.arange(300), np.ones((300, 1024), np.float32), 0)
    follower = serve_store.Follower(store)
    with embstore.Writer(store) as w:
        w.append(np.arange(300), np.ones((300, 1024), np.float32), 1)
    refresh = follower.reader.refresh

    def refresh_then_truncate():
        rows = refresh()
        with embstore.Writer(store) as w:
            w.truncate(rows=10)  # generation 2: 1 MiB files, less than 600 rows of 4 KiB
        return rows
    follower.reader.refresh = refresh_then_truncate
    follower._advance()
    assert follower.reader.generation == 1 and follower.reader.info()["generation"] == 2
    snap = follower.check()
    assert (snap.rows, snap.generation, snap.epoch_counts) == (600, 1, {0: 300, 1: 300})
    follower.reader.refresh = refresh
    follower._advance()
    snap = follower.check()
    assert (snap.rows, snap.generation, snap.epoch_counts) == (10, 2, {0: 10})

    # The generation read just before a truncate removes the snapshot's files (rows.2).
    with embstore.Writer(store) as w:
        w.truncate(rows=5)
    assert not os.path.exists(os.path.join(store, "rows.2"))
    reads = iter([2])
    read_generation = serve_store.store_generation
    monkeypatch.setattr(serve_store, "store_generation",
                        lambda path: next(reads, None) or read_generation(path))
    assert follower.check() is snap and follower.error is None


def test_after_a_truncate_the_rate_starts_again_and_stats_show_the_new_generation(store):
    """rows_per_second compared the rows after a truncate with the rows before it: negative.
    /api/stats and projections carry the generation, which tells the page that a truncate
    replaced the rows it drew (an epoch can end up with as many rows as before)."""
    from embstore.serve.app import Server
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(600), np.ones((600, 4), np.float32), 0)
    server = Server(serve_store.Follower(store))
    try:
        follower = server.follower
        first = server.stats()
        with embstore.Writer(store) as w:
            w.truncate(rows=300)
        follower._advance()
        stats = server.stats()
        assert (stats["rows"], stats["rows_per_second"]) == (300, 0.0)
        with embstore.Writer(store) as w:
            w.append(np.arange(100), np.ones((100, 4), np.float32), 1)
        follower._advance()
        assert server.stats()["rows_per_second"] > 0
        assert (first["generation"], stats["generation"]) == (1, 2)
        assert server.projection({})["generation"] == 2
    finally:
        server.close()


def test_a_projection_after_a_truncate_is_fitted_on_the_new_rows(store):
    """After a truncate an epoch can hold as many rows as before, at other row numbers and with
    other vectors: its projection is computed again (the generation is in the cache key), not
    the cached one (rows of another epoch now, with the old coordinates)."""
    from embstore.serve.app import Server
    rng = np.random.default_rng(5)
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(100), rng.standard_normal((100, 4)).astype(np.float32), 0)
        w.append(np.arange(100), rng.standard_normal((100, 4)).astype(np.float32), 1)
    server = Server(serve_store.Follower(store))
    try:
        assert server.projection({"epoch": "1"})["rows"] == list(range(100, 200))
        vectors = rng.standard_normal((100, 4)).astype(np.float32) * 100
        with embstore.Writer(store) as w:
            w.truncate(rows=0)
            w.append(np.arange(1000, 1100), vectors, 1)
            w.append(np.arange(150), rng.standard_normal((150, 4)).astype(np.float32), 2)
        server.follower._advance()
        p = server.projection({"epoch": "1"})
        assert p["rows"] == list(range(100)) and p["keys"] == texts(range(1000, 1100))
        np.testing.assert_allclose(np.abs(np.stack([p["x"], p["y"]], 1)),
                                   np.abs(numpy_pca(vectors)), rtol=1e-3, atol=1e-3)
        assert server.neighbours({"key": "1000", "epoch": "1", "k": "1"})["row"] == 0
    finally:
        server.close()


def test_lookups_answer_for_the_published_snapshot_while_the_reader_is_past_a_truncate(store):
    """The follower refreshes its lookup Reader before it publishes the next snapshot: a request
    served in between queried the Reader's key index (the new generation's rows) and kept the
    rows below the snapshot's count, rows of other keys in the snapshot."""
    with embstore.Writer(store, dim=4) as w:
        for epoch in range(3):  # keys 0..99 at epochs 0, 1, 2: rows 0..299
            w.append(np.arange(100), np.full((100, 4), epoch, np.float32), epoch=epoch)
    follower = serve_store.Follower(store)
    snap = follower.check()
    with embstore.Writer(store) as w:
        w.truncate(100)
        w.append(np.arange(1000, 1100), np.full((100, 4), 7, np.float32), epoch=1)
        w.append(np.arange(1000, 1100), np.full((100, 4), 8, np.float32), epoch=2)
    follower.reader.refresh()  # what _advance() does first
    assert follower.check() is snap
    lookup = follower.lookup
    assert lookup.find(snap, 5, 1) == 105
    assert lookup.history(snap, 5).tolist() == [5, 105, 205]
    assert lookup.history(snap, 1005).tolist() == []
    assert lookup.epoch_rows(snap, 2).tolist() == list(range(200, 300))
    follower._advance()
    new = follower.check()
    assert lookup.find(new, 1005, 1) == 105 and lookup.history(new, 5).tolist() == [5]


def test_a_manifest_whose_shard_was_truncated_and_refilled_is_counted_afresh(tmp_path):
    """A shard set's snapshots carried the generation 0: a shard truncated and grown past the
    old row count kept its old epoch counts, and the cached projection of an epoch that no
    longer existed was served."""
    from embstore.serve.app import Server
    rng = np.random.default_rng(3)
    ids = []
    for name, epoch, base in (("a", 0, 0), ("b", 1, 1000)):
        with embstore.Writer(tmp_path / name, dim=4) as w:
            w.append(np.arange(base, base + 100), rng.random((100, 4), np.float32), epoch=epoch)
        ids.append(embstore.Reader(tmp_path / name).info(key_stats=False)["store_id"])
    embstore.shards.write_manifest(tmp_path / "manifest.json", {
        "dim": 4, "dtype": "float32", "shards": [
            {"path": "a", "store_id": ids[0], "rows": 100},
            {"path": "b", "store_id": ids[1], "rows": 100}]})
    server = Server(serve_store.Follower(str(tmp_path / "manifest.json")))
    try:
        assert server.projection({"epoch": "0"})["epoch_rows"] == 100
        with embstore.Writer(tmp_path / "a") as w:
            w.truncate(0)
            w.append(np.arange(5000, 5150), rng.random((150, 4), np.float32), epoch=5)
        server.follower._advance()
        assert server.follower.check().epoch_counts == {1: 100, 5: 150}
        with pytest.raises(Exception, match="epoch 0"):
            server.projection({"epoch": "0"})
        p = server.projection({"epoch": "5"})
        assert p["epoch_rows"] == 150 and p["keys"][:2] == ["5000", "5001"]
    finally:
        server.close()


def test_a_directory_holding_a_manifest_is_served_as_its_shards(tmp_path):
    """The recorder's per-node layout: shard directories and manifest.json side by side.
    ShardSet took the directory for its manifest; serve took only a file for one, and refused
    the directory as "not an embstore store"."""
    rng = np.random.default_rng(4)
    ids = []
    for name, base in (("node0", 0), ("node1", 1000)):
        with embstore.Writer(tmp_path / name, dim=4) as w:
            w.append(np.arange(base, base + 50), rng.random((50, 4), np.float32))
        ids.append(embstore.Reader(tmp_path / name).info(key_stats=False)["store_id"])
    embstore.shards.write_manifest(tmp_path / "manifest.json", {
        "dim": 4, "dtype": "float32", "shards": [
            {"path": "node0", "store_id": ids[0], "rows": 50},
            {"path": "node1", "store_id": ids[1], "rows": 50}]})
    assert serve_store.is_manifest(str(tmp_path))
    assert not serve_store.is_manifest(str(tmp_path / "node0"))
    source = serve_store.open_source(str(tmp_path))
    assert isinstance(source, embstore.ShardSet) and len(source) == 100
    assert source.find(1049) == 99
    # A file not named *.json is no manifest (ShardSet's rule too): a store path, refused so.
    (tmp_path / "notes.txt").write_text("{}")
    assert not serve_store.is_manifest(str(tmp_path / "notes.txt"))
    with pytest.raises(serve_store.StoreError, match="notes.txt"):
        serve_store.open_source(str(tmp_path / "notes.txt"))


def write_shards_manifest(manifest, dim, paths):
    """A manifest listing the stores at ``paths`` (beside it), in that order, as its shards."""
    embstore.shards.write_manifest(manifest, {"dim": dim, "dtype": "float32", "metadata": "",
                                              "shards": [
        {"path": os.path.basename(path), "store_id": embstore.info(path)["store_id"], "rows": 0,
         "epochs": []} for path in paths]})


def test_a_shard_replaced_at_its_path_gets_a_steady_503_naming_it(tmp_path, server_on):
    """A shard deleted and created again at its path (its node started the run over): every
    request gets the 503 a single store gets, naming the shard and both store ids. Shards were
    not checked, and the follower cleared the Reader's error at each pass: the deleted shard's
    rows were served between its refreshes (one request in 25)."""
    paths = [str(tmp_path / name) for name in ("node0", "node1")]
    for i, path in enumerate(paths):
        with embstore.Writer(path, dim=4) as w:
            w.append(np.arange(100) + 100 * i, np.ones((100, 4), np.float32), 0)
    old_id = embstore.info(paths[1])["store_id"]
    write_shards_manifest(tmp_path / "manifest.json", 4, paths)
    server = server_on(str(tmp_path))
    assert server.ok("/api/history?key=150")["rows"] == [150]
    shutil.rmtree(paths[1])
    with embstore.Writer(paths[1], dim=4) as w:
        w.append(np.arange(100, 150), np.full((50, 4), 9, np.float32), 0)
    new_id = embstore.info(paths[1])["store_id"]
    expected = f"the store at {paths[1]} was replaced by another store (store id {new_id}; " \
               f"this server opened store id {old_id})"
    answered = 0
    deadline = time.monotonic() + 3  # a dozen passes of the follower (kFollowSliceSeconds)
    while time.monotonic() < deadline:
        for path in ("/api/history?key=150", "/api/stats", "/api/neighbours?key=120"):
            status, body = server.get(path)
            assert status == 503 and expected in body["error"], (path, status, body, answered)
            answered += 1
    assert server.alive()


def test_a_damaged_shard_gets_a_503_not_a_crash_also_one_added_since(tmp_path, server_on):
    """A shard's rows file cut short by another program: the 503 a single store gets, naming the
    file; the server was killed by SIGBUS when a request touched the shard's rows. The same for
    a shard that the manifest listed after the server started, and served again once repaired."""
    def shard(name, base):
        path = str(tmp_path / name)
        embstore.create(path, dim=8, segment_mb=1)
        with embstore.Writer(path) as w:
            w.append(np.arange(base, base + 1000),
                     np.random.default_rng(base).random((1000, 8), np.float32), 0)
        return path
    paths = [shard("node0", 0), shard("node1", 1000)]
    write_shards_manifest(tmp_path / "manifest.json", 8, paths)
    server = server_on(str(tmp_path))
    assert server.ok("/api/stats")["rows"] == 2000
    paths.append(shard("node2", 2000))
    write_shards_manifest(tmp_path / "manifest.json", 8, paths)  # a third node's first epoch
    server.until("/api/stats", lambda s: s["rows"] == 3000)
    for path, key in ((paths[2], 2020), (paths[0], 20)):
        rows_file = os.path.join(path, f"rows.{embstore.info(path)['generation']}")
        with open(rows_file, "rb") as f:
            saved = f.read()
        os.truncate(rows_file, 1000)  # its 1000 rows of 32 bytes need 32000
        for request in (f"/api/neighbours?key={key}", "/api/projection", f"/api/history?key={key}",
                        "/api/stats", "/api/epochs"):
            status, body = server.get(request)
            assert status == 503 and f"{rows_file} was truncated under the server" in \
                body["error"], (request, status, body)
        assert server.alive()
        with open(rows_file, "r+b") as f:
            f.write(saved)
        assert server.until("/api/projection", lambda p: True)["sampled"] == 3000


def test_a_shard_listed_before_it_is_there_leaves_the_others_served(tmp_path, server_on):
    """From a review: a manifest listing a node's shard before it was copied beside it made
    every refresh fail, and the whole server answered 503, though the shards held were fine."""
    def shard(name, base):
        path = str(tmp_path / name)
        embstore.create(path, dim=8, segment_mb=1)
        with embstore.Writer(path) as w:
            w.append(np.arange(base, base + 100),
                     np.random.default_rng(base).random((100, 8), np.float32), 0)
        return path
    paths = [shard("node0", 0)]
    write_shards_manifest(tmp_path / "manifest.json", 8, paths)
    server = server_on(str(tmp_path))
    later = shard("node1", 100)
    os.rename(later, str(tmp_path / "elsewhere"))
    write_shards_manifest(tmp_path / "manifest.json", 8, [paths[0], str(tmp_path / "elsewhere")])
    text = (tmp_path / "manifest.json").read_text().replace('"elsewhere"', '"node1"')
    (tmp_path / "manifest.json").write_text(text)  # lists node1, not there yet
    with embstore.Writer(paths[0]) as w:  # and node0 goes on growing
        w.append(np.arange(1000, 1010), np.ones((10, 8), np.float32), 0)
    stats = server.until("/api/stats", lambda s: s["rows"] == 110)
    assert server.get("/api/history?key=1005")[0] == 200, stats
    # A manifest's sizes are its shards' together (they were null).
    info = embstore.info(paths[0])
    assert stats["file_bytes"] == info["data_file_bytes"] + info["index_file_bytes"], stats
    assert stats["bytes_on_disk"] >= stats["file_bytes"] // 2 > 0, stats
    os.rename(str(tmp_path / "elsewhere"), later)
    server.until("/api/stats", lambda s: s["rows"] == 210)
    assert server.get("/api/history?key=150")[0] == 200


def shard_set_oracle(path):
    """What a full recomputation gives for the ShardSet at ``path`` now: (keys, epochs, vectors,
    rows per epoch) of its global rows, read from a new ShardSet."""
    s = embstore.ShardSet(path)
    try:
        keys, epochs = s.keys.copy(), s.epochs.copy()
        vectors = s.gather(np.arange(len(s)))
    finally:
        s.close()
    values, n = np.unique(epochs, return_counts=True)
    return keys, epochs, vectors, dict(zip(values.tolist(), n.tolist()))


def assert_like_a_fresh_server(server, path):
    """``server``'s follower, refreshed incrementally, answers as a new server on ``path`` (which
    reads every row) and as the ShardSet's rows: snapshot, lookups and every endpoint."""
    from embstore.serve.app import Server
    follower = server.follower
    follower._advance()
    keys, epochs, vectors, counts = shard_set_oracle(path)
    fresh = Server(serve_store.Follower(path))
    try:
        snap, full = follower.check(), fresh.follower.check()
        assert snap.rows == full.rows == len(keys)
        assert snap.epoch_counts == full.epoch_counts == counts
        assert (snap.generation, snap.parts) == (full.generation, full.parts)
        everything = np.arange(snap.rows)
        assert np.array_equal(snap.keys[everything], keys)
        assert np.array_equal(snap.epochs[everything], epochs)
        assert np.array_equal(snap.vectors[everything], vectors)
        for epoch in counts:
            assert np.array_equal(follower.lookup.epoch_rows(snap, epoch),
                                  np.flatnonzero(epochs == epoch))
            query = {"epoch": str(epoch)}
            assert server.projection(query) == fresh.projection(query)
        assert server.stats()["epochs"] == fresh.stats()["epochs"]
        for key in np.unique(keys)[::7].tolist():
            assert np.array_equal(follower.lookup.history(snap, key), np.flatnonzero(keys == key))
            assert server.history({"key": str(key)}) == fresh.history({"key": str(key)})
            query = {"key": str(key), "k": "5"}
            if int(epochs[np.flatnonzero(keys == key)[-1]]) == max(counts):
                assert server.neighbours(query) == fresh.neighbours(query)
    finally:
        fresh.close()


def test_a_manifest_refresh_reads_only_the_rows_new_since_the_last(tmp_path, monkeypatch):
    """Each refresh of a shard set copied every key and epoch of every shard (ShardSet.keys /
    .epochs), CPU growing with the store, and counted rows per epoch from the tail of the
    global rows: a shard that grew before the last one got the last shard's epochs counted.
    A refresh now reads the epochs of the rows each shard gained, and nothing else."""
    from embstore.serve.app import Server
    paths = [str(tmp_path / name) for name in ("node0", "node1")]
    rng = np.random.default_rng(11)
    for i, (path, rows) in enumerate(zip(paths, (5000, 300))):
        with embstore.Writer(path, dim=4) as w:
            w.append(np.arange(rows) + 10000 * i, rng.random((rows, 4), np.float32), epoch=i)
    write_shards_manifest(tmp_path / "manifest.json", 4, paths)

    def copied(self):
        raise AssertionError("a refresh copied the keys or epochs of every shard")
    monkeypatch.setattr(embstore.ShardSet, "keys", property(copied))
    monkeypatch.setattr(embstore.ShardSet, "epochs", property(copied))
    server = Server(serve_store.Follower(str(tmp_path)))
    try:
        follower = server.follower
        assert follower._tally.rows_read == 5300
        assert server.projection({"epoch": "1"})["rows"] == list(range(5000, 5300))
        with embstore.Writer(paths[0]) as w:  # the first shard grows: rows after it renumbered
            w.append(np.arange(7), rng.random((7, 4), np.float32), epoch=7)
        follower._advance()
        assert follower._tally.rows_read == 5307
        # Epoch 1's projection, cached, is of the same rows, numbered as the snapshot numbers them.
        assert server.projection({"epoch": "1"})["rows"] == list(range(5007, 5307))
        assert follower.check().epoch_counts == {0: 5000, 1: 300, 7: 7}
        with embstore.Writer(paths[1]) as w:
            w.append(np.arange(3), rng.random((3, 4), np.float32), epoch=1)
        follower._advance()
        follower._advance()  # nothing new: nothing read
        assert follower._tally.rows_read == 5310
        assert follower.check().epoch_counts == {0: 5000, 1: 303, 7: 7}
        assert server.history({"key": "2"})["rows"] == [2, 5002, 5309]
        assert server.history({"key": "10002"})["rows"] == [5009]
        assert server.projection({"epoch": "7"})["rows"] == list(range(5000, 5007))
    finally:
        server.close()
    monkeypatch.undo()
    assert_like_a_fresh_server(server, str(tmp_path))


def test_an_incrementally_followed_manifest_answers_as_a_full_recomputation(tmp_path):
    """Appends to every shard between refreshes (several per refresh, none), a shard added to
    the manifest, a shard truncated to fewer rows and one truncated and refilled to as many rows
    as before: after each refresh the server answers as a new one that reads every row, and a
    truncated shard is read again from its row 0, the others only for their new rows."""
    from embstore.serve.app import Server
    paths = [str(tmp_path / name) for name in ("node0", "node1", "node2")]
    rng = np.random.default_rng(12)
    for path in paths:
        embstore.create(path, dim=4)
    manifest = str(tmp_path / "manifest.json")
    write_shards_manifest(manifest, 4, paths[:2])

    def append(shard, rows, epoch):
        with embstore.Writer(paths[shard]) as w:
            w.append(rng.integers(0, 60, rows), rng.standard_normal((rows, 4)).astype(np.float32),
                     epoch=epoch)

    def truncate(shard, rows):
        with embstore.Writer(paths[shard]) as w:
            w.truncate(rows)

    append(0, 40, 0)
    server = Server(serve_store.Follower(manifest))
    try:
        tally = server.follower._tally
        assert_like_a_fresh_server(server, manifest)
        steps = [  # (changes, epochs the refresh reads)
            ([(append, 0, 30, 1), (append, 1, 50, 0)], 80),
            ([(append, 0, 5, 2), (append, 1, 5, 2), (append, 0, 6, 2)], 16),
            ([], 0),
            ([(append, 2, 25, 1), lambda: write_shards_manifest(manifest, 4, paths)], 25),
            ([(append, 1, 10, 3), (append, 2, 10, 3)], 20),
            ([(truncate, 0, 50), (append, 2, 4, 3)], 50 + 4),  # 81 rows -> 50: read again
            ([(truncate, 1, 30), (append, 1, 35, 4)], 65),  # 65 rows -> 30 + 35 others
            ([(append, 0, 9, 4), (append, 1, 9, 4), (append, 2, 9, 4)], 27),
        ]
        for changes, reads in steps:
            for change in changes:
                change() if callable(change) else change[0](*change[1:])
            before = tally.rows_read
            assert_like_a_fresh_server(server, manifest)
            assert tally.rows_read - before == reads, (changes, tally.rows_read - before)
    finally:
        server.close()


def manifest_lookup_oracle(snap):
    """history / find / epoch_rows of ``snap`` recomputed from its rows with numpy."""
    everything = np.arange(snap.rows)
    keys, epochs = snap.keys[everything], snap.epochs[everything]

    def find(key, epoch):
        rows = np.flatnonzero((keys == key) & (epochs == epoch))
        return int(rows[-1]) if len(rows) else None
    return (lambda key: np.flatnonzero(keys == key).tolist(), find,
            lambda epoch: np.flatnonzero(epochs == epoch).tolist())


def assert_lookups_like_scans(follower, snap, keys=range(23), epochs=range(6)):
    """The follower's lookups (each shard's key index) give for ``snap`` what scans of its rows
    (``use_index=False``) and a numpy recomputation give."""
    lookup, scans = follower.lookup, serve_store.KeyLookup(follower.reader, use_index=False)
    history, find, epoch_rows = manifest_lookup_oracle(snap)
    for key in keys:
        assert lookup.history(snap, key).tolist() == scans.history(snap, key).tolist() \
            == history(key), key
        for epoch in epochs:
            assert lookup.find(snap, key, epoch) == scans.find(snap, key, epoch) \
                == find(key, epoch), (key, epoch)
    for epoch in epochs:
        assert lookup.epoch_rows(snap, epoch).tolist() == scans.epoch_rows(snap, epoch).tolist() \
            == epoch_rows(epoch), epoch


def test_manifest_lookups_through_each_shards_key_index_answer_as_scans(tmp_path):
    """A manifest's lookups scanned every row of the snapshot per request. Through each shard's
    key index they give the scans' rows, in the snapshot's numbering, for the published snapshot
    and for the one before while the lookup set has moved on: appends to shards before the last
    (renumbering the rows after them), a shard truncated and refilled, a shard added, a shard
    emptied, and keys repeated across shards and epochs, (key, epoch) pairs too."""
    paths = [str(tmp_path / name) for name in ("node0", "node1", "node2")]
    rng = np.random.default_rng(21)
    for path in paths:
        embstore.create(path, dim=4)
    manifest = str(tmp_path / "manifest.json")
    write_shards_manifest(manifest, 4, paths[:2])

    def append(shard, rows, epoch):
        with embstore.Writer(paths[shard]) as w:
            w.append(rng.integers(0, 20, rows), rng.random((rows, 4), np.float32), epoch=epoch)

    def truncate(shard, rows):
        with embstore.Writer(paths[shard]) as w:
            w.truncate(rows)

    for shard, epoch in ((0, 0), (1, 0), (0, 1), (1, 1)):
        append(shard, 30, epoch)
    follower = serve_store.Follower(manifest)
    assert follower.lookup.use_index
    steps = [
        [(append, 0, 12, 1), (append, 0, 9, 2)],  # shard 0 of 2 grows: shard 1 renumbered
        [(truncate, 1, 10), (append, 1, 25, 1)],  # refilled past its old row count
        [(append, 2, 30, 1), lambda: write_shards_manifest(manifest, 4, paths)],
        [(append, 1, 8, 3), (truncate, 0, 0), (append, 2, 6, 3)],  # shard 0 emptied
        [(append, 0, 15, 3), (append, 1, 5, 4), (append, 2, 5, 1)],
    ]
    assert_lookups_like_scans(follower, follower.check())
    for changes in steps:
        before = follower.check()
        for change in changes:
            change() if callable(change) else change[0](*change[1:])
        follower.reader.refresh()  # what _advance() does first: past the published snapshot
        assert follower.check() is before
        assert_lookups_like_scans(follower, before)
        follower._advance()
        assert follower.check() is not before
        assert_lookups_like_scans(follower, follower.check())
    assert len(follower.check().parts) == 3


class ScanCounted(np.ndarray):
    """A shard's keys or epochs in a snapshot, noting each scan (``==``) in ``scans``."""

    def __eq__(self, other):
        self.scans.append(self.shard)
        return np.asarray(self) == other


def test_manifest_lookups_scan_only_a_shard_truncated_since_the_snapshot(tmp_path):
    """Work count: a manifest's lookups compared every shard's keys or epochs in the snapshot.
    Now no shard is scanned while its Reader holds the snapshot's generation of it, also when
    it grew past the snapshot with rows repeating its (key, epoch) pairs; one truncated since is
    scanned (its key index names other rows), alone, as is the one lookup that needs it."""
    paths = [str(tmp_path / name) for name in ("node0", "node1", "node2", "node3")]
    for i, path in enumerate(paths[:3]):
        with embstore.Writer(path, dim=4) as w:  # keys 0..9 in every shard, at epochs 0 and 1
            for epoch in (0, 1):
                w.append(np.arange(10), np.full((10, 4), i, np.float32), epoch=epoch)
    embstore.create(paths[3], dim=4)
    manifest = str(tmp_path / "manifest.json")
    write_shards_manifest(manifest, 4, paths[:3])
    follower = serve_store.Follower(manifest)
    snap = follower.check()
    scans = []
    for column in (snap.keys, snap.epochs):
        for shard, view in enumerate(column._views):
            column._views[shard] = view.view(ScanCounted)
            column._views[shard].scans, column._views[shard].shard = scans, shard
    history, find, epoch_rows = manifest_lookup_oracle(snap)
    lookup = follower.lookup

    def lookups():
        for key in (3, 10):
            assert lookup.history(snap, key).tolist() == history(key), key
            for epoch in (0, 1, 2):
                assert lookup.find(snap, key, epoch) == find(key, epoch), (key, epoch)
        for epoch in (0, 1, 2):
            assert lookup.epoch_rows(snap, epoch).tolist() == epoch_rows(epoch), epoch
    lookups()
    assert scans == []
    for path in (paths[0], paths[2]):  # past the snapshot: (3, 1) again, and a new epoch
        with embstore.Writer(path) as w:
            w.append([3, 3], np.ones((2, 4), np.float32), epoch=1)
            w.append([3], np.ones((1, 4), np.float32), epoch=2)
    with embstore.Writer(paths[1]) as w:
        w.truncate(5)
        w.append(np.arange(10, 20), np.ones((10, 4), np.float32), epoch=1)
    with embstore.Writer(paths[3]) as w:
        w.append([3], np.ones((1, 4), np.float32), epoch=1)
    write_shards_manifest(manifest, 4, paths)
    follower.reader.refresh()  # the lookup set moves past the snapshot, as _advance() does
    assert len(follower.reader.shards) == 4 and follower.check() is snap
    lookups()
    assert scans and set(scans) == {1}, scans
    del scans[:]
    # Shard 2 answers from its index (its find names a row past the snapshot: its history
    # decides): shard 1 is not scanned.
    assert lookup.find(snap, 3, 1) == 53 and lookup.find(snap, 3, 0) == 43
    assert scans == []
    assert lookup.find(snap, 10, 1) is None and scans == [1]  # not in 2 or 0: 1 is scanned
    assert lookup.epoch_rows(snap, 2).tolist() == [] and scans == [1, 1]


def test_the_follower_reads_the_generation_through_the_core(store, tmp_path):
    """store_generation() asks the library (no offsets or flag bits restated in Python): the
    generation a truncate switched to, and None where no header can be read."""
    embstore.create(store, dim=4)
    assert serve_store.store_generation(store) == 1
    with embstore.Writer(store) as w:
        w.append(np.arange(5), np.eye(5, 4, dtype=np.float32), 3)
        assert w.truncate(2) == 2
    assert serve_store.store_generation(store) == embstore.info(store)["generation"] == 2
    assert serve_store.store_generation(str(tmp_path / "none")) is None
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "header").write_bytes(b"\0" * 4100)  # too short for the state page
    assert serve_store.store_generation(str(cut)) is None


def test_parameters_are_validated(store, server_on):
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(5), np.eye(5, 4, dtype=np.float32), 3)
    server = server_on(store)
    cases = [
        ("/api/history?key=abc", 400, "key must be a non-negative integer"),
        ("/api/history?key=-1", 400, "key must be a non-negative integer"),
        ("/api/history?key=1.5", 400, "key must be a non-negative integer"),
        ("/api/history?key=18446744073709551616", 400, "key must be in"),
        ("/api/history", 400, "missing parameter key"),
        ("/api/history?key=99", 404, "key 99 is not in the store"),
        ("/api/neighbours?key=1&epoch=4", 404, "epoch 4 is not in the store (epochs present: 3)"),
        ("/api/neighbours?key=1&epoch=x", 400, "epoch must be a non-negative integer"),
        ("/api/neighbours?key=1&k=0", 400, "k must be in 1 .. 100"),
        ("/api/neighbours?key=1&k=101", 400, "k must be in 1 .. 100"),
        ("/api/neighbours?key=9&epoch=3", 404, "key 9 has no row at epoch 3"),
        ("/api/projection?limit=0", 400, "limit must be in 1 .. 20000"),
        ("/api/projection?limit=20001", 400, "limit must be in 1 .. 20000"),
        ("/api/projection?epoch=0", 404, "epoch 0 is not in the store"),
        ("/api/projection?epoch=3&color=red", 400, "unknown parameter 'color'"),
        ("/api/stats?verbose=1", 400, "unknown parameter 'verbose'"),
        ("/api/delete", 404, "no such endpoint"),
        ("/api/history?key=" + "1" * 5000, 400, "key must be in 0 .. 18446744073709551615; "
                                                "got a number of 5000 digits"),
        ("/api/projection?limit=" + "9" * 30, 400, "limit must be in 1 .. 20000; got a "
                                                   "number of 30 digits"),
        ("/api/projection?epoch=3&epoch=4", 400, "parameter 'epoch' is given 2 times"),
        ("/api/neighbours?key=1&k=2&key=1", 400, "parameter 'key' is given 2 times"),
        ("/api/stats?x=1&x=2", 400, "unknown parameter 'x'"),
    ]
    for path, status, message in cases:
        got, body = server.get(path)
        assert (got, message in body.get("error", "")) == (status, True), (path, got, body)
    assert len(server.ok("/api/neighbours?key=1&k=100")["neighbours"]) == 4  # all other rows
    assert server.ok("/api/projection?limit=20000")["sampled"] == 5
    assert server.ok("/api/history?key=" + "0" * 40 + "1")["key"] == "1"  # leading zeros


def test_keys_and_epochs_above_2_53_are_exact_decimal_strings(store, server_on):
    """Keys and epochs are uint64; sent as JSON numbers, JavaScript's JSON.parse rounded those
    above 2**53 (epoch 2**63 + 5 came out as 9223372036854775808, another epoch): every key and
    epoch of every answer is a decimal string, row numbers and counts stay numbers."""
    epoch, top = 2**63 + 5, 2**64 - 1
    keys = np.array([top, top - 1, 2**53 + 1, 2**53, 5], np.uint64)
    rng = np.random.default_rng(13)
    with embstore.Writer(store, dim=DIM) as w:
        w.append(keys, rng.random((5, DIM), np.float32), epoch=2**53 + 1)
        w.append(keys, rng.random((5, DIM), np.float32), epoch=epoch)
    server = server_on(store)
    status, body = server.get_raw("/api/stats")
    assert status == 200 and b'"epoch": "9223372036854775813", "rows": 5' in body
    stats = json.loads(body)
    assert stats["epochs"] == [{"epoch": "9007199254740993", "rows": 5},
                               {"epoch": "9223372036854775813", "rows": 5}]
    assert server.ok("/api/epochs")["epochs"] == stats["epochs"]
    p = server.ok("/api/projection")  # the newest epoch
    assert (p["epoch"], p["rows"], p["epoch_rows"]) == (str(epoch), [5, 6, 7, 8, 9], 5)
    assert p["keys"] == texts(keys) == ["18446744073709551615", "18446744073709551614",
                                        "9007199254740993", "9007199254740992", "5"]
    assert server.ok(f"/api/projection?epoch={2**53 + 1}")["epoch"] == "9007199254740993"
    n = server.ok(f"/api/neighbours?key={top}&epoch={epoch}&k=4")
    assert (n["key"], n["epoch"], n["row"]) == (str(top), str(epoch), 5)
    assert sorted(x["key"] for x in n["neighbours"]) == sorted(texts(keys[1:]))
    h = server.ok(f"/api/history?key={top}")
    assert (h["key"], h["rows"], h["epochs"]) == (str(top), [0, 5], texts([2**53 + 1, epoch]))
    assert [(t["epoch"], t["row"]) for t in h["trajectory"]] == \
        [("9007199254740993", 0), ("9223372036854775813", 5)]
    status, body = server.get(f"/api/history?key={2**53 + 2}")  # rounded to 2**53, not there
    assert status == 404


def test_static_files_are_a_fixed_set(store, server_on):
    embstore.create(store, dim=4)
    server = server_on(store)
    status, page = server.get_raw("/")
    assert status == 200 and b"/static/app.js" in page and b"/static/chart.js" in page
    for name, marker in (("app.js", b"/api/stats"), ("style.css", b".figures"),
                         ("index.html", b"<canvas")):
        status, body = server.get_raw(f"/static/{name}")
        assert status == 200 and marker in body, name
    if os.path.exists("/usr/share/javascript/chart.js/chart.min.js"):
        assert server.get_raw("/static/chart.js")[1].startswith(b"/*!\n * Chart.js")
    secret = b"root:"
    for path in ("/static/../__init__.py", "/static/..%2f__init__.py", "/static/%2e%2e%2fapp.py",
                 "/static/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd", "/static/app.py",
                 "/static/static%2fapp.js", "/static//etc/passwd", "/../../etc/passwd",
                 "/static/%2fetc%2fpasswd", "/static/.", "/static/"):
        status, body = server.get_raw(path)
        assert status == 404, (path, status, body[:200])
        assert secret not in body and b"import" not in body, path
        assert "error" in json.loads(body), path
    status, body = server.get_raw("/api/stats", headers={"Host": "attacker.example:80"})
    assert status == 403 and b"refused" in body
    assert server.get_raw("/api/stats", headers={"Host": "localhost:1"})[0] == 200


def test_host_names_are_compared_without_case_or_a_trailing_dot(store, server_on):
    """A Host header is a DNS name: "LOCALHOST" and "localhost." (fully qualified) name the
    loopback as "localhost" does, and were refused (403); other names still are."""
    embstore.create(store, dim=4)
    server = server_on(store)
    port = server.url.rsplit(":", 1)[1]
    for host in ("LOCALHOST", "LocalHost.", "localhost.", "127.0.0.1", "[::1]"):
        assert server.get_raw("/api/stats", headers={"Host": f"{host}:{port}"})[0] == 200, host
    for host in ("localhost..", "localhost.attacker.example", "ATTACKER.example."):
        status, body = server.get_raw("/api/stats", headers={"Host": f"{host}:{port}"})
        assert status == 403 and b"refused" in body, host


def store_digest(path):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            digest.update(name.encode() + f.read())
        digest.update(str(os.stat(os.path.join(path, name)).st_mtime_ns).encode())
    return digest.hexdigest()


def test_server_never_changes_the_store(store, server_on):
    embstore.create(store, dim=8, segment_mb=1)
    with embstore.Writer(store) as w:
        for epoch in range(3):
            w.append(np.arange(50), np.random.default_rng(epoch).random((50, 8), np.float32), epoch)
    before = store_digest(store)
    server = server_on(store)
    for path in ("/", "/api/stats", "/api/epochs", "/api/projection?epoch=1",
                 "/api/neighbours?key=3&epoch=2&k=5", "/api/history?key=3"):
        assert server.get_raw(path)[0] == 200, path
    code, _ = server.stop()
    assert code == 0
    assert store_digest(store) == before


def test_damaged_or_removed_store_gives_errors_not_a_crash(store, server_on):
    embstore.create(store, dim=8, segment_mb=1)
    with embstore.Writer(store) as w:
        w.append(np.arange(100), np.ones((100, 8), np.float32), 0)
    server = server_on(store)
    assert server.ok("/api/projection")["sampled"] == 100
    generation = embstore.info(store)["generation"]
    os.truncate(os.path.join(store, f"rows.{generation}"), 1000)  # 100 rows need 3200 bytes
    for path in ("/api/projection", "/api/neighbours?key=1", "/api/history?key=1",
                 "/api/stats", "/api/epochs"):
        status, body = server.get(path)
        assert status == 503 and "truncated" in body["error"], (path, body)
        assert f"rows.{generation}" in body["error"]
    assert server.get_raw("/")[0] == 200  # the page still loads and shows the error
    os.rename(store, store + ".moved")
    deadline = time.monotonic() + 30
    while "is gone" not in server.get("/api/history?key=1")[1]["error"]:
        assert time.monotonic() < deadline  # the follower re-checks the store every 0.25 s
        time.sleep(0.05)
    status, body = server.get("/api/stats")
    assert status == 503 and f"the store directory {store} is gone" in body["error"], body
    assert server.alive()


def test_a_store_replaced_at_its_path_is_refused_not_served_from_the_deleted_files(
        store, server_on):
    """A store deleted and created again at the same path (a training run started over): the
    server's Readers still map the deleted store's files, so every request gets a 503 naming both
    store ids and saying to restart the server, never the deleted store's rows."""
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(5), np.eye(5, 4, dtype=np.float32), 0)
    old_id = embstore.info(store)["store_id"]
    server = server_on(store)
    assert server.ok("/api/projection")["sampled"] == 5
    shutil.rmtree(store)
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(10, 15), np.ones((5, 4), np.float32), 0)
    new_id = embstore.info(store)["store_id"]
    # The follower re-checks the store every 0.25 s: one that looked in the instant between the
    # deletion and the creation answers "gone" until its next look (this test failed so once).
    deadline = time.monotonic() + 30
    while "replaced by another store" not in server.get("/api/stats")[1]["error"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for path in ("/api/stats", "/api/epochs", "/api/projection", "/api/history?key=1",
                 "/api/neighbours?key=1", "/api/stats"):
        status, body = server.get(path)
        assert status == 503, (path, status, body)
        assert f"the store at {store} was replaced by another store (store id {new_id}; this " \
               f"server opened store id {old_id})" in body["error"], (path, body)
        assert "restart embstore serve" in body["error"]
    assert server.alive()


def test_command_line_errors(store, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "embstore.serve", *args],
                              capture_output=True, text=True, timeout=60)
    missing = run(str(tmp_path / "nothing"))
    assert missing.returncode == 12 and "no embstore store at" in missing.stderr
    manifest = tmp_path / "shards.json"
    manifest.write_text("{}")
    if not hasattr(embstore, "ShardSet"):
        result = run(str(manifest))
        assert result.returncode == 2 and "not supported yet" in result.stderr
    embstore.create(store, dim=4)
    bad = tmp_path / "labels.csv"
    bad.write_text("key,label\n1,cat\nx,dog\n")
    result = run(store, "--labels", str(bad))
    assert result.returncode == 2 and "labels.csv line 3: key 'x' is not an integer" in result.stderr
    result = run(store, "--port", "70000")
    assert result.returncode == 2 and "--port must be in 0 .. 65535" in result.stderr


def test_another_host_warns_that_there_is_no_authentication(store):
    embstore.create(store, dim=4)
    # 127.0.0.2 is still the loopback interface, so the test exposes nothing.
    server = ServerProcess(store, "--host", "127.0.0.2")
    try:
        assert server.url.startswith("http://127.0.0.2:")
        assert server.ok("/api/stats")["rows"] == 0
    finally:
        code, err = server.stop()
    assert code == 0 and "no authentication" in err


def test_labels_file_formats(tmp_path):
    csv_file = tmp_path / "l.csv"
    csv_file.write_text('key,label\n3,"a, b"\n1,7\n\n18446744073709551615,max\n')
    labels = analysis.Labels.load(str(csv_file))
    codes = labels.lookup(np.array([1, 2, 3, 2**64 - 1], np.uint64))
    assert [labels.names[c] if c >= 0 else None for c in codes] == ["7", None, "a, b", "max"]
    json_file = tmp_path / "l.json"
    json_file.write_text('{"5": 2, "6": "two"}')
    labels = analysis.Labels.load(str(json_file))
    assert [labels.names[c] for c in labels.lookup(np.array([5, 6], np.uint64))] == ["2", "two"]
    json_file.write_text('{"5": [1]}')
    with pytest.raises(analysis.LabelsError, match="labels must be strings or numbers"):
        analysis.Labels.load(str(json_file))


def test_labels_files_saved_with_a_utf8_bom_are_read(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors start a file with a byte order mark: such files
    were refused (the BOM read as part of the first key)."""
    for name, text in (("l.csv", "key,label\n0,cat\n1,dog\n"),
                       ("l.json", '{"0": "cat", "1": "dog"}')):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        labels = analysis.Labels.load(str(tmp_path / name))
        codes = labels.lookup(np.array([0, 1, 2], np.uint64))
        assert [labels.names[c] if c >= 0 else None for c in codes] == ["cat", "dog", None], name


def test_key_lookup_scans_match_the_store(store):
    embstore.create(store, dim=4)
    rng = np.random.default_rng(3)
    with embstore.Writer(store) as w:
        for epoch in range(4):
            keys = rng.permutation(30)[:20]
            w.append(keys, rng.random((20, 4), np.float32), epoch)
        w.append([5, 5], rng.random((2, 4), np.float32), 2)  # a duplicate (key, epoch)
    follower = serve_store.Follower(store, use_index=False)
    snap = follower.snapshot
    keys, epochs = follower.reader.keys.astype(np.int64), follower.reader.epochs.astype(np.int64)
    lookup = follower.lookup
    assert not lookup.use_index
    for key in range(31):
        assert lookup.history(snap, key).tolist() == np.flatnonzero(keys == key).tolist()
        for epoch in range(5):
            rows = np.flatnonzero((keys == key) & (epochs == epoch))
            assert lookup.find(snap, key, epoch) == (int(rows[-1]) if len(rows) else None)
    for epoch in range(5):
        assert lookup.epoch_rows(snap, epoch).tolist() == np.flatnonzero(epochs == epoch).tolist()
    assert snap.epoch_counts == {e: int((epochs == e).sum()) for e in range(4)}
    if serve_store.has_key_index(follower.reader):  # the store's key index gives the same rows
        native = serve_store.KeyLookup(follower.reader, use_index=True)
        for key in range(31):
            assert native.history(snap, key).tolist() == lookup.history(snap, key).tolist()
            for epoch in range(5):
                assert native.find(snap, key, epoch) == lookup.find(snap, key, epoch)
        for epoch in range(5):
            assert native.epoch_rows(snap, epoch).tolist() == lookup.epoch_rows(snap, epoch).tolist()


def test_key_lookup_with_the_index_answers_for_the_snapshot_not_later_rows(store):
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append([1, 2, 3], np.ones((3, 4), np.float32), 0)
        w.append([1, 2], np.ones((2, 4), np.float32), 1)
    follower = serve_store.Follower(store)
    assert follower.lookup.use_index  # this build has the key index: no scans
    snap = follower.snapshot
    assert snap.rows == 5
    # Rows committed after the snapshot, some repeating its (key, epoch) pairs; the lookup
    # Reader moves on (as the follower thread does before it publishes the next snapshot).
    with embstore.Writer(store) as w:
        w.append([1, 3, 7], np.ones((3, 4), np.float32), 1)
    assert follower.reader.refresh() == 8
    lookup = follower.lookup
    assert lookup.find(snap, 1, 1) == 3  # not row 5, past the snapshot
    assert lookup.find(snap, 2, 0) == 1
    assert lookup.find(snap, 3, 1) is None and lookup.find(snap, 7, 1) is None
    assert lookup.history(snap, 1).tolist() == [0, 3]
    assert lookup.epoch_rows(snap, 1).tolist() == [3, 4]
    # A later snapshot sees the new rows.
    follower._advance()
    later = follower.snapshot
    assert later.rows == 8
    assert lookup.find(later, 1, 1) == 5 and lookup.find(later, 7, 1) == 7
    assert lookup.history(later, 1).tolist() == [0, 3, 5]
    assert lookup.epoch_rows(later, 1).tolist() == [3, 4, 5, 6, 7]


def test_float64_stores_are_computed_in_float64(store):
    """Cast to float32, float64 values above 3.4e38 became infinite (left out of projections,
    neighbours a 422) and values closer than float32's precision equal (distance 0, neighbours
    in row order). Values whose squares overflow float64 (from 1.3e154) are computed too."""
    from embstore.serve.app import Server
    big = np.array([[1e39, 0], [2e39, 3e38], [3e39, 1e39], [0, 3e39]])
    close = np.array([[1.0, 0], [1 + 1e-9, 0], [1 + 3e-9, 0]])
    huge = np.array([[1e200, 0], [0, 2e200], [3e200, 1e200], [-1e200, 5e200]])
    embstore.create(store, dim=2, dtype="float64")
    with embstore.Writer(store) as w:
        w.append(np.arange(4), big, 0)
        w.append(np.arange(10, 13), close, 1)
        w.append(np.arange(20, 24), huge, 2)
    server = Server(serve_store.Follower(store))
    try:
        for epoch, values, first, first_row in ((0, big, 0, 0), (2, huge, 20, 7)):
            scale = np.abs(values).max()  # numpy's SVD would overflow on huge
            p = server.projection({"epoch": str(epoch)})
            assert (p["non_finite"], p["sampled"]) == (0, 4)
            np.testing.assert_allclose(np.abs(np.stack([p["x"], p["y"]], 1)),
                                       np.abs(numpy_pca(values / scale)) * scale, rtol=1e-5)
            n = server.neighbours({"key": str(first), "epoch": str(epoch), "k": "3"})
            expected = np.linalg.norm((values[1:] - values[0]) / scale, axis=1) * scale
            order = np.argsort(expected)
            assert n["non_finite"] == 0
            assert [x["key"] for x in n["neighbours"]] == texts(first + 1 + order)
            np.testing.assert_allclose([x["distance"] for x in n["neighbours"]],
                                       expected[order], rtol=1e-12)
            h = server.history({"key": str(first + 1)})
            assert h["non_finite"] == 0 and [t["row"] for t in h["trajectory"]] == [first_row + 1]
        n = server.neighbours({"key": "12", "epoch": "1", "k": "2"})
        assert [x["key"] for x in n["neighbours"]] == ["11", "10"]
        np.testing.assert_allclose([x["distance"] for x in n["neighbours"]], [2e-9, 3e-9],
                                   rtol=1e-6)
    finally:
        server.close()


def test_a_neighbour_scan_holds_bounded_bytes_whatever_the_dim(store):
    """A scan compared 65,536 rows per step whatever the dim: at dim 1024 several float64 copies
    of 64K rows (1.4 GB for a request). Its steps are bounded in bytes (kScanChunkBytes): the
    peak stays a few tens of MB however many rows an epoch holds; the answer is numpy's."""
    import tracemalloc
    dim, rows = 1024, 16384  # 64 MiB of float32 rows (numpy data is traced; the mapping is not)
    rng = np.random.default_rng(6)
    embstore.create(store, dim=dim)
    with embstore.Writer(store) as w:
        for start in range(0, rows, 4096):
            w.append(np.arange(start, start + 4096),
                     rng.standard_normal((4096, dim), dtype=np.float32), 0)
    vectors = embstore.Reader(store).vectors
    query = np.asarray(vectors[5])
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        found, dist, non_finite = analysis.nearest(vectors, "float32", np.arange(rows), query, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 96 << 20, f"{peak >> 20} MiB"  # was 384 MiB here (grew with the rows)
    expected = np.linalg.norm(np.asarray(vectors, np.float64) - query, axis=1)
    assert found.tolist() == np.argsort(expected, kind="stable")[:5].tolist() and non_finite == 0
    np.testing.assert_allclose(dist, np.sort(expected)[:5], rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_narrow_dtypes_are_read_as_their_values(store, dtype):
    from embstore.serve.app import Server
    values = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, -3, 0], [1, 1, 0, 0]], np.float32)
    embstore.create(store, dim=4, dtype=dtype)
    with embstore.Writer(store) as w:
        w.append(np.arange(4), values.astype(np.int8) if dtype == "int8" else values, 0)
    server = Server(serve_store.Follower(store))
    try:
        n = server.neighbours({"key": "3", "k": "3"})
        expected = np.linalg.norm(values[:3] - values[3], axis=1)
        order = np.lexsort((np.arange(3), expected))
        assert [x["key"] for x in n["neighbours"]] == texts(order)
        np.testing.assert_allclose([x["distance"] for x in n["neighbours"]], expected[order])
        p = server.projection({})
        np.testing.assert_allclose(np.abs(np.stack([p["x"], p["y"]], 1)),
                                   np.abs(numpy_pca(values)), atol=1e-4)
    finally:
        server.pool.shutdown()


def test_a_history_walk_is_fitted_once(store, monkeypatch):
    """A trajectory needs the PCA basis of every epoch it walks (kMaxTrajectoryEpochs): all of
    them stay cached, so another history, or a projection of one of those epochs, fits nothing
    again (the page searches keys one after the other; each walk cost seconds of CPU)."""
    from embstore.serve import app
    epochs = app.kMaxTrajectoryEpochs
    rng = np.random.default_rng(4)
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        for epoch in range(epochs + 5):
            w.append(np.arange(20), rng.standard_normal((20, 4)).astype(np.float32), epoch)
    fits = []
    fit = analysis.Basis.fit
    monkeypatch.setattr(analysis.Basis, "fit",
                        staticmethod(lambda sample: (fits.append(len(sample)), fit(sample))[1]))
    server = app.Server(serve_store.Follower(store))
    try:
        first = server.history({"key": "3"})
        assert len(first["trajectory"]) == epochs and len(fits) == epochs
        assert server.history({"key": "3"}) == first
        assert len(server.history({"key": "4"})["trajectory"]) == epochs
        p = server.projection({"epoch": str(epochs + 4)})
        assert len(fits) == epochs
        point = first["trajectory"][-1]
        assert (point["x"], point["y"]) == pytest.approx((p["x"][3], p["y"][3]), abs=1e-4)
    finally:
        server.close()


def test_stats_answer_while_histories_are_computed(store, monkeypatch):
    """The page polls /api/stats every second: it must not queue behind long computations
    (projections, neighbours, histories) that fill the compute threads."""
    import asyncio
    import threading
    from aiohttp.test_utils import TestClient, TestServer
    from embstore.serve import app
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        for epoch in range(3):
            w.append(np.arange(20), np.random.default_rng(epoch).random((20, 4), np.float32),
                     epoch)
    entered, release = threading.Semaphore(0), threading.Event()
    fit = analysis.Basis.fit

    def blocked_fit(sample):
        entered.release()
        assert release.wait(60)
        return fit(sample)
    monkeypatch.setattr(analysis.Basis, "fit", staticmethod(blocked_fit))
    server = app.Server(serve_store.Follower(store))

    async def run():
        async with TestClient(TestServer(app.make_app(server))) as client:
            loop = asyncio.get_running_loop()
            histories = [asyncio.ensure_future(client.get(f"/api/history?key={key}"))
                         for key in range(3)]  # more than the compute threads
            try:
                for _ in range(2):  # both compute threads are inside a fit
                    assert await loop.run_in_executor(None, entered.acquire, True, 60)
                for path in ("/api/stats", "/api/epochs"):
                    response = await asyncio.wait_for(client.get(path), 60)
                    assert response.status == 200 and (await response.json())["rows"] == 60
                assert not any(h.done() for h in histories)
            finally:
                release.set()
            for history in histories:
                response = await history
                assert response.status == 200
                assert len((await response.json())["trajectory"]) == 3
    asyncio.run(run())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rows_with_nan_or_inf_are_left_out_and_counted(store, dtype):
    """A row holding NaN or Inf has no place in a PCA or a distance: projections, neighbours and
    trajectories leave it out and say how many they left out; the answers stay valid JSON (no
    NaN) and are those of the finite rows."""
    from embstore.serve.app import ApiError, Server
    rng = np.random.default_rng(2)
    values = rng.standard_normal((2, 40, 4)).astype(np.float32)
    values[0, 3, 1], values[0, 7, 0], values[1, 3, 2] = np.nan, np.inf, -np.inf
    embstore.create(store, dim=4, dtype=dtype)
    with embstore.Writer(store) as w:
        for epoch in (0, 1):
            w.append(np.arange(40), values[epoch], epoch)
    stored = analysis.as_float(embstore.Reader(store).vectors, dtype).reshape(2, 40, 4)
    server = Server(serve_store.Follower(store))
    try:
        p = server.projection({"epoch": "0"})
        finite = [r for r in range(40) if r not in (3, 7)]
        assert (p["non_finite"], p["sampled"], p["rows"]) == (2, 38, finite)
        np.testing.assert_allclose(np.abs(np.stack([p["x"], p["y"]], 1)),
                                   np.abs(numpy_pca(stored[0, finite])), rtol=1e-3, atol=1e-3)
        n = server.neighbours({"key": "0", "epoch": "0", "k": "100"})
        assert n["non_finite"] == 2 and [x["row"] for x in n["neighbours"]] == \
            sorted(finite[1:], key=lambda r: np.linalg.norm(stored[0, r] - stored[0, 0]))
        with pytest.raises(ApiError) as error:
            server.neighbours({"key": "3", "epoch": "0"})
        assert error.value.status == 422
        assert "key 3's row 3 at epoch 0 holds NaN or infinite values" in error.value.message
        h = server.history({"key": "3"})
        assert h["rows"] == [3, 43] and h["trajectory"] == [] and h["non_finite"] == 2
        h = server.history({"key": "7"})
        assert [t["epoch"] for t in h["trajectory"]] == ["1"] and h["non_finite"] == 1
        for answer in (p, n, h):
            json.dumps(answer, allow_nan=False)
    finally:
        server.close()


@pytest.mark.parametrize("dim", [16, 300])
def test_pca_basis_matches_numpy_svd(dim):
    rng = np.random.default_rng(dim)
    # Clear top-2 directions (the randomized path, above 128 dims, then converges fully).
    scales = np.concatenate([[10.0, 6.0], np.linspace(2.0, 0.5, dim - 2)])
    x = rng.standard_normal((1500, dim)) * scales @ np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    basis = analysis.Basis.fit(x)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(basis.components @ vt[:2].T), np.eye(2), atol=1e-6)
    np.testing.assert_allclose(basis.explained, s[:2] ** 2 / (s**2).sum(), rtol=1e-6)
    np.testing.assert_allclose(np.abs(basis.project(x)), np.abs(centred @ vt[:2].T), atol=1e-3)


def test_exit_statuses_are_those_of_the_command_line_tool(store, tmp_path):
    # README "Command-line tool": 2 usage, 10 + the C++ ErrorCode otherwise, 1 only for damage
    # found. A missing store exited 2 (not found is 12) and a port in use 1 (an I/O error: 17).
    import socket

    def run(*args):
        return subprocess.run([sys.executable, "-m", "embstore.serve", *map(str, args)],
                              capture_output=True, text=True, timeout=60)
    embstore.create(store, dim=4)
    not_a_store = tmp_path / "empty"
    not_a_store.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("1,cat\nx,dog\n")
    cases = [
        ([tmp_path / "nothing"], 12, f"no embstore store at {tmp_path / 'nothing'}"),
        ([not_a_store], 12, str(not_a_store)),
        ([store, "--labels", tmp_path / "missing.csv"], 12, str(tmp_path / "missing.csv")),
        ([store, "--labels", labels], 2, f"{labels} line 2: key 'x' is not an integer"),
        ([store, "--port", 70000], 2, "--port must be in 0 .. 65535"),
    ]
    for args, code, message in cases:
        result = run(*args)
        assert result.returncode == code and message in result.stderr, (args, result)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(store, "--port", port)
    assert result.returncode == 17, result
    assert f"embstore serve: cannot listen on 127.0.0.1:{port}: " in result.stderr
    assert "address already in use" in result.stderr


def test_a_path_holding_no_store_gets_no_advice_to_create_one(tmp_path):
    # The server only reads: "to create a store, give a new path or an empty directory", which
    # the check of a path that holds no store added for every opener, did not apply.
    def serve(path):
        return subprocess.run([sys.executable, "-m", "embstore.serve", str(path)],
                              capture_output=True, text=True, timeout=60)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for name, what in (("other", "is a directory but not an embstore store (it has no 'header' "
                                 "file)"),
                       ("empty", "is an empty directory, not an embstore store"),
                       ("file", "is a file, not an embstore store (a store is a directory)")):
        path = tmp_path / name
        result = serve(path)
        assert result.returncode == 12, result
        assert result.stderr == f"embstore serve: cannot open the store {path}: {path}: {what}\n"
    # A Writer, which can create a store, is still told where.
    with pytest.raises(embstore.NotAStoreError,
                       match="; to create a store, give a new path or an empty directory$"):
        embstore.Writer(tmp_path / "other")
    with pytest.raises(embstore.NotAStoreError, match=r"\(a Writer given dim= creates one in it\)$"):
        embstore.Writer(tmp_path / "empty")


def test_stats_key_index_is_false_where_a_store_or_shard_keeps_none(tmp_path):
    """/api/stats ``key_index`` said true for a store, or a manifest of shards, created without a
    key index (it reported that this build has lookups by key index, not that the store keeps
    one), though every lookup there scans; and such a store's lookups went through its Reader,
    whose scan holds the GIL."""
    from embstore.serve.app import Server
    rng = np.random.default_rng(21)
    ids = []
    for name, key_index in (("a", True), ("b", False)):
        embstore.create(tmp_path / name, dim=4, key_index=key_index)
        with embstore.Writer(tmp_path / name) as w:
            w.append(np.arange(10), rng.random((10, 4), np.float32), epoch=0)
        ids.append(embstore.Reader(tmp_path / name).info(key_stats=False)["store_id"])
    embstore.shards.write_manifest(tmp_path / "manifest.json", {
        "dim": 4, "dtype": "float32", "shards": [
            {"path": "a", "store_id": ids[0], "rows": 10},
            {"path": "b", "store_id": ids[1], "rows": 10}]})
    for path, expected in ((tmp_path / "a", True), (tmp_path / "b", False),
                           (tmp_path / "manifest.json", False)):
        server = Server(serve_store.Follower(str(path)))
        try:
            assert server.stats()["key_index"] is expected, path
            # A store that keeps no key index is scanned with numpy, not through its Reader
            # (whose lookups would scan in C++ holding the GIL).
            lookup = server.follower.lookup
            if path.name == "manifest.json":
                assert [s is not None for s in lookup._readers()] == [True, False]
            else:
                assert lookup.use_index is expected
            # Its row at epoch 0: of the set, the last shard's (as find's rule).
            assert server.history({"key": "3"})["rows"] == \
                ([3] if path.name != "manifest.json" else [13])
        finally:
            server.close()


# A writer process that truncates: one command per line on stdin, "ROWS EPOCH" (truncate to ROWS
# rows, then append 2,000 rows at EPOCH), answered with the store's generation once committed.
TRUNCATING_WRITER = r"""
import sys
import numpy as np
import embstore
path, dim = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(11)
with embstore.Writer(path) as w:
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        rows, epoch = map(int, line.split())
        w.truncate(rows=rows)
        w.append(np.arange(2000), rng.standard_normal((2000, dim)).astype(np.float32), epoch)
        print(w.info()["generation"], flush=True)
"""


def deleted_files_mapped(pid, directory):
    """Names of the files of ``directory`` that process ``pid`` maps though they were deleted
    (/proc/PID/maps lines ending in "(deleted)")."""
    directory = os.path.realpath(directory)
    names = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and fields[5].endswith(" (deleted)"):
                path = fields[5][:-len(" (deleted)")]
                if os.path.dirname(path) == directory:
                    names.add(os.path.basename(path))
    return names


@pytest.mark.parametrize("shards", [False, True], ids=["store", "manifest"])
def test_truncates_leave_no_deleted_generation_mapped(tmp_path, server_on, shards):
    """Each truncate moves a store to new files (rows.G, index.G) and deletes the old ones; a
    Reader refreshed across truncates kept every generation it saw mapped for its lifetime (the
    server's lookup Reader, its waiting Reader, a shard's Reader): 13 truncates held 26 deleted
    files, 419 MB, for a 12 MB store. A real writer process truncates and appends again while
    the server answers; afterwards the server maps no deleted file of the store. (The Python
    Reader also drops the generations a refresh crossed since commit f4f492a; the server opens
    a new Reader per generation either way.)"""
    from serve_helpers import read_line
    store = str(tmp_path / "a")
    with embstore.Writer(store, dim=DIM, segment_mb=1) as w:
        w.append(np.arange(2000), np.ones((2000, DIM), np.float32), 0)
    served = store
    if shards:
        with embstore.Writer(tmp_path / "b", dim=DIM) as w:
            w.append(np.arange(5000, 5100), np.ones((100, DIM), np.float32), 0)
        embstore.shards.write_manifest(tmp_path / "manifest.json", {
            "dim": DIM, "dtype": "float32", "shards": [
                {"path": name, "store_id": embstore.info(tmp_path / name)["store_id"],
                 "rows": 0} for name in ("a", "b")]})
        served = str(tmp_path / "manifest.json")
    server = server_on(served)
    writer = subprocess.Popen([sys.executable, "-c", TRUNCATING_WRITER, store, str(DIM)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(writer) == "ready"
        for epoch in range(1, 9):
            writer.stdin.write(f"{1000 * (epoch % 2)} {epoch}\n")
            writer.stdin.flush()
            generation = int(read_line(writer))
            # The truncate's generation holds its kept rows before the append's: a refresh in
            # between publishes it with no row of this epoch yet (seen at load 5: the check
            # below then failed), so the wait is for the appended rows too.
            rows = 1000 * (epoch % 2) + 2000 + (100 if shards else 0)
            stats = server.until("/api/stats", lambda s: (s["generation"][0] if shards else
                                                          s["generation"]) == generation and
                                 s["rows"] == rows)
            assert stats["epochs"][-1]["epoch"] == str(epoch)
            assert server.ok(f"/api/history?key=5")["epochs"][-1] == str(epoch)
            assert server.ok(f"/api/neighbours?key=5&epoch={epoch}&k=3")["epoch"] == str(epoch)
            assert server.ok(f"/api/projection?epoch={epoch}")["epoch_rows"] == 2000
        writer.stdin.write("quit\n")
        writer.stdin.close()
        assert writer.wait(60) == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert embstore.info(store)["generation"] == 9
    # The follower swaps Readers at its next refresh (every 0.25 s) and the last request's
    # snapshot goes with the next one: a bounded time, not an instant.
    deadline = time.monotonic() + 20
    while deleted_files_mapped(server.proc.pid, store):
        assert time.monotonic() < deadline, \
            f"the server still maps deleted files: {sorted(deleted_files_mapped(server.proc.pid, store))}"
        server.ok("/api/stats")
        time.sleep(0.1)
    assert {"rows.9", "index.9"} <= set(os.listdir(store))


def test_a_number_with_thousands_of_leading_zeros_is_its_value(store, server_on):
    """int() refuses a text of more than 4,300 digits: a parameter with that many leading zeros
    was a 500 "internal error" (the length check looked at the digits after the zeros). Its
    value is read from the digits after them."""
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(5), np.eye(5, 4, dtype=np.float32), 3)
    server = server_on(store)
    zeros = "0" * 5000  # One such parameter per request: aiohttp takes lines of 8,190 bytes.
    assert server.ok(f"/api/history?key={zeros}1")["key"] == "1"
    assert server.ok(f"/api/history?key={zeros}")["key"] == "0"
    assert server.ok(f"/api/neighbours?key={zeros}2&epoch=3")["row"] == 2
    assert server.ok(f"/api/neighbours?key=2&epoch={zeros}3")["epoch"] == "3"
    assert len(server.ok(f"/api/neighbours?key=2&k={zeros}2")["neighbours"]) == 2
    assert server.ok(f"/api/projection?epoch={zeros}3")["epoch"] == "3"
    assert server.ok(f"/api/projection?limit={zeros}4")["sampled"] == 4
    cases = [
        (f"/api/history?key={'0' * 3000}{'1' * 3000}", 400, "key must be in 0 .. "
                                                             "18446744073709551615; got a "
                                                             "number of 3000 digits"),
        (f"/api/projection?limit={zeros}", 400, "limit must be in 1 .. 20000; got 0"),
        (f"/api/projection?limit={zeros}20001", 400, "limit must be in 1 .. 20000; got 20001"),
        (f"/api/neighbours?key=1&k={zeros}", 400, "k must be in 1 .. 100; got 0"),
        (f"/api/neighbours?key=1&k={zeros}101", 400, "k must be in 1 .. 100; got 101"),
        (f"/api/neighbours?key=1&epoch={zeros}4", 404, "epoch 4 is not in the store"),
        (f"/api/projection?epoch={zeros}{'9' * 30}", 400, "epoch must be in 0 .. "
                                                          "18446744073709551615; got a number "
                                                          "of 30 digits"),
    ]
    for path, status, message in cases:
        got, body = server.get(path)
        assert (got, message in body.get("error", "")) == (status, True), (path[:60], got, body)


def damage_row(store, row):
    """Flips a byte of row ``row``'s vector in the store's data file (FORMAT.md: row r at byte
    r * record_bytes of rows.G): its checksum no longer matches."""
    info = embstore.info(store)
    with open(os.path.join(store, f"rows.{info['generation']}"), "r+b") as f:
        f.seek(row * info["record_bytes"] + 1)
        byte = f.read(1)
        f.seek(row * info["record_bytes"] + 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_rows_failing_their_checksum_are_refused_or_left_out_and_counted(store, server_on):
    """Rows whose bytes no longer match their checksum were served as if sound: a history, a
    neighbour list and a projection plotted them. History and neighbours check the rows they
    return (a 503 naming the row and the store); a projection leaves the sampled rows that fail
    out and counts them (``corrupt``)."""
    rng = np.random.default_rng(8)
    with embstore.Writer(store, dim=DIM) as w:
        for epoch in range(3):
            w.append(np.arange(100), rng.standard_normal((100, DIM)).astype(np.float32), epoch)
    server = server_on(store)
    assert server.ok("/api/projection?epoch=1")["corrupt"] == 0  # Fitted and cached.
    damage_row(store, 107)  # key 7 at epoch 1
    damage_row(store, 250)  # key 50 at epoch 2
    for path in ("/api/history?key=7", "/api/neighbours?key=7&epoch=1"):
        status, body = server.get(path)
        assert status == 503, (path, status, body)
        assert "row 107 (key 7, epoch 1) fails its checksum" in body["error"], (path, body)
        assert store in body["error"], (path, body)
    # Another key whose nearest rows at epoch 1 hold key 7's: refused too, naming the row.
    r = embstore.Reader(store)
    near = np.argsort(np.linalg.norm(r.vectors[100:200] - r.vectors[107], axis=1))[1]
    status, body = server.get(f"/api/neighbours?key={near}&epoch=1&k=99")
    assert status == 503 and "row 107" in body["error"], body
    assert server.ok("/api/neighbours?key=8&epoch=0&k=5")["row"] == 8  # sound rows answer
    assert server.ok("/api/history?key=8")["rows"] == [8, 108, 208]
    # Epoch 1's projection was cached before the damage, epoch 2's is fitted after it: either
    # way the rows that fail are left out and counted.
    for epoch, row in ((1, 107), (2, 250)):
        p = server.ok(f"/api/projection?epoch={epoch}")
        assert (p["corrupt"], p["sampled"], p["epoch_rows"]) == (1, 99, 100)
        assert row not in p["rows"] and str(row - 100 * epoch) not in p["keys"]
        assert len(p["x"]) == len(p["keys"]) == 99
    assert server.ok("/api/projection?epoch=0")["corrupt"] == 0


def test_a_history_takes_no_work_per_version_of_a_key(store):
    """/api/history built the Python list of every version of the key (Reader.history) before
    keeping the latest 1,000: 2M versions of one key took 1.5 s and 450 MB and held up
    /api/stats. It looks the key up per epoch (its latest row there): memory and time follow the
    epochs, not the versions."""
    import tracemalloc
    from embstore.serve.app import Server
    with embstore.Writer(store, dim=4) as w:
        block = np.ones((50_000, 4), np.float32)
        for epoch in range(3):
            for _ in range(2):  # key 1, 100,000 times per epoch
                w.append(np.full(50_000, 1), block, epoch)
            w.append([2], block[:1], epoch)
    server = Server(serve_store.Follower(store))
    try:
        tracemalloc.start()
        h = server.history({"key": "1"})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (h["rows"], h["epochs"], h["total_epochs"]) == \
            ([99_999, 200_000, 300_001], ["0", "1", "2"], 3)
        assert [t["row"] for t in h["trajectory"]] == h["rows"]
        assert peak < 4 << 20, peak  # The 300,000 versions as (row, epoch) tuples: ~30 MB.
        assert server.history({"key": "2"})["rows"] == [100_000, 200_001, 300_002]
    finally:
        server.close()


def test_the_benchmark_stops_its_servers_when_it_fails(tmp_path, monkeypatch):
    """bench/serve_bench.py stopped the servers it started only on success: an exception (a
    request failing, a writer that died) left an `embstore serve` process running."""
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "serve_bench", os.path.join(os.path.dirname(__file__), "..", "..", "bench",
                                    "serve_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    started = []
    start_server = bench.start_server

    def recorded(path):
        proc, url = start_server(path)
        started.append(proc)
        return proc, url

    def failing(*_):
        raise RuntimeError("a failure in the middle of a run")
    monkeypatch.setattr(bench, "start_server", recorded)
    monkeypatch.setattr(bench, "get", failing)
    args = argparse.Namespace(rows=1000, dim=4, epochs=2, first_repeats=1)
    with pytest.raises(RuntimeError, match="in the middle"):
        bench.first_projection(args, str(tmp_path))
    monkeypatch.undo()
    monkeypatch.setattr(bench, "start_server", recorded)
    monkeypatch.setattr(bench, "cpu_seconds", failing)
    # No polling thread (the old code never stopped it after an error: pytest never ended).
    monkeypatch.setattr(bench, "page_client", lambda url, stop: None)
    with pytest.raises(RuntimeError, match="in the middle"):
        bench.writer_run(str(tmp_path), 4, 1, "served")
    assert len(started) == 2
    left_running = [proc.args for proc in started if proc.poll() is None]
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not left_running


class PatchedServerProcess(ServerProcess):
    """``embstore serve STORE --port 0 ARGS...`` run by ``python3 -m embstore.serve``'s own
    ``__main__`` (runpy) after ``patch`` (Python source) ran in the process: a stand-in for a slow
    computation or a slow clean-up that a test cannot get on a small store."""

    def __init__(self, store, patch, *args):
        code = (f"import runpy, sys, time\n{patch}\n"
                "runpy.run_module('embstore.serve', run_name='__main__', alter_sys=True)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, store, "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = read_line(self.proc)
        assert "http://" in line, line
        self.url = line[line.index("http://"):].rstrip("/")


def neighbour_store(store, rows=40):
    embstore.create(store, dim=4)
    with embstore.Writer(store) as w:
        w.append(np.arange(rows), np.random.default_rng(0).random((rows, 4), np.float32), 0)


def _signalled(proc, signum):
    """Sends `signum` to `proc`; its exit status and the seconds it took to end (at most 30)."""
    started = time.monotonic()
    proc.send_signal(signum)
    code = proc.wait(30)
    return code, time.monotonic() - started


def _killed(proc):
    """`proc` killed if it still runs, and waited for."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_the_server_soon_while_computations_are_queued(store, signum):
    """Ctrl-C (or SIGTERM) while neighbour queries filled the two compute threads and 10 more
    waited for them: the server kept computing the queued ones, up to aiohttp's default 60 s
    shutdown timeout and then every one left (the pool's threads are joined at exit); the
    review measured 63.5 s for 40 queued queries on a 1M x 256 store. Now queued ones are
    cancelled (a 503 saying the server stops), the two running get a short grace, and the
    process ends with status 0 without waiting for them. Each computation here sleeps 600 s."""
    neighbour_store(store)
    patch = ("import threading\n"
             "from embstore.serve import analysis\n"
             "nearest, inside, lock = analysis.nearest, [], threading.Lock()\n"
             "def slow(*a, **k):\n"
             "    with lock:\n"
             "        inside.append(1)\n"
             "        if len(inside) == 2:\n"
             "            print('both computing', flush=True)\n"
             "    time.sleep(600)\n"
             "    return nearest(*a, **k)\n"
             "analysis.nearest = slow\n")
    server = PatchedServerProcess(store, patch)
    answers = []

    def ask(key):
        try:
            answers.append(server.get_raw(f"/api/neighbours?key={key}&k=3"))
        except OSError as e:  # the connection of a running computation, closed at the stop
            answers.append(type(e).__name__)
    threads = [threading.Thread(target=ask, args=(key,)) for key in range(12)]
    try:
        for thread in threads:
            thread.start()
        assert read_line(server.proc) == "both computing"  # the two compute threads
        time.sleep(1)  # the other 10 reach the server and queue
        code, took = _signalled(server.proc, signum)
    finally:
        _killed(server.proc)
        for thread in threads:
            thread.join(60)
    err = server.proc.stderr.read()
    assert code == 0 and took < 10, (code, took, err)
    assert "Traceback" not in err, err
    assert len(answers) == 12, answers
    for answer in answers:
        if not isinstance(answer, str):
            status, body = answer
            assert status == 503 and "stopping" in json.loads(body)["error"], answer


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_stop_signal_ends_the_server_at_once(store, signum):
    """A second Ctrl-C (or SIGTERM) while the first one's clean-up still runs ends the process at
    once, killed by the signal (shell status 130 or 143), as the command-line tool's long
    commands do; it was ignored (each signal only set the same stop event). The clean-up here is
    made to take 600 s (the follower's stop sleeps)."""
    neighbour_store(store)
    patch = ("from embstore.serve import store\n"
             "def slow_stop(self):\n"
             "    print('stopping', flush=True)\n"
             "    time.sleep(600)\n"
             "store.Follower.stop = slow_stop\n")
    server = PatchedServerProcess(store, patch)
    try:
        assert server.ok("/api/stats")["rows"] == 40
        server.proc.send_signal(signum)
        assert read_line(server.proc) == "stopping"
        assert server.proc.poll() is None
        code, took = _signalled(server.proc, signum)
    finally:
        _killed(server.proc)
    assert code == -signum and took < 10, (code, took, server.proc.stderr.read())


def test_idle_and_half_sent_connections_are_closed(store, server_on):
    """A connection that sends no whole request within kIdleSeconds (10 s) of its opening or of
    its last answer is closed: one that sends nothing, one that sent half a request, one that
    trickles header lines, one kept alive after an answer. They stayed open (aiohttp 3.8 has no
    timeout before a first request; its keep-alive timeout is 75 s), and ~1,000 of them took
    every descriptor under ulimit -n 1024: the server answered no one (review, t8b.py). A client
    asking every second on one connection keeps it, and the server keeps answering others."""
    import http.client
    import select
    import socket
    neighbour_store(store)
    server = server_on(store)
    host, port = server.url.split("//")[1].rsplit(":", 1)
    opened = time.monotonic()
    socks = {f"silent {i}": socket.create_connection((host, int(port))) for i in range(3)}
    socks["half-sent"] = socket.create_connection((host, int(port)))
    socks["half-sent"].sendall(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    socks["trickling"] = socket.create_connection((host, int(port)))
    socks["trickling"].sendall(b"GET /api/stats HTTP/1.1\r\n")
    kept = socket.create_connection((host, int(port)))
    kept.sendall(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = http.client.HTTPResponse(kept)
    answer.begin()
    assert answer.status == 200 and json.loads(answer.read())["rows"] == 40
    socks["kept alive after an answer"] = kept
    polling = http.client.HTTPConnection(host, int(port), timeout=60)
    polled = None
    closed = {}
    try:
        while len(closed) < len(socks) and time.monotonic() - opened < 60:
            polling.request("GET", "/api/epochs", headers={"Host": "127.0.0.1"})
            response = polling.getresponse()
            assert response.status == 200 and json.loads(response.read())["rows"] == 40
            assert polled in (None, polling.sock), "the polling connection was closed"
            polled = polling.sock
            assert server.ok("/api/stats")["rows"] == 40  # a new connection is answered
            try:
                socks["trickling"].sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
            open_ones = [s for name, s in socks.items() if name not in closed]
            for sock in select.select(open_ones, [], [], 1.0)[0]:
                try:
                    gone = sock.recv(4096) == b""
                except OSError:
                    gone = True
                if gone:
                    name = next(n for n, s in socks.items() if s is sock)
                    closed[name] = round(time.monotonic() - opened, 1)
    finally:
        polling.close()
        for sock in socks.values():
            sock.close()
    assert sorted(closed) == sorted(socks), f"still open after 60 s: {set(socks) - set(closed)}"
    assert max(closed.values()) < 30, closed


@pytest.mark.parametrize("bind", ["127.0.0.2", "127.1.2.3", "0.0.0.0", "::", "localhost"])
def test_host_check_covers_every_loopback_and_wildcard_bind(store, bind):
    """The DNS-rebinding check (403 for a Host that is not a loopback name) was on only for
    --host 127.0.0.1, localhost or ::1: --host 127.0.0.2 (loopback too) or 0.0.0.0 / :: (which
    listen on loopback as well) answered a Host of any site with the data (review). Now any
    loopback bind answers loopback addresses and localhost; a wildcard bind answers IP
    addresses, localhost and this machine's name (as a browser names it), and refuses other
    names. (The app runs in this process on aiohttp's TestServer, which listens on 127.0.0.1;
    the check depends only on the --host the Server is given.)"""
    import asyncio
    import socket
    from aiohttp.test_utils import TestClient, TestServer
    from embstore.serve import app
    neighbour_store(store)
    wildcard = bind in ("0.0.0.0", "::")
    server = app.Server(serve_store.Follower(store), host=bind)
    accepted = ["localhost", "LOCALHOST.", "127.0.0.1", "[::1]", "127.0.0.2", "127.255.0.9"]
    refused = ["attacker.example", "ATTACKER.example.", "localhost.attacker.example",
               "127.0.0.1.attacker.example", "localhost..", "[::1].attacker.example"]
    if wildcard:
        accepted += ["192.0.2.7", "[2001:db8::1]", "[::ffff:192.0.2.7]", socket.gethostname()]
    else:
        accepted += [bind]
        refused += ["192.0.2.7", "[2001:db8::1]", "[::ffff:192.0.2.7]"]

    async def run():
        async with TestClient(TestServer(app.make_app(server))) as client:
            for host in accepted:
                for header in (host, f"{host}:8080"):
                    response = await client.get("/api/stats", headers={"Host": header})
                    assert response.status == 200, (bind, header)
            for host in refused:
                for header in (host, f"{host}:8080"):
                    response = await client.get("/api/stats", headers={"Host": header})
                    body = await response.json()
                    assert response.status == 403 and "refused" in body["error"], (bind, header)
                    assert repr(header) in body["error"], body
    asyncio.run(run())


def test_a_bind_to_one_network_address_keeps_answering_any_host(store):
    """A --host of one network address (not loopback, not a wildcard) cannot be reached through
    a loopback rebinding: its Host header is not checked, as before (a proxy or a DNS name of
    the machine reaches it by a name the server cannot know)."""
    import asyncio
    from aiohttp.test_utils import TestClient, TestServer
    from embstore.serve import app
    neighbour_store(store)
    server = app.Server(serve_store.Follower(store), host="192.0.2.7")

    async def run():
        async with TestClient(TestServer(app.make_app(server))) as client:
            response = await client.get("/api/stats", headers={"Host": "attacker.example"})
            assert response.status == 200
    asyncio.run(run())


def test_a_request_line_or_header_too_long_is_one_line_on_stderr(store):
    """A request line or header over 8,190 bytes is refused by aiohttp's parser (400) before the
    app sees it; aiohttp logged it with a traceback, 8 lines per request on stderr (review). It
    is one line now. (The 400's body stays aiohttp's text: its parser answers without the
    app's middleware.)"""
    import socket
    neighbour_store(store)
    server = ServerProcess(store)
    try:
        host, port = server.url.split("//")[1].rsplit(":", 1)
        for request in (b"GET /api/stats?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                        b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 9000
                        + b"\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=60) as sock:
                sock.sendall(request)
                answer = sock.makefile("rb").read()
            assert answer.startswith(b"HTTP/1.0 400 "), answer[:200]
        assert server.ok("/api/stats")["rows"] == 40
    finally:
        code, err = server.stop()
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    for line in lines:
        assert line.startswith("embstore serve: a request refused (400): Got more than 8190 "
                               "bytes"), line
