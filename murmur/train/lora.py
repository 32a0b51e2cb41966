"""LoRA: low-rank adapters trained on a frozen Transformer (Hu et al. 2021), laid out as PEFT lays them out.

    adapters = lora_settings(ts)            # from [sft] lora_*; None for full finetuning
    apply_lora(model, adapters)             # wraps the targets in place, freezes every other parameter
    merge_lora(model)                       # folds each adapter into its weight: a plain Transformer again
    save_peft_adapter(model, out_dir, base) # adapter_config.json + adapter_model.safetensors for `peft`

A wrapped projection stays an `nn.Linear` with its own `weight` and `bias` (the frozen base) and gains
`lora_A` (rank × in) and `lora_B` (out × rank); it computes base(x) + (alpha / rank) · B(A(dropout(x))).
Initialisation follows PEFT: A kaiming-uniform, B zeros, so an untrained adapter leaves the model as it was.
The parameter names are therefore the base's plus `lora_A.weight` / `lora_B.weight`, which are PEFT's
saved names once Hugging Face's prefix is added (murmur/hf.py) behind `base_model.model.`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from murmur.errors import MurmurError
from murmur.files import staged_dir
from murmur.settings.train import LORA_TARGETS, SFTSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SETTING_NAMES = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


@dataclass(frozen=True)
class LoraSettings:
    """What shapes the adapters: their rank, scale numerator, input dropout and the projections they adapt."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def record(self) -> dict[str, Any]:
        """As JSON data, for the stage folder's fingerprint (run.json)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    def describe(self) -> str:
        return (f"rank {self.rank}, alpha {self.alpha:g} (scale {self.scale:g}), dropout {self.dropout:g}, "
                f"on {', '.join(self.targets)}")


def lora_settings(ts: Any) -> LoraSettings | None:
    """The adapters a training section asks for (its lora_* fields), or None for full training."""
    rank = getattr(ts, "lora_rank", 0)  # pretraining's section has no LoRA fields
    if not rank:
        return None
    return LoraSettings(rank, float(ts.lora_alpha), float(ts.lora_dropout), tuple(dict.fromkeys(ts.lora_targets)))


def check_lora_layout(ts: Any, layout: Any, section: str) -> None:
    """LoRA trains on one process, under DDP or FSDP2/HSDP; tensor parallelism would split the adapters'
    own parameters as if they were the base's, and pipeline stages are not wired for frozen parameters."""
    if lora_settings(ts) and layout.world_size != layout.dp_size:  # some processes split the model
        raise MurmurError(f"{section}.lora_rank > 0 trains with data parallelism only (one process, DDP, FSDP2); "
                          f"set {section}.parallel.tp=1 and pp=1, or {section}.lora_rank=0 for full finetuning")


def lora_settings_from_meta(train: Any, source: str) -> LoraSettings | None:
    """The adapters a checkpoint was trained with, from the training section its murmur.json records.

    The file may come from anyone: the fields are validated as settings are, and a bad one is named."""
    if not isinstance(train, dict) or not train.get("lora_rank"):
        return None
    try:
        section = SFTSettings.model_validate({k: train[k] for k in SETTING_NAMES if k in train})
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise MurmurError(f"{source}: train.{where} is invalid ({problem['msg']}); the checkpoint's LoRA "
                          "settings are corrupt") from None
    return lora_settings(section)


def is_adapter_name(name: str) -> bool:
    """Whether a parameter or state-dict name belongs to a LoRA adapter (not to the model it adapts)."""
    return ".lora_A." in name or ".lora_B." in name


class LoRALinear(nn.Linear):
    """A linear layer with a frozen base weight (and bias) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, settings: LoraSettings):
        nn.Module.__init__(self)  # not nn.Linear's: the base's weight and bias are taken over, not reallocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale = settings.rank, settings.alpha, settings.scale
        device, dtype = base.weight.device, base.weight.dtype
        # Built on the meta device, then given memory: no random numbers spent on an init about to be replaced.
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, device="meta", dtype=dtype)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, device="meta", dtype=dtype)
        self.lora_A.to_empty(device=device)
        self.lora_B.to_empty(device=device)
        self.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        if device.type != "meta":
            self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """PEFT's default init: A as nn.Linear initialises its weight, B zero (the update starts at zero)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return F.linear(x, self.weight, self.bias) + update * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W + scale · B A, summed in float32."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        weight = (self.weight.float() + self.scale * delta).to(self.weight.dtype)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_alpha={self.alpha:g}"


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every linear layer in the model's blocks whose own name is a target."""
    return [(qualified, module) for qualified, module in model.named_modules()
            if isinstance(module, nn.Linear) and qualified.rpartition(".")[2] in names and ".layers." in f".{qualified}"]


def adapted_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def apply_lora(model: nn.Module, settings: LoraSettings) -> tuple[int, int]:
    """Freeze every parameter of `model`, then give each target projection an adapter (trainable).

    Call it on the plain model, before tensor/data parallelism wraps it. Returns (trainable, total) counts.
    """
    unknown = sorted(set(settings.targets) - set(LORA_TARGETS))
    if unknown:
        raise MurmurError(f"sft.lora_targets names {', '.join(unknown)}; choose among {', '.join(LORA_TARGETS)}")
    if adapted_modules(model):
        raise MurmurError("the model already has LoRA adapters; merge them (murmur export) before adding others")
    targets = _targets(model, settings.targets)
    if not targets:
        raise MurmurError(f"sft.lora_targets ({', '.join(settings.targets)}) match no projection of the model")
    for name, module in targets:
        smallest = min(module.in_features, module.out_features)
        if settings.rank > smallest:
            raise MurmurError(f"sft.lora_rank={settings.rank} exceeds the smaller side ({smallest}) of {name}; a rank "
                              "that large is no longer low-rank: lower sft.lora_rank")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, settings))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def reset_adapters(model: nn.Module) -> None:
    """Initialise every adapter again (after a model built on the meta device was given memory)."""
    for _, module in adapted_modules(model):
        module.reset_adapter()


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapted projection by a plain one holding the merged weight; the model, now without LoRA."""
    for name, module in adapted_modules(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.merged())
    return model


def adapter_settings_of(model: nn.Module) -> LoraSettings:
    """The LoRA settings a model's adapters were built with (one rank and alpha for all, as this module makes)."""
    modules = adapted_modules(model)
    if not modules:
        raise MurmurError("the model has no LoRA adapters; it was not finetuned with sft.lora_rank > 0")
    first = modules[0][1]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    names = {name.rpartition(".")[2] for name, _ in modules}
    return LoraSettings(first.rank, first.alpha, dropout, tuple(t for t in LORA_TARGETS if t in names))


def peft_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under the names PEFT saves: base_model.model.<Hugging Face name>."""
    from murmur.hf import murmur_to_hf_state

    return {f"base_model.model.{name}": tensor for name, tensor in murmur_to_hf_state(model).items()
            if is_adapter_name(name)}


def peft_config(settings: LoraSettings, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json for `peft.PeftModel.from_pretrained(base, folder)` (a LoRA for causal LM)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": list(settings.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None}


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the model's adapters as a PEFT folder, atomically (the folder appears only when complete).

    base_model: where the base lives (recorded as base_model_name_or_path), when known."""
    from safetensors.torch import save_file

    settings = adapter_settings_of(model)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in peft_state(model).items()}
    with staged_dir(out_dir) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(settings, base_model), indent=2) + "\n")
    return Path(out_dir)
