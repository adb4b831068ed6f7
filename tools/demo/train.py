"""One rank of the demo's training job (torch.distributed, gloo, CPU).

Trains on its share of the training set and, through embstore.torch.EmbeddingRecorder, saves the
penultimate layer's output for every training sample (during the training step) and every
held-out sample (in an eval pass) of every epoch, into the one store all ranks share.
Then measures the training-step time with and without saving (adjacent blocks of steps in random
order, same model), in wall time and in the process's CPU time.
Writes its figures to <run>/rank<R>.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from embstore.torch import EmbeddingRecorder  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bench-blocks", type=int, default=40)
    parser.add_argument("--block-steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 ranks on 2 cores: one intra-op thread each
    dist.init_process_group("gloo", init_method=f"file://{args.run}/rendezvous",
                            rank=args.rank, world_size=args.world)
    rank, world = dist.get_rank(), dist.get_world_size()

    data = np.load(os.path.join(args.run, "digits.npz"))
    images = torch.from_numpy(data["images"]).float().unsqueeze(1) / 16.0
    labels = torch.from_numpy(data["labels"]).long()
    train_ids, heldout_ids = common.split(len(labels))
    my_heldout = torch.from_numpy(heldout_ids[rank::world])

    model = DDP(common.make_model())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    store = os.path.join(args.run, "digits.emb")
    recorder = EmbeddingRecorder(model, "embed", store, async_queue_mb=32)
    recorder.writer()  # opened up front, so no step pays for opening the store

    def step(ids, record_epoch=None, rec=recorder):
        x, y = images[ids], labels[ids]
        start = time.perf_counter()
        if record_epoch is None:
            loss = loss_fn(model(x), y)
        else:
            with rec.batch(ids, record_epoch):
                loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start, float(loss)

    step_times, hook_times = [], []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        g = torch.Generator().manual_seed(1000 + epoch)  # same permutation on every rank
        order = torch.from_numpy(train_ids)[torch.randperm(len(train_ids), generator=g)]
        mine = order[rank::world]
        model.train()
        losses = []
        for b in range(0, len(mine), args.batch):
            hook_before = recorder.hook_seconds
            seconds, loss = step(mine[b:b + args.batch], epoch)
            step_times.append(seconds)
            hook_times.append(recorder.hook_seconds - hook_before)
            losses.append(loss)
        model.eval()
        with torch.no_grad(), recorder.batch(my_heldout, epoch):
            correct = (model(images[my_heldout]).argmax(1) == labels[my_heldout]).sum()
        recorder.flush(wait=False)  # this epoch's staged rows go to the store now
        stats = torch.tensor([float(np.mean(losses)), float(correct)])
        dist.all_reduce(stats)
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{args.epochs}: loss {stats[0] / world:.3f}, "
                  f"held-out accuracy (classifier) {100 * stats[1] / len(heldout_ids):.1f}%, "
                  f"{time.perf_counter() - epoch_start:.2f} s, "
                  f"{len(labels)} embeddings saved by {world} ranks", flush=True)
    recorder.close()  # flushes: every row is committed when this returns
    train_seconds = time.perf_counter() - t0
    write = recorder.stats()

    # Overhead: the same training step with and without saving, interleaved so that drift in
    # the machine's load affects both alike. Saves go to a scratch store (epoch numbers of the
    # real store stay meaningful for the reader).
    bench = EmbeddingRecorder(model, "embed", os.path.join(args.run, "overhead.emb"),
                              dim=common.EMBED_DIM, async_queue_mb=32)
    bench.writer()  # opened up front, so no step pays for opening the store
    # Blocks of steps rather than single steps, so that a saving step's background write
    # (which may run during the next step) is charged to its own block.
    model.train()
    g = torch.Generator().manual_seed(7)
    # Per pair: mean wall seconds per step with saving, without; mean CPU seconds, with, without.
    pairs = []
    for _ in range(args.bench_blocks):
        save_first = bool(torch.randint(2, (1,), generator=g))
        block = {}
        for saving in (save_first, not save_first):
            seconds = []
            cpu_start = time.process_time()  # all threads of this process, the writer's too
            for _ in range(args.block_steps):
                ids = torch.from_numpy(train_ids)[torch.randint(len(train_ids), (args.batch,),
                                                                  generator=g)]
                seconds.append(step(ids, 0 if saving else None, bench)[0])
            cpu = (time.process_time() - cpu_start) / args.block_steps
            block[saving] = (float(np.mean(seconds)), cpu)
        pairs.append((block[True][0], block[False][0], block[True][1], block[False][1]))
    bench.flush()
    result = {
        "rank": rank, "train_seconds": train_seconds, "steps": len(step_times),
        "step_seconds": step_times, "block_steps": args.block_steps,
        "hook_seconds_per_step": hook_times,
        "bench_pairs": pairs,
        "write": write,
    }
    bench.close()
    with open(os.path.join(args.run, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
