"""embstore.dask on a real dask.distributed LocalCluster (2 worker processes on 127.0.0.1):
per-epoch means and a k-NN over a 2-shard manifest, checked against numpy on the shards' rows,
with no vector data in the task graph."""
import os
import pickle

import numpy as np
import pytest

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import embstore  # noqa: E402
import embstore.dask  # noqa: E402
from embstore import shards as es  # noqa: E402

DIM = 32


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """A manifest over two stores of 3 epochs each (different sizes), and their merged store."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    entries = []
    for name, n in (("node-0", 1500), ("node-1", 1100)):
        with embstore.Writer(root / name, dim=DIM) as w:
            for epoch in range(3):
                w.append(np.arange(n, dtype=np.uint64),
                         rng.standard_normal((n, DIM)).astype(np.float32) + epoch, epoch)
        info = embstore.info(root / name)
        entries.append({"path": name, "store_id": info["store_id"],
                        "rows": info["committed_rows"], "epochs": [0, 1, 2]})
    es.write_manifest(root / es.MANIFEST_NAME,
                      {"dim": DIM, "dtype": "float32", "metadata": "", "shards": entries})
    embstore.merge(root / "merged", root)
    return root


def test_task_graphs_carry_no_vector_data(two_shards):
    arrays = embstore.dask.from_store(two_shards, chunk_rows=500)
    data_bytes = arrays.vectors.nbytes
    for array in arrays:
        graph = dict(array.__dask_graph__())
        size = len(pickle.dumps(graph))
        assert size < 200 * len(graph), size  # a path, a store id, its generation and two row numbers per task
        assert size < data_bytes / 100
        for task in graph.values():
            assert not any(isinstance(part, np.ndarray) for part in task)


def test_a_single_store_and_its_views(tmp_path):
    with embstore.Writer(tmp_path / "one", dim=4, dtype="float16") as w:
        w.append(np.arange(10), np.arange(40, dtype=np.float32).reshape(10, 4), epoch=3)
    arrays = embstore.dask.from_store(tmp_path / "one", chunk_rows=4)
    assert arrays.vectors.chunks == ((4, 4, 2), (4,))
    got = arrays.vectors.compute(scheduler="sync")
    assert got.dtype == np.float16
    assert np.array_equal(got, np.arange(40, dtype=np.float16).reshape(10, 4))
    assert arrays.epochs.compute(scheduler="sync").tolist() == [3] * 10
    # One chunk read in this process is a view of the mapping, not a copy.
    chunk = arrays.vectors.blocks[1].compute(scheduler="sync")
    assert not chunk.flags.writeable and not chunk.flags.owndata
    embstore.create(tmp_path / "empty", dim=4)
    assert embstore.dask.from_store(tmp_path / "empty").vectors.compute().shape == (0, 4)


def test_a_task_refuses_a_different_store_at_the_same_path(tmp_path):
    import shutil
    embstore.create(tmp_path / "s", dim=2)
    with embstore.Writer(tmp_path / "s") as w:
        w.append([1, 2], np.ones((2, 2), np.float32))
    arrays = embstore.dask.from_store(tmp_path / "s")
    old_id = embstore.info(tmp_path / "s")["store_id"]
    shutil.rmtree(tmp_path / "s")  # replaced since, as another machine's store would be
    embstore.create(tmp_path / "s", dim=2)
    new_id = embstore.info(tmp_path / "s")["store_id"]
    with pytest.raises(embstore.FormatMismatchError) as error:
        arrays.vectors.compute(scheduler="sync")
    # It guessed "another machine's disk" only; here it was this machine's, replaced.
    assert str(error.value) == (
        f"{tmp_path / 's'}: this worker sees store {new_id}, not the store {old_id} the graph "
        "was built for (replaced since the graph was built, or another machine's disk at the "
        "same path)")


def test_persisted_chunks_share_their_process_readers_mappings(tmp_path):
    # Each task opened a Reader of its own, and the view it returned kept that Reader's 5
    # mappings (and address space of about twice the store): 20,000 persisted chunks ran out of
    # vm.max_map_count. Now the tasks of a shard share their process's Reader.
    def mappings():
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    with embstore.Writer(tmp_path / "s", dim=4) as w:
        w.append(np.arange(6000), np.arange(24000, dtype=np.float32).reshape(6000, 4), 1)
    arrays = embstore.dask.from_store(tmp_path / "s", chunk_rows=5)  # 1,200 chunks an array
    before = mappings()
    kept = dask.persist(*arrays, scheduler="threads")
    grown = mappings() - before
    assert grown < 100, grown  # was about 3 x 1,200 x 5
    vectors, keys, epochs = dask.compute(*kept, scheduler="threads")
    assert vectors.tolist() == np.arange(24000, dtype=np.float32).reshape(6000, 4).tolist()
    assert keys.tolist() == list(range(6000)) and set(epochs.tolist()) == {1}


def test_a_task_on_a_copy_older_than_the_graph_says_so(tmp_path):
    # A worker whose copy of the store predates a truncate was told the store "was truncated
    # since from_store ... call from_store again", which would not help.
    import shutil
    with embstore.Writer(tmp_path / "s", dim=2) as w:
        w.append([1, 2, 3], np.ones((3, 2), np.float32))
    shutil.copytree(tmp_path / "s", tmp_path / "copy")  # generation 1
    with embstore.Writer(tmp_path / "s") as w:
        w.truncate(1)
        w.append([4, 5], np.zeros((2, 2), np.float32))
    arrays = embstore.dask.from_store(tmp_path / "s")  # generation 2
    shutil.rmtree(tmp_path / "s")
    os.rename(tmp_path / "copy", tmp_path / "s")
    with pytest.raises(embstore.FormatMismatchError,
                       match="generation 1 of the store, older than generation 2 "
                             ".*a copy taken before a truncate"):
        arrays.keys.compute(scheduler="sync")


def _latest_rows(keys, epochs):
    """Row numbers of the last row of each (key, epoch), ascending: what unique=True keeps."""
    last = {}
    for row, pair in enumerate(zip(keys.tolist(), epochs.tolist())):
        last[pair] = row
    return sorted(last.values())


def _with_duplicates(path):
    """A store whose (2, 0) and (3, 0) were appended twice (a batch written again, as by a task
    run twice), values telling the copies apart: rows 1, 2 are the earlier copies."""
    with embstore.Writer(path, dim=4) as w:
        w.append([1, 2, 3], np.arange(12, dtype=np.float32).reshape(3, 4), epoch=0)
        w.append([2, 3], np.full((2, 4), 100, np.float32), epoch=0)
        w.append([1], np.full((1, 4), 200, np.float32), epoch=1)
        w.append([4, 5], np.full((2, 4), 300, np.float32), epoch=0)


def test_unique_keeps_the_later_row_of_each_key_and_epoch(tmp_path):
    # Rows stored twice (at-least-once writes) were counted twice by every computation; with
    # unique=True each (key, epoch) is one row, the later one, as lookups answer.
    path = tmp_path / "s"
    _with_duplicates(path)
    r = embstore.Reader(path)
    kept = _latest_rows(r.keys, r.epochs)
    assert kept == [0, 3, 4, 5, 6, 7]
    for chunk_rows in (1, 2, 3, 100):
        arrays = embstore.dask.from_store(path, chunk_rows=chunk_rows, unique=True)
        assert arrays.vectors.shape == (6, 4)
        got = [a.compute(scheduler="sync") for a in arrays]
        np.testing.assert_array_equal(got[0], r.vectors[kept])
        assert got[1].tolist() == r.keys[kept].tolist()
        assert got[2].tolist() == r.epochs[kept].tolist()
        assert arrays.vectors.chunks[0] == arrays.keys.chunks[0] == arrays.epochs.chunks[0]
    # Chunks of 2: rows (0, 3) span two ranges (a copy); rows (4, 5) are one (a view).
    arrays = embstore.dask.from_store(path, chunk_rows=2, unique=True)
    assert arrays.vectors.chunks[0] == (2, 2, 2)
    assert arrays.vectors.blocks[0].compute(scheduler="sync").flags.owndata
    view = arrays.vectors.blocks[1].compute(scheduler="sync")
    assert not view.flags.owndata and not view.flags.writeable
    # Without unique: every row, as before.
    assert embstore.dask.from_store(path).keys.compute(scheduler="sync").tolist() == \
        r.keys.tolist()


def test_unique_over_shards_keeps_the_later_shards_row_and_is_no_vector_data(tmp_path):
    # A (key, epoch) in two shards resolves to the higher global row, as ShardSet.find does.
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    with embstore.Writer(paths[0], dim=4) as w:
        w.append(np.arange(3000), np.zeros((3000, 4), np.float32), epoch=0)
    with embstore.Writer(paths[1], dim=4) as w:
        w.append([7, 9000], np.ones((2, 4), np.float32), epoch=0)
    s = embstore.ShardSet(paths)
    kept = _latest_rows(s.keys, s.epochs)
    assert len(kept) == 3001 and 7 not in kept and s.find(7, 0) == 3000
    arrays = embstore.dask.from_store(paths, chunk_rows=1000, unique=True)
    assert arrays.keys.compute(scheduler="sync").tolist() == s.keys[kept].tolist()
    assert arrays.vectors.sum().compute(scheduler="sync") == 8.0  # the later copy of 7: ones
    for array in arrays:  # row ranges, not row numbers: a few bytes a task
        graph = dict(array.__dask_graph__())
        assert len(pickle.dumps(graph)) < 300 * len(graph)


def test_unique_drops_no_row_for_a_damaged_key_index_slot(tmp_path):
    # A slot damaged inside the key index's tables can name another key's row: unique works
    # from the rows' own keys and epochs, so no row is dropped for it.
    from conftest import point_pair_slot_at
    path = str(tmp_path / "s")
    with embstore.Writer(path, dim=4) as w:
        w.append([1, 2, 3], np.zeros((3, 4), np.float32), epoch=0)
    point_pair_slot_at(path, 1, 2)  # (1, 0) now found at row 2, which holds (3, 0)
    assert embstore.Reader(path).find(1, 0) == 2
    keys = embstore.dask.from_store(path, unique=True).keys.compute(scheduler="sync")
    assert keys.tolist() == [1, 2, 3]


def test_unique_over_many_shards_and_a_store_without_a_key_index(tmp_path):
    # It looked every row up in every shard (a review timed 400 shards of 200,000 rows at 5.4
    # s against 0.07 for one), and a shard without a key index rebuilt a map of all its rows
    # per lookup call. One sort of the set's keys and epochs: checked against numpy here.
    rng = np.random.default_rng(7)
    paths = []
    for i in range(40):
        path = str(tmp_path / f"t{i}")
        with embstore.Writer(path, dim=2, key_index=(i % 2 == 0)) as w:
            for _ in range(3):
                keys = rng.integers(0, 30, 20).astype(np.uint64)
                w.append(keys, np.zeros((20, 2), np.float32), epoch=rng.integers(0, 2, 20))
        paths.append(path)
    s = embstore.ShardSet(paths)
    kept = _latest_rows(s.keys, s.epochs)
    arrays = embstore.dask.from_store(paths, chunk_rows=7, unique=True)
    assert arrays.keys.compute(scheduler="sync").tolist() == s.keys[kept].tolist()
    assert arrays.epochs.compute(scheduler="sync").tolist() == s.epochs[kept].tolist()

@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, host="127.0.0.1")
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_epoch_means_and_knn_on_a_cluster_match_numpy(two_shards, client):
    arrays = embstore.dask.from_store(two_shards / es.MANIFEST_NAME, chunk_rows=1000)
    vectors, epochs = arrays.vectors, arrays.epochs
    # Chunks align with rows and never span shards: 4500 rows of node-0, then 3300 of node-1.
    assert vectors.chunks[0] == (1000,) * 4 + (500,) + (1000,) * 3 + (300,)
    assert vectors.shape == (7800, DIM) and vectors.dtype == np.float32

    # numpy's answers from the shards in global row order (the dask arrays' order), one copy.
    s = embstore.ShardSet(two_shards / es.MANIFEST_NAME)
    x = np.concatenate([np.asarray(r.vectors, np.float64) for r in s.shards])
    e = np.asarray(s.epochs)

    means = []
    for epoch in range(3):
        mask = (epochs == epoch)[:, None]
        means.append((vectors * mask).sum(axis=0) / mask.sum())
    got = np.stack(dask.compute(*means))
    want = np.stack([x[e == epoch].mean(axis=0) for epoch in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    queries = np.random.default_rng(9).standard_normal((4, DIM))
    v = vectors.astype(np.float64)
    dist = (v * v).sum(axis=1)[:, None] - 2 * v @ queries.T
    neighbours = dask.array.argtopk(-dist, 5, axis=0).compute()  # (5, queries)
    brute = ((x[:, None, :] - queries[None, :, :]) ** 2).sum(axis=2)
    want = np.argsort(brute, axis=0)[:5]
    for q in range(queries.shape[0]):
        assert set(neighbours[:, q].tolist()) == set(want[:, q].tolist())

    keys = arrays.keys.compute()
    assert np.array_equal(keys, s.keys)
    # The merged store holds the same rows in epoch order (embstore.merge).
    merged = embstore.Reader(two_shards / "merged")
    order = np.argsort(e, kind="stable")
    assert np.array_equal(merged.epochs, e[order]) and np.array_equal(merged.keys, keys[order])
    assert np.array_equal(np.asarray(merged.vectors, np.float64), x[order])
    # The chunks were read by the worker processes and stay there (nothing came from here).
    persisted = vectors.persist()
    distributed.wait(persisted)
    holders = set().union(*client.who_has(persisted).values())
    assert holders and holders <= set(client.scheduler_info()["workers"])



def _rolled_back(path):
    """Rows 0..3 (keys 1..4, epoch 0), then a resume from a checkpoint: truncated to 2 rows and
    appended again (keys 77, 88, epoch 9): rows 2 and 3 are other rows now."""
    with embstore.Writer(path) as w:
        w.truncate(rows=2)
        w.append(np.array([77, 88], np.uint64), np.full((2, 4), -5, np.float32), epoch=9)


def _four_rows(path):
    with embstore.Writer(path, dim=4) as w:
        w.append(np.array([1, 2, 3, 4], np.uint64), np.arange(16, dtype=np.float32).reshape(4, 4),
                 epoch=0)


def test_a_graph_refuses_a_store_truncated_and_refilled_since(tmp_path, client):
    _four_rows(tmp_path / "a")
    arrays = embstore.dask.from_store(tmp_path / "a", chunk_rows=2)
    assert client.compute(arrays.keys, sync=True).tolist() == [1, 2, 3, 4]
    _rolled_back(tmp_path / "a")
    assert len(embstore.Reader(tmp_path / "a")) == 4  # as many rows as the graph's snapshot
    for array in arrays:
        with pytest.raises(embstore.FormatMismatchError,
                           match="generation 2 of the store, not generation 1"):
            client.compute(array, sync=True)
    # Arrays built again cover the new snapshot.
    again = embstore.dask.from_store(tmp_path / "a", chunk_rows=2)
    assert client.compute(again.keys, sync=True).tolist() == [1, 2, 77, 88]
    assert client.compute(again.epochs, sync=True).tolist() == [0, 0, 9, 9]
    assert (client.compute(again.vectors, sync=True)[2:] == -5).all()


@pytest.mark.parametrize("array", ["vectors", "keys", "epochs"])
def test_a_task_whose_shared_reader_another_task_refreshed_across_a_truncate_says_so(
        tmp_path, monkeypatch, array):
    """The tasks a worker process runs share one Reader per shard snapshot. One task's thread
    refreshed it across a truncate after another task's thread had checked it and before that
    one read: the second returned the new generation's rows under the graph's row numbers,
    without a word. Pinned here: task 0's read waits (in the read call) until task 1, on
    another thread, has refreshed the Reader after the store was rolled back."""
    import threading
    import time
    _four_rows(tmp_path / "a")
    arrays = embstore.dask.from_store(tmp_path / "a", chunk_rows=2)
    (_, first), (_, second) = sorted(dict(getattr(arrays, array).__dask_graph__()).items())
    checked, refreshed = threading.Event(), threading.Event()
    reads = {"vectors": (embstore.Reader, "rows")}.get(array)
    if reads is None:  # keys and epochs: the native Reader's call
        reads = (type(embstore.Reader(tmp_path / "a")._native), array)
    real = getattr(*reads)

    def held(self, *args):
        if threading.current_thread().name == "task 0":
            checked.set()
            assert refreshed.wait(30)
        return real(self, *args)

    monkeypatch.setattr(*reads, held)
    results = {}

    def run(name, task):
        try:
            results[name] = task[0](*task[1:])
        except Exception as error:
            results[name] = error

    task0 = threading.Thread(target=run, args=("task 0", first), name="task 0")
    task0.start()
    assert checked.wait(30)
    _rolled_back(tmp_path / "a")
    time.sleep(0.2)  # a Reader looks for a truncate at most every 50 ms
    run("task 1", second)  # refreshes the shared Reader: generation 2
    refreshed.set()
    task0.join()
    for name in ("task 0", "task 1"):
        assert isinstance(results[name], embstore.FormatMismatchError), results
        assert "generation 2 of the store, not generation 1" in str(results[name]), results


def test_tasks_writing_as_the_readme_says_store_their_rows_once_when_run_twice(tmp_path, client):
    """Dask runs a task again after a worker dies (or with retries=), and an append is never
    undone: the README's recipe (a store per task, emptied before its appends) makes a task's
    write idempotent. Every task here runs twice, as after a worker's death."""
    def write_partition(path, first, n):
        with embstore.Writer(path, dim=4) as w:
            w.truncate(rows=0)
            w.append(np.arange(first, first + n, dtype=np.uint64),
                     np.full((n, 4), first, np.float32), epoch=0)
        return n

    paths = [str(tmp_path / f"part-{i}") for i in range(3)]
    for _ in range(2):
        futures = [client.submit(write_partition, path, 100 * i, 50, pure=False)
                   for i, path in enumerate(paths)]
        assert client.gather(futures) == [50, 50, 50]
    arrays = embstore.dask.from_store(paths)
    keys = client.compute(arrays.keys, sync=True)
    assert sorted(keys.tolist()) == [k for i in range(3) for k in range(100 * i, 100 * i + 50)]


