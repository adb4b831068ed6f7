"""Entry point of the 4-rank test in test_distributed.py: ranks on 2 simulated nodes."""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from embstore.torch import EmbeddingRecorder
from workers_torch import Net, leave_process_group


def node_rank(rank, world, init_method, node_dirs, epochs):
    """Rank `rank` of `world`, on node rank // 2 with its own "local disk" node_dirs[node], as
    torchrun would start it (GROUP_RANK, LOCAL_RANK)."""
    node = rank // 2
    os.environ.update(GROUP_RANK=str(node), LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = DDP(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    mine = torch.arange(rank, 64, world)
    recorder = EmbeddingRecorder(model, "encoder", node_dirs[node], dim=16, per_node=True,
                                 buffer_rows=12)
    for epoch in range(epochs):
        for b in range(0, len(mine), 8):
            ids = mine[b:b + 8]
            with recorder.batch(ids, epoch):
                loss = torch.nn.functional.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
        recorder.end_epoch()
    recorder.close()
    scope = {"model": model, "opt": opt, "recorder": recorder}
    del model, opt, recorder
    leave_process_group(scope)
