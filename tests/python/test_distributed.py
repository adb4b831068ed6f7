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


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_four_ranks_on_two_nodes_write_per_node_stores_and_a_manifest(tmp_path):
    import shutil
    import workers_shards
    from embstore import shards as es
    disks = [str(tmp_path / "disk-a"), str(tmp_path / "disk-b")]  # each node's local disk
    tmp.spawn(workers_shards.node_rank, args=(4, free_port(), disks, 3), nprocs=4, join=True)
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
    for row in range(len(s)):  # row for row: same vector, key and epoch
        shard, local = s.locate(row)
        assert np.array_equal(r.vectors[row], s.shards[shard].vectors[local])
    assert np.array_equal(r.keys, s.keys) and np.array_equal(r.epochs, s.epochs)
