"""Time, cost and failures of a training run, and the compute-optimal trade between model and data.

Sources:
- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla, arXiv 2203.15556):
  about 20 training tokens per parameter; compute C = 6 N D.
- Bi et al. 2024, "DeepSeek LLM" (arXiv 2401.02954), eq. 1: the batch size that minimises loss at
  compute C is about 0.292 C^0.3271 tokens.
- Young 1974, "A first order approximation to the optimum checkpoint interval" (CACM 17(9)), and
  Daly 2006, "A higher order estimate of the optimum checkpoint interval for restart dumps"
  (FGCS 22(3)): tau = sqrt(2 C M) (1 + sqrt(C / 2M) / 3 + (C / 2M) / 9) - C for C < 2M.
- Llama 3 (Dubey et al. 2024, arXiv 2407.21783, section 3.3.4): 466 job interruptions in a 54-day
  snapshot on 16,384 H100 GPUs; the default failure rate is that figure per GPU-hour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CHINCHILLA_TOKENS_PER_PARAM = 20
LLAMA3_FAILURES_PER_GPU_HOUR = 466 / (16_384 * 54 * 24)  # ~2.2e-5: one interruption per ~46,000 GPU-hours
DEFAULT_CHECKPOINT_SECONDS = 60.0  # a sharded, mostly asynchronous DCP save; measure yours
DEFAULT_RESTART_SECONDS = 600.0  # detect the failure, reschedule, reload the checkpoint, warm up


def chinchilla_tokens(params: float) -> float:
    """Compute-optimal training tokens for a model of `params` parameters (about 20 per parameter)."""
    return CHINCHILLA_TOKENS_PER_PARAM * params


def compute_optimal_params(flops: float) -> float:
    """The largest compute-optimal model for a budget: C = 6 N D with D = 20 N gives N = sqrt(C / 120)."""
    return math.sqrt(flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))


def optimal_batch_tokens(flops: float) -> float:
    """DeepSeek LLM's fit of the loss-minimising batch size (tokens) at a compute budget."""
    return 0.292 * flops**0.3271


def checkpoint_interval(checkpoint_seconds: float, mtbf_seconds: float) -> float:
    """Seconds of training between checkpoints that minimise expected lost time (Young/Daly)."""
    c, m = checkpoint_seconds, mtbf_seconds
    if c >= 2 * m:
        return m
    ratio = c / (2 * m)
    return math.sqrt(2 * c * m) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - c


@dataclass(frozen=True)
class Reliability:
    """What failures cost a run: how often, how often to checkpoint, and the useful share of the time."""

    failures_per_gpu_hour: float
    checkpoint_seconds: float
    restart_seconds: float
    gpus: int

    @property
    def mtbf_seconds(self) -> float:
        """Mean time between interruptions of the whole job."""
        rate = self.failures_per_gpu_hour * self.gpus
        return math.inf if rate == 0 else 3600 / rate

    @property
    def interval_seconds(self) -> float:
        """Training seconds between checkpoints."""
        if math.isinf(self.mtbf_seconds):
            return math.inf
        return checkpoint_interval(self.checkpoint_seconds, self.mtbf_seconds)

    @property
    def goodput(self) -> float:
        """Share of wall-clock time spent on training that is kept.

        Each interval of tau training seconds pays a checkpoint of C; each failure (rate 1/M) loses a
        restart R and on average half an interval with its checkpoint.
        """
        if math.isinf(self.mtbf_seconds):
            return 1.0
        tau, c = self.interval_seconds, self.checkpoint_seconds
        lost = (self.restart_seconds + (tau + c) / 2) / self.mtbf_seconds
        return max(0.0, tau / (tau + c) * (1 - lost))

    def interruptions(self, wall_seconds: float) -> float:
        """Expected interruptions over `wall_seconds` of running."""
        return self.failures_per_gpu_hour * self.gpus * wall_seconds / 3600


@dataclass(frozen=True)
class Schedule:
    """How long a run takes and what it costs, failures included."""

    tokens: float
    flops: float
    tokens_per_second: float
    gpus: int
    reliability: Reliability
    price_per_gpu_hour: float | None = None

    @property
    def compute_seconds(self) -> float:
        """Time with no failure and no checkpoint."""
        return self.tokens / self.tokens_per_second

    @property
    def wall_seconds(self) -> float:
        """Time including checkpoints, restarts and lost work."""
        goodput = self.reliability.goodput
        return math.inf if goodput == 0 else self.compute_seconds / goodput

    @property
    def days(self) -> float:
        return self.wall_seconds / 86400

    @property
    def gpu_hours(self) -> float:
        return self.wall_seconds * self.gpus / 3600

    @property
    def cost(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    @property
    def interruptions(self) -> float:
        return self.reliability.interruptions(self.wall_seconds)

    def as_dict(self) -> dict:
        """Plain data for --json."""
        r = self.reliability
        return {"tokens": self.tokens, "flops": self.flops, "tokens_per_second": self.tokens_per_second,
                "compute_days": self.compute_seconds / 86400, "wall_days": self.days, "gpu_hours": self.gpu_hours,
                "price_per_gpu_hour": self.price_per_gpu_hour, "cost": self.cost,
                "failures_per_gpu_hour": r.failures_per_gpu_hour, "mtbf_hours": r.mtbf_seconds / 3600,
                "expected_interruptions": self.interruptions, "checkpoint_seconds": r.checkpoint_seconds,
                "checkpoint_interval_minutes": r.interval_seconds / 60, "restart_seconds": r.restart_seconds,
                "goodput": r.goodput}
