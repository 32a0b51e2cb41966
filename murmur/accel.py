"""What this machine offers: its device, bf16 matrix multiplies on the CPU, and torch.compile's CPU kernels.

The demo recipe asks for both; on a machine without them training still runs, with a warning that
says what is missing, instead of failing or silently crawling.
"""

from __future__ import annotations

import torch

from murmur.errors import MurmurError


def resolve_device(name: str) -> str:
    """`auto` picks CUDA when it is there; an explicit CUDA device that is absent is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MurmurError(f"device {name!r} asked for but CUDA is not available here; use cpu (or auto)")
    return name


def cpu_bf16_fast() -> bool:
    """Whether oneDNN has native bf16 matmuls here (AVX512-BF16 or AMX); without them bf16 is emulated, slowly."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_compile_unavailable() -> str | None:
    """Why torch.compile cannot build CPU kernels on this machine, or None when it can (it needs a C++ compiler)."""
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - inductor raises its own types, which vary by version
        return f"no C++ compiler for torch.compile's CPU kernels ({type(err).__name__}); install g++ to enable it"
    return None
