"""Benchmark: the planner's layout search against an exhaustive enumeration of the same space, in one run.

    .venv/bin/python bench/plan_search.py [--repeats 5]

Murmur:    murmur.plan.search.search — enumerates tp x pp x checkpointing x micro-batch x dp_shard x reshard,
           stopping the micro-batch loop at the first size no dp_shard fits.
Reference: itertools.product over the same degrees with no pruning, each layout through the same memory and
           cost functions (what a planner written the plain way does).
Both must agree on the fastest layout. Times are process CPU seconds (robust on a shared machine); prints
medians over the repeats and the ratio reference / Murmur, for 1,024, 10,000 and 16,384 H100s.
"""

from __future__ import annotations


import argparse
import itertools
import statistics
import time

from murmur.plan.gpus import get_gpu
from murmur.plan.memory import Layout, ModelFacts, estimate_memory
from murmur.plan.search import (MAX_MICRO_BATCH, CostModel, divisors, pipeline_degrees, search,
                                tensor_parallel_degrees, virtual_stages)
from murmur.settings.model import ModelSettings


def exhaustive(facts, gpu, world, per_node, efficiency, target):
    """Every layout, no pruning; the fastest that fits."""
    cost = CostModel(facts, gpu, per_node, efficiency)
    best, tried = None, 0
    mbs_options = [2**i for i in range(MAX_MICRO_BATCH.bit_length())]
    for tp in tensor_parallel_degrees(facts, per_node):
        for pp in pipeline_degrees(facts, world, tp, per_node):
            dp = world // (tp * pp)
            for ac, mbs, dp_shard, reshard in itertools.product(("none", "full"), mbs_options, divisors(dp),
                                                                (True, False)):
                tokens = mbs * facts.seq_len
                if (mbs > 1 and dp * tokens * pp > target) or (dp_shard == 1 and not reshard):
                    continue
                m = max(pp, max(1, round(target / (dp * tokens))))
                virtual = virtual_stages(facts, pp, m)
                layout = Layout(dp // dp_shard, dp_shard, tp, pp, mbs, ac, virtual, reshard)
                tried += 1
                mem = estimate_memory(facts, layout, microbatches=m)
                if mem.total > gpu.memory_bytes:
                    continue
                cand = cost.candidate(layout, m, mem)
                if best is None or round(cand.tokens_per_second, 6) > round(best.tokens_per_second, 6):
                    best = cand
    return best, tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gpu = get_gpu("h100")
    target = 16 * 2**20
    print(f"{'model':>6} {'GPUs':>6} {'murmur s':>9} {'layouts':>8} {'reference s':>11} {'layouts':>8} "
          f"{'ratio':>6}  same best")
    for preset, world in (("8b", 1024), ("70b", 10000), ("405b", 16384)):
        facts = ModelFacts(ModelSettings(preset=preset), 8192)
        ours, ref = [], []
        for _ in range(args.repeats):
            start = time.process_time()
            result = search(facts, gpu, world, 8, 0.5, None, target)
            ours.append(time.process_time() - start)
            start = time.process_time()
            best, tried = exhaustive(facts, gpu, world, 8, 0.5, target)
            ref.append(time.process_time() - start)
        same = abs(best.tokens_per_second - result.best.tokens_per_second) < 1e-6 * best.tokens_per_second
        a, b = statistics.median(ours), statistics.median(ref)
        print(f"{preset:>6} {world:>6} {a:>9.4f} {result.tried:>8} {b:>11.4f} {tried:>8} {b / a:>6.1f}  {same}")


if __name__ == "__main__":
    main()
