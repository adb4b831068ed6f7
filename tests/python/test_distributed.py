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
