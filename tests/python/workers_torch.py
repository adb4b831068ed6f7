"""Torch child-process entry points for the tests (importable by torch.multiprocessing)."""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from embstore.torch import EmbeddingRecorder


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
    dist.destroy_process_group()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(x))
