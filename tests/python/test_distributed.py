"""The recorder under torch.distributed: 2 real processes (gloo, CPU), one store."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

import embstore  # noqa: E402
import workers_torch  # noqa: E402


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ddp_ranks_record_into_one_store(tmp_path):
    store = str(tmp_path / "store")
    tmp.spawn(workers_torch.ddp_rank, args=(2, str(tmp_path), store), nprocs=2, join=True)
    r = embstore.Reader(store)
    # Rank r trains on ids r, r+2, ...; every id of 0..63 recorded once per epoch.
    assert len(r) == 2 * 64 + 32
    keys, epochs = r.keys.astype(np.int64), r.epochs.astype(np.int64)
    for epoch in (0, 1):
        assert sorted(keys[epochs == epoch].tolist()) == list(range(64))
    # The held-out pass was recorded on rank 1 only (ranks=[1]): its odd ids, epoch 9.
    assert sorted(keys[epochs == 9].tolist()) == list(range(1, 64, 2))
    assert r.verify().ok and r.metadata == {"module": "encoder"}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_end_epoch_fails_on_every_rank_when_one_ranks_part_fails(tmp_path):
    # Rank 1's pending rows cannot be written (its Writer was closed under the recorder): it
    # raises that error, and rank 0 learns it in the same collective instead of waiting for
    # rank 1 in the next one (until the group's timeout, or for ever with NCCL).
    tmp.spawn(workers_torch.end_epoch_with_a_failing_rank, args=(2, str(tmp_path)), nprocs=2,
              join=True)
    raised = [(tmp_path / f"raised-{rank}").read_text() for rank in (0, 1)]
    assert raised[1].startswith("ClosedError: "), raised
    assert raised[0].startswith("RuntimeError: "), raised
    assert f"{tmp_path / 'run'}: end_epoch() failed on rank 1: {raised[1]}" in raised[0], raised
    # Rank 0's part was done: its rows are stored, in its node's store.
    assert len(embstore.Reader(str(tmp_path / "run" / "node-0"))) == 8


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_recorder_given_the_dataset_length_skips_distributed_sampler_padding(tmp_path):
    store = str(tmp_path / "store")
    # 10 samples over 3 ranks: DistributedSampler pads each epoch to 12 with 2 repeats.
    tmp.spawn(workers_torch.padded_epochs_rank, args=(3, str(tmp_path), store, 10), nprocs=3,
              join=True)
    r = embstore.Reader(store)
    keys, epochs = r.keys.astype(np.int64), r.epochs.astype(np.int64)
    assert len(r) == 20
    for epoch in (0, 1):
        assert sorted(keys[epochs == epoch].tolist()) == list(range(10))


def rendezvous(tmp_path):
    """A new file rendezvous for a process group: a free TCP port looked up here could be taken
    by another program before rank 0 binds it."""
    rendezvous.count = getattr(rendezvous, "count", 0) + 1
    return f"file://{tmp_path}/rendezvous-{rendezvous.count}"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_four_ranks_on_two_nodes_write_per_node_stores_and_a_manifest(tmp_path):
    import shutil
    import workers_shards
    from embstore import shards as es
    disks = [str(tmp_path / "disk-a"), str(tmp_path / "disk-b")]  # each node's local disk
    tmp.spawn(workers_shards.node_rank, args=(4, rendezvous(tmp_path), disks, 3), nprocs=4,
              join=True)
    assert sorted(os.listdir(disks[0])) == ["manifest.json", "node-0"]
    assert os.listdir(disks[1]) == ["node-1"]
    manifest = es.read_manifest(os.path.join(disks[0], "manifest.json"))
    assert [(s["path"], s["rows"], s["epochs"]) for s in manifest["shards"]] == [
        ("node-0", 96, [0, 1, 2]), ("node-1", 96, [0, 1, 2])]
    assert manifest["dim"] == 16 and manifest["metadata"] == '{"module": "encoder"}'
    # node-1's store is still on the other node's disk.
    with pytest.raises(FileNotFoundError, match="'node-1' is missing"):
        embstore.ShardSet(disks[0])
    shutil.copytree(os.path.join(disks[1], "node-1"), os.path.join(disks[0], "node-1"))
    s = embstore.ShardSet(disks[0])
    assert len(s) == 192 and s.verify()
    keys, epochs = s.keys.astype(np.int64), s.epochs.astype(np.int64)
    for epoch in range(3):  # every sample once per epoch; node 0 has ids 0, 1 mod 4
        assert sorted(keys[epochs == epoch].tolist()) == list(range(64))
        assert sorted(keys[s.epoch_rows(epoch)].tolist()) == list(range(64))
    assert set(s.shards[0].keys.astype(np.int64) % 4) == {0, 1}
    for key in (0, 5, 63):
        assert [e for _, e in s.history(key)] == [0, 1, 2]
        assert s.find(key) == s.history(key)[-1][0]
    info = embstore.merge(tmp_path / "merged", disks[0])
    r = embstore.Reader(tmp_path / "merged")
    assert info["committed_rows"] == len(r) == len(s) and r.verify().ok
    # Row for row the ShardSet's in epoch order (each node's shard in epoch order already): same
    # vector, key and epoch; the merged store's latest row of a key is the set's.
    order = np.argsort(s.epochs, kind="stable")
    for row in range(len(s)):
        shard, local = s.locate(int(order[row]))
        assert np.array_equal(r.vectors[row], s.shards[shard].vectors[local])
    assert np.array_equal(r.keys, s.keys[order]) and np.array_equal(r.epochs, s.epochs[order])
    for key in (0, 5, 63):
        assert r.epochs[r.find(key)] == 2 and s.epochs[s.find(key)] == 2


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_a_rank_waiting_in_a_collective_ends_at_one_sigterm_with_its_rows_written(tmp_path):
    """A spawned rank waiting in end_epoch()'s all_gather for a peer that never comes, sent one
    SIGTERM (spawn's join, a Pool, a scheduler): gloo retries the wait on EINTR, so Python's
    handler never ran and the rank lived until the collective's timeout (30 minutes), where the
    default action ended it at once. Now the relay thread writes its rows and ends it after its
    nudges (about 5 s)."""
    import signal
    import time
    ready = str(tmp_path / "ready")
    context = tmp.spawn(workers_torch.rank_waiting_in_a_collective,
                        args=(2, rendezvous(tmp_path), str(tmp_path), ready), nprocs=2, join=False)
    waiting, sleeping = context.processes
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(ready)
        time.sleep(1)  # inside the all_gather
        os.kill(waiting.pid, signal.SIGTERM)
        waiting.join(timeout=30)
        assert not waiting.is_alive(), "rank 0 still waits in its collective 30 s after SIGTERM"
        assert waiting.exitcode == 0  # a multiprocessing child, as at any SIGTERM (test_exit.py)
    finally:
        for process in (waiting, sleeping):
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join()
    r = embstore.Reader(str(tmp_path / "node-0"))
    assert sorted(r.keys.astype(np.int64).tolist()) == list(range(40))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_a_torchrun_worker_ended_by_its_agent_writes_the_rows_it_held(tmp_path):
    """torchrun: rank 1 fails, and the agent sends rank 0 SIGTERM. Only multiprocessing children
    had SIGTERM write what they held: rank 0's staged rows were lost without a word. Now they
    are written, and the worker ends with status 143 (128 + SIGTERM), not 0, which the agent
    would take for a worker that finished."""
    import subprocess
    import sys
    script = tmp_path / "worker.py"
    script.write_text(workers_torch.TORCHRUN_WORKER)
    store, ready = str(tmp_path / "store"), str(tmp_path / "ready")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --redirects/--tee 2: the workers' stderr, teed into torchrun's (this torch's parser turns
    # "0" and "3" into nothing and fails).
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
         "--nproc_per_node=2", "--master_addr=127.0.0.1", "--redirects", "2", "--tee", "2",
         str(script), store, ready],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "rank 1 fails" in run.stderr, run.stderr[-3000:]
    assert "closing signal SIGTERM" in run.stderr, run.stderr[-3000:]
    r = embstore.Reader(store)
    assert sorted(r.keys.astype(np.int64).tolist()) == list(range(40))


def test_a_launchers_rank_counts_without_a_process_group(tmp_path, monkeypatch):
    """torchrun's environment (RANK, WORLD_SIZE, GROUP_RANK) in a job that never calls
    init_process_group (an inference-only extraction): every process was rank 0, ``ranks=[1]``
    recorded nothing, and each node's rank 0 wrote a manifest of its own node only, so the
    gathered run read as half its rows without a word. The recorder takes the launcher's rank,
    and end_epoch() with per_node refuses to write a manifest it cannot make whole (after
    storing and syncing this rank's rows)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "1")
    model = torch.nn.Linear(4, 4)
    from embstore.torch import EmbeddingRecorder
    only_rank_0 = EmbeddingRecorder(model, "", str(tmp_path), dim=4, per_node=True, ranks=[0])
    assert only_rank_0.rank == 1 and not only_rank_0.enabled
    only_rank_0.close()
    recorder = EmbeddingRecorder(model, "", str(tmp_path), dim=4, per_node=True, ranks=[1])
    assert recorder.rank == 1 and recorder.enabled
    with recorder.batch(torch.arange(8), 0):
        model(torch.randn(8, 4))
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .rank 1. but torch.distributed has no "
                                           "process group"):
        recorder.end_epoch()
    recorder.close()
    assert not os.path.exists(tmp_path / "manifest.json")
    r = embstore.Reader(str(tmp_path / "node-1"))
    assert r.keys.tolist() == list(range(8)) and r.info(key_stats=False)["durable_rows"] == 8
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="environment variable RANK='one' is not an integer"):
        EmbeddingRecorder(model, "", str(tmp_path), dim=4, per_node=True).rank
    # A rank without a world size, or outside it, would mark real samples as padding
    # (dataset_len): RANK=3 alone read as rank 3 of 1.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="RANK='3' and WORLD_SIZE=None: a launcher sets both"):
        EmbeddingRecorder(model, "", str(tmp_path), dim=4, per_node=True).rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="with 0 <= RANK < WORLD_SIZE"):
        EmbeddingRecorder(model, "", str(tmp_path), dim=4, per_node=True).rank


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_a_second_sigterm_kills_a_rank_whose_rows_the_relay_thread_is_writing(tmp_path):
    """The relay thread writes a stuck rank's rows (above), and that takes long (this process
    holds the store's lock): a second SIGTERM more than 5 s after the first (one sooner is the
    same request delivered twice) kills at once, as it does once Python's handler has run. It
    reached the relay's handler instead, which nobody acted on until the 30 s deadline; then,
    counted from the relay thread's act (5 s of nudges after the first), it was ignored."""
    import fcntl
    import signal
    import time
    ready = str(tmp_path / "ready")
    context = tmp.spawn(workers_torch.rank_waiting_in_a_collective,
                        args=(2, rendezvous(tmp_path), str(tmp_path), ready, True), nprocs=2,
                        join=False)
    waiting, sleeping = context.processes
    fd = None
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(ready)
        fd = os.open(str(tmp_path / "node-0" / "lock"), os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)  # the Writer's close waits for it
        time.sleep(1)  # inside the all_gather
        os.kill(waiting.pid, signal.SIGTERM)
        time.sleep(7)  # past the nudges: the relay thread is writing, held up by the lock
        assert waiting.is_alive()
        os.kill(waiting.pid, signal.SIGTERM)
        waiting.join(timeout=10)
        assert not waiting.is_alive(), "a second SIGTERM did not end the rank within 10 s"
        assert waiting.exitcode == -signal.SIGTERM
    finally:
        if fd is not None:
            os.close(fd)
        for process in (waiting, sleeping):
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join()
