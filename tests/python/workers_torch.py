"""Torch child-process entry points for the tests (importable by torch.multiprocessing)."""
import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from embstore.torch import EmbeddingRecorder


def leave_process_group(scope):
    """Ends a DDP rank: every rank finishes its collectives (barrier), the DDP model and what
    holds it (the names in `scope`, a dict the caller clears) go while the process group is still
    registered, then the group is destroyed. If the DDP model's reducer held the last reference
    to a gloo group at interpreter exit, torch 1.13 could deadlock there: the group's destructor
    waits, holding the GIL, for a gloo thread that needs the GIL to free a tensor (seen once in
    test_four_ranks_on_two_nodes_write_per_node_stores_and_a_manifest, a rank spinning at exit)."""
    dist.barrier()
    scope.clear()
    gc.collect()
    dist.destroy_process_group()


def ddp_rank(rank, world, run_dir, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(run_dir, 'rdv')}",
                            rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DDP(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    mine = torch.arange(rank, 64, world)
    recorder = EmbeddingRecorder(model, "encoder", store, dim=16, buffer_rows=24)
    for epoch in range(2):
        for b in range(0, len(mine), 8):
            ids = mine[b:b + 8]
            with recorder.batch(ids, epoch):
                loss = torch.nn.functional.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
    recorder.close()
    heldout = EmbeddingRecorder(model, "encoder", store, ranks=[1])
    with torch.no_grad(), heldout.batch(mine, 9):
        model(x[mine])
    heldout.close()
    scope = {"model": model, "opt": opt, "recorder": recorder, "heldout": heldout}
    del model, opt, recorder, heldout
    leave_process_group(scope)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def record_without_close(recorder, model, first_key, batches, batch_rows):
    """Records batches through a recorder its parent made before fork, and returns without
    closing it (a multiprocessing child then leaves through os._exit)."""
    torch.set_num_threads(1)
    for b in range(batches):
        ids = torch.arange(first_key + b * batch_rows, first_key + (b + 1) * batch_rows)
        with torch.no_grad(), recorder.batch(ids, 0):
            model(ids.float()[:, None].expand(-1, 8))


def padded_epochs_rank(rank, world, run_dir, store, dataset_len):
    """Records two epochs of a DistributedSampler (which pads them) with dataset_len given."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(run_dir, 'rdv')}",
                            rank=rank, world_size=world)
    ids = torch.arange(dataset_len)
    sampler = torch.utils.data.DistributedSampler(ids, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(ids, batch_size=3, sampler=sampler)
    model = Net()
    recorder = EmbeddingRecorder(model, "encoder", store, dim=16, buffer_rows=4,
                                 dataset_len=dataset_len)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch_ids in loader:
            with torch.no_grad(), recorder.batch(batch_ids, epoch):
                model(batch_ids.float()[:, None].expand(-1, 8))
    recorder.close()
    dist.destroy_process_group()


def end_epoch_with_a_failing_rank(rank, world, run_dir):
    """Both ranks record a staged batch into per-node stores; rank 1's Writer is closed under its
    recorder, so its end_epoch() fails. Each rank writes what its end_epoch() raised (its type
    and message) to run_dir/raised-<rank>, and the rows it stored, then leaves the group."""
    import datetime
    os.environ.update(GROUP_RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(run_dir, 'rdv')}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    model = torch.nn.Linear(8, 16)
    recorder = EmbeddingRecorder(model, "", os.path.join(run_dir, "run"), dim=16, per_node=True,
                                 buffer_rows=1000, async_queue_mb=0)
    with torch.no_grad(), recorder.batch(torch.arange(rank * 8, rank * 8 + 8), 0):
        model(torch.randn(8, 8))
    if rank == 1:
        recorder.writer().close()  # its 8 staged rows can no longer be written
    try:
        recorder.end_epoch()
        raised = "nothing"
    except BaseException as error:  # noqa: B902 (written down for the test to check)
        raised = f"{type(error).__name__}: {error}"
    with open(os.path.join(run_dir, f"raised-{rank}"), "w") as f:
        f.write(raised)
    if rank == 0:
        recorder.close()
    dist.destroy_process_group()


def rank_waiting_in_a_collective(rank, world, init_method, run_dir, ready, flushed=False):
    """Rank 0 records 5 batches (staged: buffer_rows 1000), then waits in end_epoch()'s
    all_gather for rank 1, which never comes (it sleeps until killed). Rank 0 touches `ready`
    once it is about to enter the collective. With `flushed`, the first batch is appended
    (flush) into the node's store first, so that writing the rest at SIGTERM means closing that
    Writer, which a test can hold up with the store's lock."""
    os.environ.update(GROUP_RANK="0", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=world)
    model = torch.nn.Linear(8, 16)
    recorder = EmbeddingRecorder(model, "", run_dir, dim=16, per_node=True, buffer_rows=1000)
    if rank == 1:
        import time
        time.sleep(600)
    for b in range(5):
        with recorder.batch(torch.arange(b * 8, b * 8 + 8), 0):
            model(torch.randn(8, 8))
        if flushed and b == 0:
            recorder.flush()
    with open(ready, "w"):
        pass
    recorder.end_epoch()


# A torchrun worker (test_distributed.py): rank 0 records 5 batches into the staging buffer and
# then waits; rank 1 waits until rank 0 has said so, then fails, and torchrun's agent ends rank 0
# with SIGTERM.
TORCHRUN_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from embstore.torch import EmbeddingRecorder
store, ready = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
torch.set_num_threads(1)
model = torch.nn.Linear(8, 16)
recorder = EmbeddingRecorder(model, "", store, dim=16, buffer_rows=1000)
dist.barrier()
if rank == 0:
    for b in range(5):
        with recorder.batch(torch.arange(b * 8, b * 8 + 8), 0):
            model(torch.randn(8, 8))
    open(ready, "w").close()
    time.sleep(600)
while not os.path.exists(ready):
    time.sleep(0.05)
raise RuntimeError("rank 1 fails")
"""


class RecordingDataset(torch.utils.data.Dataset):
    """A dataset whose items pass through a model recorded by an EmbeddingRecorder in the
    DataLoader's workers (key: the item's index, epoch 0)."""

    def __init__(self, store, n):
        self.n = n
        self.model = torch.nn.Linear(8, 16)
        self.recorder = EmbeddingRecorder(self.model, "", store, dim=16)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with torch.no_grad(), self.recorder.batch([i], 0):
            self.model(torch.full((1, 8), float(i)))
        return i


class _StuckOnItsWayToTheCpu(torch.Tensor):
    """A module output whose move to the CPU blocks in native code for good (the GIL released,
    signals not interrupting it), as a GPU tensor's device-to-host copy does behind a hung
    collective of torch.distributed."""

    stuck = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.stuck and func in (torch.Tensor.to, torch.Tensor.copy_):
            import ctypes
            libc = ctypes.CDLL(None)
            mutex = ctypes.create_string_buffer(64)
            libc.pthread_mutex_init(mutex, None)
            libc.pthread_mutex_lock(mutex)
            libc.pthread_mutex_lock(mutex)  # never returns
        return super().__torch_function__(func, types, args, kwargs or {})


def record_then_get_stuck(store, ready):
    """Stages 100 rows in a recorder (buffer of 1,000), says so, then records a batch whose
    output never reaches the CPU."""
    model = torch.nn.Sequential(torch.nn.Identity())
    rec = EmbeddingRecorder(model, "0", store, dim=8, buffer_rows=1000)
    for i in range(10):
        with rec.batch(list(range(i * 10, i * 10 + 10)), 0):
            model(torch.ones(10, 8))
    ready.set()
    _StuckOnItsWayToTheCpu.stuck = True
    with rec.batch(list(range(100, 110)), 0):
        model(torch.ones(10, 8).as_subclass(_StuckOnItsWayToTheCpu))