def test_arrays_built_after_a_truncate_share_no_task_with_those_before(tmp_path, client):
    # Results held on the cluster (persisted, say) answer every task of the same name: a new
    # snapshot must not be given the old one's names.
    _four_rows(tmp_path / "a")
    old = embstore.dask.from_store(tmp_path / "a", chunk_rows=2)
    old_keys = old.keys.persist()
    distributed.wait(old_keys)
    _rolled_back(tmp_path / "a")
    new = embstore.dask.from_store(tmp_path / "a", chunk_rows=2)
    assert not set(dict(new.keys.__dask_graph__())) & set(dict(old.keys.__dask_graph__()))
    assert client.compute(new.keys, sync=True).tolist() == [1, 2, 77, 88]
    with embstore.Writer(tmp_path / "a") as w:
        w.append(np.array([99], np.uint64), np.zeros((1, 4), np.float32), epoch=9)
    grown = embstore.dask.from_store(tmp_path / "a", chunk_rows=2)
    assert client.compute(grown.keys, sync=True).tolist() == [1, 2, 77, 88, 99]


@pytest.mark.parametrize("arguments, message", [
    ({"chunk_rows": 0}, "chunk_rows must be a positive integer; got 0"),
    ({"chunk_rows": -1}, "chunk_rows must be a positive integer; got -1"),
    ({"chunk_rows": 1.5}, "chunk_rows must be a positive integer; got float 1.5"),
    ({"chunk_rows": True}, "chunk_rows must be a positive integer; got bool True"),
    ({"chunk_mb": 0}, "chunk_mb must be a positive number of MiB; got 0"),
    ({"chunk_mb": -5}, "chunk_mb must be a positive number of MiB; got -5"),
    ({"chunk_mb": float("inf")}, "chunk_mb must be a positive number of MiB; got inf"),
    ({"chunk_mb": float("nan")}, "chunk_mb is nan"),
    ({"chunk_mb": "64"}, "chunk_mb must be a number of MiB; got str '64'"),
])
def test_chunk_sizes_that_are_not_positive_are_refused(tmp_path, arguments, message):
    _four_rows(tmp_path / "a")
    with pytest.raises(ValueError) as error:
        embstore.dask.from_store(tmp_path / "a", **arguments)
    assert message in str(error.value)


