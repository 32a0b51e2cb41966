"""Murmur's own CPU kernels for the decode step: products over a few rows at memory speed, and the
element-wise work between them in one call each.

- `small_batch_linear.cpp`: `torch.ops.murmur_cpu.linear_float` and `.linear_int8` multiply 1-31 activation
  rows by a float32 or int8 weight, reading each weight once (the library kernels they replace did not:
  docs/journal.md, "Serving: Murmur's own CPU kernels");
- `decode_elementwise.cpp`: `.rms_norm`, `.add_rms_norm_` (the residual add and the next norm) and
  `.silu_mul`, each what the model's modules compute in several PyTorch ops;
- `decode_attention.cpp`: `.attend_`, a layer's rope, KV-cache write and attention for the step's rows.

The sources are C++ compiled on this machine into one library the first time it is needed (~20 s with g++
on 2 cores), against the installed torch, and kept in `~/.cache/murmur/cpu_kernels/<key>/` (key: the
sources, the flags, torch's version and ABI, the compiler), so later starts load it at once. torch.compile sees the ops as opaque calls.

Without a C++ compiler (or with MURMUR_CPU_KERNELS=0) `available()` is False, one log line says why, and
serving keeps PyTorch's kernels: slower, same tokens within rounding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from murmur.files import atomic_path, cache_dir

log = logging.getLogger("murmur.infer")

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cpp")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
LIBRARY_NAME = "murmur_cpu_kernels.so"
# A decode batch has at most this many rows through these kernels; more rows (a prompt) are bound by
# arithmetic, where MKL's and oneDNN's blocked matmuls win.
MAX_ROWS = 31

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "loaded": False, "why_not": None, "enabled": True}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile_command(compiler: str, source: Path, obj: Path) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    # No -march=native: each kernel names its instruction set and the library picks one at run time.
    # -fopenmp: at::parallel_for splits work only when compiled with OpenMP (it is inline, in torch's
    # headers); at load the library binds to the libgomp torch has already loaded (same soname, rpath first).
    return [compiler, "-O3", "-fopenmp", "-std=c++17", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *includes, "-c", str(source), "-o", str(obj)]


def _link_command(compiler: str, objects: list[Path], output: Path) -> list[str]:
    from torch.utils import cpp_extension

    libs = [f"-L{path}" for path in cpp_extension.library_paths()]
    rpath = [f"-Wl,-rpath,{path}" for path in cpp_extension.library_paths()]
    return [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(output), *libs, *rpath, "-lc10",
            "-ltorch_cpu"]


def _key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    commands = [_compile_command(compiler, Path("in.cpp"), Path("out.o")), _link_command(compiler, [], Path("out.so"))]
    flags = " ".join(" ".join(command) for command in commands).encode()  # a changed flag builds anew
    for part in (*(source.read_bytes() for source in SOURCES + HEADERS), flags, torch.__version__.encode(),
                 str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(), version.encode(), sys.platform.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    """Compile the sources side by side (one compiler process each), then link them through `atomic_path`: a
    crash never leaves a half-written library under the name that is loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects = [Path(scratch) / f"{source.stem}.o" for source in SOURCES]
        running = [subprocess.Popen(_compile_command(compiler, source, obj), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True) for source, obj in zip(SOURCES, objects)]
        failures = []
        for process in running:
            _, errors = process.communicate(timeout=600)
            if process.returncode != 0:
                failures.append(errors.strip()[-2000:])
        if failures:
            raise RuntimeError(f"{Path(compiler).name} failed: {failures[0]}")
        with atomic_path(target) as built:
            done = subprocess.run(_link_command(compiler, objects, built), capture_output=True, text=True,
                                  timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{Path(compiler).name} failed: {done.stderr.strip()[-2000:]}")


def _load() -> None:
    if os.environ.get("MURMUR_CPU_KERNELS", "1") == "0":
        _state["why_not"] = "MURMUR_CPU_KERNELS=0"
        return
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["why_not"] = f"written for x86-64 Linux, not {sys.platform}/{platform.machine()}"
        return
    compiler = _compiler()
    if compiler is None:
        _state["why_not"] = "no C++ compiler (install g++)"
        return
    target = cache_dir("cpu_kernels") / _key(compiler) / LIBRARY_NAME
    try:
        if target.exists():
            try:
                torch.ops.load_library(str(target))
            except OSError:  # a damaged cache (the build itself renames a finished file into place): rebuild
                log.warning("Murmur's CPU kernels at %s do not load; building them again", target)
                target.unlink()
        if not target.exists():
            log.info("building Murmur's CPU kernels with %s (once, ~20 s) into %s", Path(compiler).name,
                     target.parent)
            _build(compiler, target)
            torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _state["why_not"] = f"building or loading them failed: {err}"
        return
    _state["loaded"] = True
    log.info("Murmur's CPU kernels loaded (%s)", isa())


def available() -> bool:
    """Whether the kernels are loaded and enabled (builds or loads them on the first call)."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _load()
            if not _state["loaded"]:
                log.warning("serving with PyTorch's kernels, not Murmur's CPU kernels: %s", _state["why_not"])
    return bool(_state["loaded"]) and bool(_state["enabled"])


def why_not() -> str | None:
    """Why `available()` is False (None when it is True or was not asked yet)."""
    if not _state["enabled"]:
        return "disabled (set_enabled(False))"
    return None if _state["loaded"] else _state["why_not"]  # type: ignore[return-value]


def set_enabled(enabled: bool) -> None:
    """Turn the kernels off (or on again) for layers built afterwards: benchmarks compare both in one process."""
    _state["enabled"] = enabled


def isa() -> str:
    """The instruction set the kernels run with here: avx512_vnni, avx512, avx2 or scalar (ATEN_CPU_CAPABILITY
    caps it as it caps PyTorch's)."""
    return torch.ops.murmur_cpu.isa()


def serves(device: torch.device) -> bool:
    """Whether a decode step on `device` goes through these kernels (a CPU where they are available)."""
    return device.type == "cpu" and available()
