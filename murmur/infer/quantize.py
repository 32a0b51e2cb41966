"""Weight-only int8 for serving: each linear layer's weight stored as int8 with one scale per output channel.

Decoding one token reads every weight once and does little arithmetic with it, so on a CPU its speed is
set by how many bytes the weights take: int8 reads a quarter of float32's. Activations stay in floating
point (only the weights are rounded), which keeps the quality cost small: docs/journal.md measures it in
bits per byte. `quantize_model(model, "int8")` swaps the projections and the output head for
`Int8Linear` in place; the embedding table stays in floating point (it is looked up, not multiplied).

Three kernels, the fastest the device has:

- "murmur": Murmur's own CPU kernel (`murmur/infer/cpu_kernels`), for 1-31 rows: the weight widened to int16
  in registers and multiplied with the activations rounded to int16 per row (a step of 3e-5 of the row's
  largest value), each weight read once for every row; 2-3x faster than int8pack at one row on SmolLM2.
- "int8pack": `torch._weight_int8pack_mm`, which reads the int8 weight directly. On CPU its bfloat16 path is
  vectorised and its float32 path is not (measured 3-10x slower than bfloat16 on AVX-512, docs/journal.md),
  so activations enter it in bfloat16.
- "dequantize": `linear(x, w.to(dtype)) * scale`, for a device where neither runs.

Where the device also multiplies bfloat16 natively (AVX512-BF16 or AMX, or CUDA), the whole model computes
in bfloat16 (`activation_dtype`): its embedding table and norms are cast once here, and the engine keeps its
KV cache in bfloat16, so no product casts its input and output on every call (casts around each int8
product were a fifth of a float32 model's int8 decode step, docs/journal.md). Elsewhere the model keeps its
dtype and each int8pack product casts its input to bfloat16 and its output back.

A product over many rows (a prompt's prefill) dequantizes the weight to the activations' dtype (bfloat16 for
AMX where the model runs in it, else float32) and uses the float matmul either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from murmur import accel
from murmur.errors import MurmurError
from murmur.infer import cpu_kernels

log = logging.getLogger("murmur.infer")

QUANTIZATIONS = ("none", "int8")


def int8_kernel(device: torch.device) -> str:
    """"murmur" on a CPU where Murmur's kernels load, else "int8pack" where `torch._weight_int8pack_mm` runs on
    `device`, else "dequantize"."""
    if device.type == "cpu" and cpu_kernels.available():
        return "murmur"
    return "int8pack" if int8pack_runs(device) else "dequantize"


def int8pack_runs(device: torch.device) -> bool:
    """Whether `torch._weight_int8pack_mm` runs on `device` (tried on a tiny product)."""
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
        w = torch.ones(8, 32, dtype=torch.int8, device=device)
        out = torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
        return out.shape == (1, 8) and float(out[0, 0]) == 32.0
    except (AttributeError, RuntimeError):  # an op missing for this device raises a RuntimeError subclass
        return False


def int8_activations_run(device: torch.device) -> bool:
    """Whether `torch._int_mm` (int8 x int8 -> int32) runs on `device` for a few rows: on CPU it is oneDNN's
    VNNI/AMX kernel, whose time hardly grows with the rows (tried on a tiny product)."""
    if device.type != "cpu":
        return False  # CUDA's kernel needs more than 16 rows; there int8pack serves decode batches
    try:
        x = torch.ones(2, 32, dtype=torch.int8, device=device)
        out = torch._int_mm(x, torch.ones(32, 8, dtype=torch.int8, device=device))
        return out.shape == (2, 8) and int(out[1, 7]) == 32
    except (AttributeError, RuntimeError):  # an op missing for this device raises a RuntimeError subclass
        return False


def activation_dtype(kernel: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype an int8 model computes in: bfloat16 when the int8pack kernel runs and the device multiplies
    bfloat16 natively (the kernel's fast path takes bfloat16, and prefill's dequantized products then run on
    AMX), else the model's own `dtype` (a CPU without native bfloat16 emulates it, slower than float32)."""
    if kernel not in ("int8pack", "murmur"):
        return dtype
    native = device.type == "cuda" or (device.type == "cpu" and accel.cpu_bf16_fast())
    return torch.bfloat16 if native else dtype


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel): (int8 weight, scales) with weight ~= int8 * scale[:, None].

    The scales are rounded to `scale_dtype` before the weights are divided by them, so the int8 values are
    exact for the scales the kernel will actually multiply by.
    """
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 (out x in) with a scale per output row; same outputs as nn.Linear
    within rounding. Built from a float layer with `Int8Linear.from_linear`."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, kernel: str,
                 int8_activations: bool = False):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scales.shape != weight.shape[:1]:
            raise MurmurError("Int8Linear needs an int8 (out, in) weight and one scale per output row")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.kernel = kernel
        self.int8_activations = int8_activations
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str, int8_activations: bool = False) -> Int8Linear:
        # int8pack multiplies by scales of its activations' dtype; Murmur's kernel reads float32 ones.
        scale_dtype = {"int8pack": torch.bfloat16, "murmur": torch.float32}.get(kernel, linear.weight.dtype)
        q, scales = quantize_rows(linear.weight, scale_dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias, kernel, int8_activations)

    # Rows (tokens) from which a product dequantizes the weight and calls the float matmul instead: a prompt's
    # prefill is bound by arithmetic, where int8pack's kernel is slower than MKL's (docs/journal.md).
    DEQUANTIZE_ROWS = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= self.DEQUANTIZE_ROWS:
            weight = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, weight, self.bias)
        if self.kernel == "murmur" and rows <= cpu_kernels.MAX_ROWS:
            out = torch.ops.murmur_cpu.linear_int8(x.reshape(rows, self.in_features), self.weight, self.scales,
                                                   self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if rows > 1 and self.int8_activations:
            out = self._int8_product(x.reshape(rows, self.in_features))
            out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        elif self.kernel == "int8pack":
            flat = x.reshape(-1, self.in_features)
            if flat.dtype != torch.bfloat16:  # a model kept in float32 (no native bfloat16): cast in and out
                flat = flat.to(torch.bfloat16)
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales)
            out = out.reshape(*x.shape[:-1], self.out_features)
            if out.dtype != x.dtype:
                out = out.to(x.dtype)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias

    def _int8_product(self, flat: torch.Tensor) -> torch.Tensor:
        """A decode batch's product with its rows rounded to int8 too (one scale per row, absmax/127), as
        llama.cpp's Q8_0 and CTranslate2's int8 do: int8pack's time grows with the rows (3-9x from 1 to 8 rows
        on SmolLM2's shapes), `_int_mm`'s hardly does (docs/journal.md). Returns float32."""
        x = flat.float()
        row_scales = x.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(x / row_scales).to(torch.int8)
        return torch._int_mm(q, self.weight.t()) * (row_scales * self.scales.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@dataclass
class QuantizeSummary:
    """What `quantize_model` replaced: layers, and their weight bytes before and after."""

    method: str
    kernel: str
    layers: int
    bytes_before: int
    bytes_after: int
    activations: torch.dtype | None = None  # the dtype the quantized model computes in
    int8_batches: bool = False  # decode batches of 2-31 rows round their activations to int8 (`_int_mm`)

    def describe(self) -> str:
        computes = "" if self.activations is None else f", activations in {str(self.activations).removeprefix('torch.')}"
        computes += ", decode batches with int8 activations" if self.int8_batches else ""
        return (f"weights quantized to {self.method} ({self.kernel} kernel): {self.layers} linear layers, "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB{computes}")


def quantize_model(model: nn.Module, method: str) -> QuantizeSummary:
    """Replace every plain nn.Linear of `model` (projections and the output head) by its int8 version, in place.

    A tied output head gets its own int8 copy; the embedding it shares weights with stays float. Adapter
    layers (LoRA kept unmerged) are left alone: they are not plain nn.Linear. Where `activation_dtype` says
    bfloat16, the model's remaining float parameters (embedding, norms) and the biases are cast to it, so the
    model computes in bfloat16 from the embedding lookup on; the rotary frequencies stay float32.
    """
    if method not in QUANTIZATIONS:
        raise MurmurError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if method == "none":
        return QuantizeSummary(method, "none", 0, 0, 0)
    first = next(model.parameters())
    device = first.device
    kernel = int8_kernel(device)
    activations = activation_dtype(kernel, device, first.dtype)
    batched = kernel == "int8pack" and int8_activations_run(device)  # Murmur's kernel serves batches itself
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    before = after = 0
    with torch.no_grad():
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            quantized = Int8Linear.from_linear(linear, kernel, batched)
            before += linear.weight.numel() * linear.weight.element_size()
            after += quantized.weight.numel() + quantized.scales.numel() * quantized.scales.element_size()
            setattr(parent, child, quantized)
        if activations != first.dtype:
            cast_floats(model, activations)
    summary = QuantizeSummary(method, kernel, len(targets), before, after, activations, batched)
    log.info("%s", summary.describe())
    return summary


def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and every Int8Linear's scales and bias to `dtype`, in place.

    Not `model.to(dtype)`: that would also round buffers kept in float32 on purpose (the rotary frequencies,
    whose rounding would shift the angles of distant positions).
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
        if isinstance(module, Int8Linear):
            if module.kernel != "murmur":  # Murmur's kernel reads float32 scales whatever the activations
                module.scales = module.scales.to(dtype)
            if module.bias is not None:
                module.bias = module.bias.to(dtype)
