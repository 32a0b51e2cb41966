"""The accelerators the planner knows: memory, dense bf16 peak and the bandwidth each GPU gets to its peers.

Memory is the device total nvidia-smi reports (before the CUDA context takes its share).
Bandwidths are per GPU and per direction, in bytes per second: what one GPU can push while receiving as
much, which is what a ring all-gather or reduce-scatter is limited by. NVIDIA quotes NVLink as the
bidirectional total, so the figure here is half the datasheet's. Inter-node bandwidth is the NIC each GPU
owns in the reference node design (one ConnectX per GPU in DGX/HGX systems).
"""

from __future__ import annotations

from dataclasses import dataclass

from murmur.errors import MurmurError

GB = 1e9  # bandwidths: datasheets quote decimal gigabytes per second
MiB = 2**20  # memory: what nvidia-smi reports as the device total (the "80 GB" parts hold 80 GiB or a bit less)


@dataclass(frozen=True)
class GPU:
    """One accelerator model as the planner sees it."""

    name: str
    label: str
    memory_bytes: float
    peak_bf16_flops: float  # dense, without 2:4 sparsity
    intra_node_bandwidth: float  # bytes/s per GPU per direction (NVLink through NVSwitch, or PCIe)
    inter_node_bandwidth: float  # bytes/s per GPU per direction (its share of the node's NICs)
    gpus_per_node: int = 8


GPUS: dict[str, GPU] = {
    # NVIDIA A100 Tensor Core GPU datasheet (2021): 40 GB or 80 GB HBM, BF16 312 TFLOPS dense (624 sparse),
    # NVLink 3 600 GB/s bidirectional. DGX A100 datasheet: 8x ConnectX-6 200 Gb/s for the compute fabric,
    # one per GPU -> 25 GB/s per GPU.
    "a100-40gb": GPU("a100-40gb", "NVIDIA A100 SXM 40GB", 40960 * MiB, 312e12, 300 * GB, 25 * GB),
    "a100-80gb": GPU("a100-80gb", "NVIDIA A100 SXM 80GB", 81920 * MiB, 312e12, 300 * GB, 25 * GB),
    # NVIDIA H100 Tensor Core GPU datasheet (2023): H100 SXM 80 GB, BF16 1,979 TFLOPS with sparsity
    # (989 dense), NVLink 4 900 GB/s bidirectional. DGX H100 datasheet: 8x ConnectX-7 400 Gb/s -> 50 GB/s.
    "h100-sxm": GPU("h100-sxm", "NVIDIA H100 SXM 80GB", 81559 * MiB, 989e12, 450 * GB, 50 * GB),
    # Same datasheet, H100 PCIe (later "H100 NVL" differs): 80 GB, BF16 1,513 TFLOPS sparse (756 dense);
    # without NVSwitch, GPUs of a node talk over PCIe Gen5 x16 (128 GB/s bidirectional -> 64 GB/s).
    # PCIe servers usually carry fewer NICs: assumed one 200 Gb/s port per GPU (25 GB/s).
    "h100-pcie": GPU("h100-pcie", "NVIDIA H100 PCIe 80GB", 81559 * MiB, 756e12, 64 * GB, 25 * GB),
    # NVIDIA H200 datasheet (2024): 141 GB HBM3e, BF16 1,979 TFLOPS sparse (989 dense), NVLink 900 GB/s;
    # HGX H200 reference design pairs each GPU with a 400 Gb/s ConnectX-7 (50 GB/s).
    "h200": GPU("h200", "NVIDIA H200 SXM 141GB", 143771 * MiB, 989e12, 450 * GB, 50 * GB),
    # NVIDIA HGX B200 / DGX B200 datasheets (2024): 1,440 GB HBM3e for 8 GPUs (180 GB each), FP16/BF16
    # 36 PFLOPS sparse for 8 GPUs (2.25 PFLOPS dense each, the 1,000 W HGX configuration), NVLink 5
    # 1.8 TB/s bidirectional per GPU; DGX B200: 8x ConnectX-7 400 Gb/s (50 GB/s per GPU).
    "b200": GPU("b200", "NVIDIA B200 180GB (HGX)", 183359 * MiB, 2250e12, 900 * GB, 50 * GB),
}

# Short names people type; each maps to the part usually meant.
ALIASES = {"a100": "a100-80gb", "a100-40": "a100-40gb", "a100-80": "a100-80gb", "h100": "h100-sxm",
           "h100-sxm5": "h100-sxm", "h200-sxm": "h200", "b200-hgx": "b200"}


def get_gpu(name: str) -> GPU:
    """The GPU called `name` (case-insensitive, aliases allowed); an error listing the known ones otherwise."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise MurmurError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)} "
                          f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return GPUS[key]