def test_the_readme_epoch_mean_on_a_float16_store_on_a_cluster(tmp_path, client):
    # The README's recipe summed in the store's dtype: on a float16 store the sum stopped at
    # 2048 (then overflowed) without a word, and the mean of ones came out as 0.03.
    store = str(tmp_path / "half")
    with embstore.Writer(store, dim=4, dtype="float16") as w:
        w.append(np.arange(70000), np.ones((70000, 4), np.float32), 3)
        w.append(np.arange(70000, 70010), np.full((10, 4), 5, np.float32), 4)
    a = embstore.dask.from_store(store, chunk_rows=20000)
    mask = (a.epochs == 3)[:, None]
    mean3 = ((a.vectors * mask).sum(0, dtype="float64") / mask.sum()).compute()  # as README
    assert mean3.tolist() == [1.0] * 4


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_readme_epoch_mean_recipe_as_written_there_gives_the_mean(tmp_path, dtype):
    # Run from the README's text: on a bfloat16 store (rows as uint16 bit patterns, numpy having
    # no bfloat16) it averaged the bit patterns, [16416.0, 27413.3] for a mean of [3.0, 2.67].
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    lines = readme.splitlines()
    first = lines.index('a = embstore.dask.from_store("/local/run17")')
    last = next(i for i in range(first, len(lines)) if lines[i].startswith("mean3 = "))
    recipe = "\n".join(lines[first:last + 1])
    store = str(tmp_path / dtype)
    with embstore.Writer(store, dim=2, dtype=dtype) as w:
        w.append([1, 2, 3], np.array([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]], np.float32), 3)
        w.append([1], np.array([[100.0, 100.0]], np.float32), 4)
    names = {"np": np, "embstore": embstore}
    exec(recipe.replace("/local/run17", store), names)
    assert names["mean3"].tolist() == [3.0, 8 / 3]


