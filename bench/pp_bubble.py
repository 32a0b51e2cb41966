"""Benchmark: the pipeline bubble torch's schedules leave, measured, beside the planner's prediction.

    .venv/bin/python bench/pp_bubble.py [--stages 4] [--microbatches 4 8 16] [--forward-ms 8] [--steps 3]

Four processes on gloo run the trainer's schedules (murmur.train.pipeline: 1F1B, and Interleaved1F1B with
two stages per rank) over stages whose work is a timed wait: forward f, backward 2f per micro-batch and
rank (split over its interleaved stages). A wait needs no core, so two shared cores time the schedule
itself, not the contention of four processes for them. Per rank, busy time = micro-batches × 3f; the
bubble = 1 - busy / step time (median of the timed steps, averaged over ranks), which also counts what
the schedule spends on sending activations and its own bookkeeping. The planner predicts
(pp - 1)/v idle slots over m + (pp - 1)/v (murmur.plan.search.bubble_fraction).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from murmur.plan.search import bubble_fraction

SCHEDULES = (("1F1B", 1), ("Interleaved1F1B", 2))


class TimedWork(torch.autograd.Function):
    """Identity whose forward waits `seconds` and whose backward waits twice as long."""

    @staticmethod
    def forward(ctx, x, weight, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad.contiguous(), grad.sum().reshape(1), None  # a sum's gradient is an expanded view


class Stage(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seconds = seconds

    def forward(self, x):
        return TimedWork.apply(x, self.weight, self.seconds)


def _run(rank: int, world: int, port: int, args, results) -> None:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    forward = args.forward_ms / 1000
    for name, virtual in SCHEDULES:
        for m in args.microbatches:
            total = world * virtual
            ids = [rank + i * world for i in range(virtual)]
            stages = [PipelineStage(Stage(forward / virtual), sid, total, torch.device("cpu")) for sid in ids]
            cls = get_schedule_class(name)
            loss = lambda out, target: out.sum()  # noqa: E731
            schedule = (cls(stages[0], n_microbatches=m, loss_fn=loss, scale_grads=False)
                        if issubclass(cls, PipelineScheduleSingle) else
                        cls(stages, n_microbatches=m, loss_fn=loss, scale_grads=False))
            x, target = torch.ones(m, 4), torch.zeros(m, 4)
            times = []
            for step in range(args.steps + 1):  # the first step also infers shapes: not timed
                dist.barrier()
                start = time.perf_counter()
                if rank == 0:
                    schedule.step(x, target=target)
                else:
                    schedule.step(target=target)
                if step:
                    times.append(time.perf_counter() - start)
            step_time = statistics.median(times)
            measured = 1 - m * 3 * forward / step_time
            gathered = [None] * world
            dist.all_gather_object(gathered, (step_time, measured))
            if rank == 0:
                results.append((name, virtual, m, statistics.mean(t for t, _ in gathered),
                                statistics.mean(b for _, b in gathered), bubble_fraction(world, virtual, m)))
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank, world, port, args, queue):
    results: list = []
    _run(rank, world, port, args, results)
    if rank == 0:
        queue.put(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4, help="pipeline ranks (processes)")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--forward-ms", type=float, default=8.0, help="forward time per micro-batch and rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (after one untimed)")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(args.stages, port, args, queue), nprocs=args.stages, join=True)
    rows = queue.get()
    print(f"{args.stages} stages per pipeline, forward {args.forward_ms:g} ms + backward {2 * args.forward_ms:g} ms "
          "per micro-batch and rank (timed waits), gloo on CPU")
    print(f"{'schedule':>16} {'v':>2} {'micro-batches':>13} {'step ms':>8} {'measured':>9} {'predicted':>9} "
          f"{'ratio':>6}")
    for name, virtual, m, step_time, measured, predicted in rows:
        print(f"{name:>16} {virtual:>2} {m:>13} {step_time * 1000:>8.1f} {measured:>9.1%} {predicted:>9.1%} "
              f"{measured / predicted:>6.2f}")


if __name__ == "__main__":
    main()
