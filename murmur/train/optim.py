"""Optimizers and learning-rate schedules.

AdamW (fused on CUDA, foreach on CPU) with weight decay on matrices only; or Muon for the
hidden matrices (attention and MLP projections) with AdamW for embeddings, head, norms and
biases, as modded-nanogpt and nanochat use it. The schedule is a multiplier of each group's
base learning rate: linear warmup, then cosine, warmup-stable-decay, or constant.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from murmur.settings.train import TrainSettings

# Coefficients of the quintic Newton-Schulz iteration that maps a matrix near its orthogonal factor
# (Keller Jordan's choice: it converges fast to singular values in roughly [0.7, 1.2], good enough).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: Tensor, steps: int = 5) -> Tensor:
    """An approximation of U V^T for matrix = U S V^T, by Newton-Schulz iterations (bfloat16 on GPU)."""
    a, b, c = _NS_COEFFS
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)  # CPUs have no fast bf16 matmul
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update for each matrix is orthogonalised (MomentUm Orthogonalized by Newton-Schulz).

    Sharded (DTensor) parameters are gathered for the orthogonalisation and the update is sliced back,
    so it works under FSDP2 and TP; every rank computes the same full update.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = _orthogonal_update(update, group["ns_steps"])
                rows, cols = p.shape[0], p.shape[1]
                scale = max(1.0, rows / cols) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def _orthogonal_update(update: Tensor, steps: int) -> Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(update, DTensor):
        full = orthogonalize(update.full_tensor(), steps)
        return distribute_tensor(full, update.device_mesh, update.placements)
    return orthogonalize(update, steps)


def _is_hidden_matrix(name: str, param: Tensor) -> bool:
    return param.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name


def build_optimizers(model: nn.Module, settings: TrainSettings, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizers of a run (one, or Muon + AdamW). Each group keeps its base lr in `initial_lr`."""
    unique = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a tied weight comes once
    adam_kwargs = dict(betas=(settings.beta1, settings.beta2), eps=1e-8)
    is_dtensor = any(type(p).__name__ == "DTensor" for _, p in unique)
    if device_type == "cuda":
        adam_kwargs["fused"] = True
    elif not is_dtensor:
        adam_kwargs["foreach"] = True
    optimizers: list[torch.optim.Optimizer] = []
    if settings.optimizer == "muon":
        hidden = [p for n, p in unique if _is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in unique if not _is_hidden_matrix(n, p)]
        optimizers.append(Muon([{"params": hidden, "lr": settings.muon_lr, "initial_lr": settings.muon_lr}],
                               lr=settings.muon_lr, momentum=settings.muon_momentum,
                               weight_decay=settings.weight_decay))
    else:
        rest = unique
    decay = [p for _, p in rest if p.ndim >= 2]
    no_decay = [p for _, p in rest if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay, "lr": settings.lr, "initial_lr": settings.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": settings.lr, "initial_lr": settings.lr}]
    optimizers.append(torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, **adam_kwargs))
    return optimizers


def lr_multiplier(step: int, settings: TrainSettings) -> float:
    """The schedule's factor on the base learning rate for optimizer step `step` (0-based)."""
    total, warmup = settings.steps, min(settings.warmup_steps, settings.steps)
    floor = settings.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if settings.schedule == "constant":
        return 1.0
    if settings.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of the steps.
    decay_start = total - int(round(settings.decay_fraction * total))
    if step < max(decay_start, warmup):
        return 1.0
    progress = (step - decay_start) / max(1, total - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)


def set_learning_rate(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    """Scale every group's base learning rate by the schedule's multiplier."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