def test_a_relative_path_through_a_link_and_dotdot_reads_the_store_the_kernel_finds(
        tmp_path, client, monkeypatch):
    # "link/../s" goes through the link's target's parent, where the store is; os.path.abspath,
    # which from_store applied, took it lexically to tmp_path/s (none there).
    (tmp_path / "real" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "real" / "sub", tmp_path / "link")
    with embstore.Writer(str(tmp_path / "real" / "s"), dim=2) as w:
        w.append(np.arange(5), np.ones((5, 2), np.float32))
    monkeypatch.chdir(tmp_path)
    a = embstore.dask.from_store(os.path.join("link", "..", "s"))
    assert a.vectors.sum().compute() == 10


def test_unique_on_a_cluster_gives_the_epoch_mean_of_the_rows_stored_once(tmp_path, client):
    path = str(tmp_path / "s")
    _with_duplicates(path)
    r = embstore.Reader(path)
    kept = _latest_rows(r.keys, r.epochs)
    a = embstore.dask.from_store(path, chunk_rows=2, unique=True)
    mask = (a.epochs == 0)[:, None]
    mean0 = client.compute((a.vectors * mask).sum(0, dtype="float64") / mask.sum(), sync=True)
    rows = r.vectors[kept][r.epochs[kept] == 0]
    np.testing.assert_allclose(mean0, rows.astype(np.float64).mean(0))
