"""Accelerators and node types as their vendors and clouds publish them.

Torch-free: the planner and the health checks read these figures without starting torch.
Units are spelled in every field name: TFLOP/s dense (no 2:4 sparsity), GiB as the device
reports its memory, TB/s and GB/s in decimal bytes, Gb/s in decimal bits.
Each figure names its source; "not verified here" marks one taken from a secondary page.

`scale_up_gbps` is the datasheet's total NVLink / Infinity Fabric figure per GPU, which
counts both directions (A100: 12 links x 25 GB/s x 2 = 600 GB/s); the cost model halves it
to get what one direction of a ring carries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from supercluster.errors import UserError, closest

DTYPES = ("bf16", "fp8", "tf32", "fp32")


@dataclass(frozen=True)
class Accelerator:
    name: str
    vendor: str
    peak_tflops: dict = field(compare=False)  # dtype -> dense TFLOP/s of the matrix units
    hbm_gib: float  # device memory as the runtime reports it
    hbm_tbps: float  # peak device-memory bandwidth
    scale_up_gbps: float  # per-GPU NVLink/xGMI bandwidth, both directions summed
    # Maximum achievable matmul TFLOP/s as measured (best shape found by a sweep); dtypes
    # without a measurement are scaled from bf16's ratio of measured to peak.
    mamf_tflops: dict = field(default_factory=dict, compare=False)
    power_w: float | None = None  # board power limit the figures above hold at
    nvlink_gen: int | None = None  # NVLink generation (None: not NVLink)
    mx_formats: bool = False  # block-scaled MXFP8 GEMMs in hardware (Blackwell tensor cores)
    # The GPU die (NVIDIA's chip name): parts built on one die run the same kernels at rates
    # set by their clocks (`plan.cost`'s flash attention compares a part with its die's
    # reference part, `CHIP_REFERENCE`). None: no reference (the part's own figures apply).
    chip: str | None = None

    def describe(self) -> str:
        """The figures a prediction for this part rests on, in one line."""
        link = f"NVLink {self.nvlink_gen}" if self.nvlink_gen else "scale-up links"
        power = f", {self.power_w:.0f} W" if self.power_w else ""
        return (f"{self.name}: {self.peak('bf16'):.0f} TFLOP/s bf16 peak ({self.achievable('bf16'):.0f} measured best), "
                f"{self.hbm_gib:.0f} GiB HBM at {self.hbm_tbps:g} TB/s{power}, {link} at {self.scale_up_gbps:.0f} GB/s")

    def achievable(self, dtype: str) -> float:
        """Measured best-case matmul TFLOP/s for `dtype` (a datasheet peak is never reached)."""
        peak = self.peak(dtype)
        if self.mamf_tflops.get(dtype):
            return self.mamf_tflops[dtype]
        if self.mamf_tflops.get("bf16"):
            return peak * self.mamf_tflops["bf16"] / self.peak("bf16")
        return peak

    def peak(self, dtype: str) -> float:
        """Dense TFLOP/s for `dtype` ("bf16", "fp8", "tf32" or "fp32")."""
        if dtype not in DTYPES:
            raise UserError(f"Unknown precision {dtype!r}{closest(dtype, DTYPES)}; choose one of {', '.join(DTYPES)}.")
        value = self.peak_tflops.get(dtype)
        if value is None:
            have = ", ".join(k for k in DTYPES if self.peak_tflops.get(k))
            raise UserError(f"{self.name} has no {dtype} matrix units; use --precision with one of {have}.")
        return value


@dataclass(frozen=True)
class NodeType:
    name: str
    accelerator: str  # key into ACCELERATORS
    gpus_per_node: int
    scale_up_gbps: float  # per GPU, both directions summed (as Accelerator.scale_up_gbps)
    scale_out_gbps_per_gpu: float  # Gb/s (bits) of InfiniBand/RoCE per GPU
    # Health pass marks; None where the operator publishes none for this node type.
    allreduce_busbw_gbps: float | None = None  # GB/s, NCCL all-reduce bus bandwidth inside one node
    h2d_gbps: float | None = None  # GB/s, host<->device copy per GPU
    d2d_gbps: float | None = None  # GB/s, device-to-device copy
    ib_gbps_per_port: float | None = None  # Gb/s, InfiniBand write bandwidth per port
    # GB/s each way between one GPU and host memory, datasheet: PCIe Gen5 x16 (63 GB/s) on x86
    # nodes, Gen4 (31.5) on A100 nodes, NVLink-C2C on Grace superchips. The planner costs
    # activation offload with it (derated like the links, or the measured h2d pass mark).
    host_link_gbps: float = 63.0
    source: str = ""


# ---- accelerators -------------------------------------------------------------------------
# A100: NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web), as quoted in
# the calibration notes (plan/calibration/README.md): BF16 312, TF32 156, FP32 19.5 TFLOP/s dense; 40 GB HBM2 at
# 1,555 GB/s, 80 GB HBM2e at 2,039 GB/s; NVLink3 12 links, 600 GB/s. No FP8 units.
# H100 SXM5: NVIDIA H100 datasheet as quoted in the calibration notes: BF16 989.4, FP8 1,978.9 dense, TF32
# 494.7, FP32 66.9; 80 GB HBM3 at 3.35 TB/s; NVLink4 18 links, 900 GB/s. The runtime reports
# 81,559 MiB (79.6 GiB) of the 80 GB.
# H200 SXM: same Hopper compute as H100 (calibration notes); 141 GB HBM3e (MLCommons inference v4.1
# system JSON H200-SXM-141GBx8), 4.8 TB/s (NVIDIA H200 page, via secondary pages: not verified
# here); "18x 4th Gen NVLink, 900GB/s" (same JSON). Runtime reports 143,771 MiB (140.4 GiB).
# MI300X: ROCm MI300 docs / spec table quoted in the calibration notes: BF16 1,307.4, FP8 2,614.9 dense,
# TF32 653.7, FP32 (matrix) 163.4; 192 GB HBM3 at 5.3 TB/s; Infinity Fabric 7 peers x 64 GB/s
# each way = 896 GB/s total (third-party aggregators, not verified here).
# B200 (HGX B200, 1,000 W): NVIDIA HGX/DGX B200 datasheet: 72 PFLOP/s FP8 training and
# 1.4 TB HBM3e for 8 GPUs, i.e. 4.5 PFLOP/s FP8 and 2.25 PFLOP/s BF16 dense, TF32 1.1 dense,
# FP32 75 per GPU; 180 GB HBM3e at 8 TB/s; NVLink5 1.8 TB/s per GPU (from the datasheet as
# remembered, not fetched here: not verified).
#
# GB200 (NVIDIA GB200 NVL72 datasheet, per GPU: 1/72 of 180 PFLOP/s dense FP16/BF16 and 360
# dense FP8, 13.4 TB HBM3e at 576 TB/s, 130 TB/s NVLink; not verified here): 2.5 PFLOP/s BF16,
# 5 FP8, 186 GB at 8 TB/s, NVLink 5 at 1.8 TB/s, all 72 GPUs of a rack in one NVLink domain.
# Its achievable matmul is B200's measured ratio to peak (not measured on GB200).
#
# Achievable matmul (MAMF) from Stas Bekman's ml-engineering, compute/accelerator/README.md
# "Maximum Achievable Matmul FLOPS comparison table" (BF16, best shape of a sweep): A100 SXM
# 267.9 (CUDA 12.1), H100 SXM 792.1 (CUDA 12.1), MI300X 781.9 (ROCm 6.2); and its H200-vs-B200
# guide: H200 SXM 794.5 BF16 / 1,453.4 FP8, B200 1,745 BF16 / 3,432.5 FP8. H100 FP8 is taken
# from the H200 measurement (same Hopper chip and clocks).
# H800 (DeepSeek-V3 technical report, arXiv:2412.19437, sec. 3.1-3.2): the export H100 SXM,
# same Hopper compute and 80 GB HBM3, NVLink cut to 400 GB/s per GPU (8 links; DeepSeek
# measures ~160 GB/s usable one way) and 8 x 400 Gb/s IB per node (50 GB/s per GPU).
ACCELERATORS: dict[str, Accelerator] = {
    "a100-40gb": Accelerator("a100-40gb", "nvidia", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 40.0, 1.555, 600.0, {"bf16": 267.9},
                             power_w=400, nvlink_gen=3, chip="GA100"),
    "a100-80gb": Accelerator("a100-80gb", "nvidia", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 80.0, 2.039, 600.0, {"bf16": 267.9},
                             power_w=400, nvlink_gen=3, chip="GA100"),
    "h100": Accelerator(
        "h100", "nvidia", {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9}, 79.6, 3.35, 900.0, {"bf16": 792.1, "fp8": 1453.4},
        power_w=700, nvlink_gen=4, chip="GH100",
    ),
    "h800": Accelerator(
        "h800", "nvidia", {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9}, 79.6, 3.35, 400.0, {"bf16": 792.1, "fp8": 1453.4},
        power_w=700, nvlink_gen=4, chip="GH100",
    ),
    "h200": Accelerator(
        "h200", "nvidia", {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9}, 140.4, 4.8, 900.0, {"bf16": 794.5, "fp8": 1453.4},
        power_w=700, nvlink_gen=4, chip="GH100",
    ),
    "gb200": Accelerator(
        "gb200", "nvidia", {"bf16": 2500.0, "fp8": 5000.0, "tf32": 1250.0, "fp32": 80.0}, 184.0, 8.0, 1800.0,
        {"bf16": 1745.0 * 2500 / 2250, "fp8": 3432.5 * 5000 / 4500}, power_w=1200, nvlink_gen=5, mx_formats=True, chip="GB100",
    ),
    "mi300x": Accelerator(
        "mi300x", "amd", {"bf16": 1307.4, "fp8": 2614.9, "tf32": 653.7, "fp32": 163.4}, 192.0, 5.3, 896.0, {"bf16": 781.9}
    ),
    # Meta's Grand Teton H100 (torchtitan's benchmarks): 96 GB HBM2e at 2.4 TB/s, capped at 500 W.
    # Its clocks under that cap are not published; a stated derating: peak interpolated by
    # power between H100 NVL (400 W, 835 TFLOP/s BF16) and SXM (700 W, 989.4), i.e. 886.5, and
    # the achievable matmul scaled by the same ratio. The runtime reports ~94.5 GB as 88 GiB.
    "h100-gt96": Accelerator(
        "h100-gt96", "nvidia", {"bf16": 886.5, "fp8": 1773.0, "tf32": 443.3, "fp32": 59.9}, 88.0, 2.4, 900.0,
        {"bf16": 709.7, "fp8": 1302.2}, power_w=500, nvlink_gen=4, chip="GH100",
    ),
    "b200": Accelerator(
        "b200", "nvidia", {"bf16": 2250.0, "fp8": 4500.0, "tf32": 1100.0, "fp32": 75.0}, 180.0, 8.0, 1800.0, {"bf16": 1745.0, "fp8": 3432.5},
        power_w=1000, nvlink_gen=5, mx_formats=True, chip="GB100",
    ),
}

# Per die, the part that kernel papers and vendor tables measure it on (the SXM board at its
# full power): FlashAttention-2 on "A100 80GB SXM4" and "H100 80GB SXM5" (Dao 2023,
# arXiv:2307.08691, Figs. 4-7), FlashAttention-3 and cuDNN on "H100 80GB SXM5" (Shah et al.
# 2024, arXiv:2407.08608, Figs. 5-6); B200 for Blackwell.
CHIP_REFERENCE = {"GA100": "a100-80gb", "GH100": "h100", "GB100": "b200"}

# Names people type for the same parts.
ALIASES = {
    "a100": "a100-80gb",
    "h100-sxm": "h100",
    "h100-80gb": "h100",
    "h200-141gb": "h200",
    "b200-180gb": "b200",
    "h100-96gb": "h100-gt96",  # the 96 GB HBM2e board at 500 W (Grand Teton)
    "h100-500w": "h100-gt96",
    "h800-80gb": "h800",
}

# ---- node types -----------------------------------------------------------------------------
# Azure pass marks: Azure/azurehpc-health-checks (AzNHC), conf/<sku>.conf lines
# `check_nccl_allreduce <GB/s> ...`, `check_gpu_bw <h2d GB/s> <d2d GB/s>` and the per-port
# InfiniBand bandwidth check (Gb/s), as given to this project:
# nd96isr_h100_v5 460 / 48 / 335 / 380, nd96isr_h200_v5 431 / 48 / 335 / 360,
# nd96asr_v4 (ND A100 v4) 228 / 21 / 235 / 180.
NODE_TYPES: dict[str, NodeType] = {
    "nd-a100-v4": NodeType(
        "nd-a100-v4", "a100-40gb", 8, 600.0, 200.0,
        host_link_gbps=31.5,  # PCIe Gen4 x16
        allreduce_busbw_gbps=228.0, h2d_gbps=21.0, d2d_gbps=235.0, ib_gbps_per_port=180.0,
        source="Azure ND A100 v4 (Standard_ND96asr_v4): 8x A100 40GB, NVLink3, 8x 200 Gb/s HDR IB; AzNHC nd96asr_v4.conf",
    ),
    "ndm-a100-v4": NodeType(
        "ndm-a100-v4", "a100-80gb", 8, 600.0, 200.0,
        host_link_gbps=31.5,  # PCIe Gen4 x16
        source="Azure NDm A100 v4 (Standard_ND96amsr_A100_v4): 8x A100 80GB, NVLink3, 8x 200 Gb/s HDR IB",
    ),
    "dgx-a100": NodeType(
        "dgx-a100", "a100-80gb", 8, 600.0, 200.0,
        host_link_gbps=31.5,  # PCIe Gen4 x16
        source="DGX A100 as in Selene (Narayanan et al. 2021, sec. 5): 8x A100 80GB, NVSwitch, 8x 200 Gb/s HDR IB for compute",
    ),
    "nd-h100-v5": NodeType(
        "nd-h100-v5", "h100", 8, 900.0, 400.0,
        allreduce_busbw_gbps=460.0, h2d_gbps=48.0, d2d_gbps=335.0, ib_gbps_per_port=380.0,
        source="Azure ND H100 v5 (Standard_ND96isr_H100_v5, MicrosoftDocs nd-h100-v5-series.md): 8x H100, NVLink4 900 GB/s, "
        "one 400 Gb/s Quantum-2 CX7 IB per GPU; AzNHC nd96isr_h100_v5.conf",
    ),
    "dgx-h100": NodeType(
        "dgx-h100", "h100", 8, 900.0, 400.0,
        source="DGX H100 / Eos (MLPerf v3.1 Eos system JSON): 8x H100, NVSwitch Gen3, 8x ConnectX-7 NDR 400 Gb/s",
    ),
    "nd-h200-v5": NodeType(
        "nd-h200-v5", "h200", 8, 900.0, 400.0,
        allreduce_busbw_gbps=431.0, h2d_gbps=48.0, d2d_gbps=335.0, ib_gbps_per_port=360.0,
        source="Azure ND H200 v5 (Standard_ND96isr_H200_v5): 8x H200, NVLink4 900 GB/s, 8x 400 Gb/s IB; AzNHC nd96isr_h200_v5.conf",
    ),
    "nd-mi300x-v5": NodeType(
        "nd-mi300x-v5", "mi300x", 8, 896.0, 400.0,
        source="Azure ND MI300X v5 (MicrosoftDocs): 8x MI300X fully connected by Infinity Fabric, 8x 400 Gb/s NDR IB",
    ),
    "grand-teton": NodeType(
        "grand-teton", "h100-gt96", 8, 900.0, 400.0,
        source="Meta Grand Teton as in torchtitan's H100 benchmarks: 8x H100 96GB (500 W), NVLink, 400 Gb/s RDMA per GPU",
    ),
    "hgx-h200": NodeType(
        "hgx-h200", "h200", 8, 900.0, 400.0,
        source="HGX H200 as in Trainy's torchtitan runs on WhiteFiber (torchtitan benchmarks, 2025-06): 8x H200, NVLink, "
        "400 Gb/s CX-7 RDMA per GPU",
    ),
    "gb200-nvl72": NodeType(
        "gb200-nvl72", "gb200", 72, 1800.0, 400.0,
        # NVLink-C2C, 900 GB/s both directions per GB200 superchip (one Grace, two B200):
        # 225 GB/s each way per GPU (NVIDIA GB200 datasheet; not verified here).
        host_link_gbps=225.0,
        source="GB200 NVL72 (NVIDIA datasheet): 72 GPUs in one NVLink 5 domain (1.8 TB/s per GPU), ConnectX-7 400 Gb/s per "
        "GPU across racks (not verified here)",
    ),
    "hgx-h800": NodeType(
        "hgx-h800", "h800", 8, 400.0, 400.0,
        source="DeepSeek-V3 report sec. 3.2.2: 8x H800 per node, NVLink (160 GB/s achieved), 8x 400 Gb/s IB (50 GB/s per GPU)",
    ),
    "ibm-a100-400g": NodeType(
        "ibm-a100-400g", "a100-80gb", 8, 600.0, 50.0,
        host_link_gbps=31.5,  # PCIe Gen4 x16
        source="IBM's A100 cluster in 'Maximizing training throughput using PyTorch FSDP' (PyTorch blog, IBM and Meta, "
        "2024-03-13): 8x A100 80GB, NVLink3, '400Gbps inter-node interconnect' with GPU direct RDMA, read as per node "
        "(50 Gb/s per GPU)",
    ),
    "ibm-h100-800g": NodeType(
        "ibm-h100-800g", "h100", 8, 900.0, 100.0,
        source="IBM's H100 cluster in the same blog: 8x H100 80GB, NVLink4, '800Gbps inter-node interconnect', read as "
        "per node (100 Gb/s per GPU)",
    ),
    "dgx-b200": NodeType(
        "dgx-b200", "b200", 8, 1800.0, 400.0,
        source="DGX B200 datasheet: 8x B200, NVLink5 1.8 TB/s per GPU, 8x single-port ConnectX-7 400 Gb/s (not verified here)",
    ),
}

# Azure VM size names (as the node labels and IMDS spell them) for the same node types.
NODE_ALIASES = {
    "standard_nd96asr_v4": "nd-a100-v4",
    "nd96asr_v4": "nd-a100-v4",
    "standard_nd96amsr_a100_v4": "ndm-a100-v4",
    "nd96amsr_a100_v4": "ndm-a100-v4",
    "standard_nd96isr_h100_v5": "nd-h100-v5",
    "nd96isr_h100_v5": "nd-h100-v5",
    "standard_nd96isr_h200_v5": "nd-h200-v5",
    "nd96isr_h200_v5": "nd-h200-v5",
    "standard_nd96isr_mi300x_v5": "nd-mi300x-v5",
    "nd96isr_mi300x_v5": "nd-mi300x-v5",
}

# The node type a plan assumes when only the accelerator is given.
DEFAULT_NODE = {
    "a100-40gb": "nd-a100-v4",
    "a100-80gb": "dgx-a100",
    "h100": "nd-h100-v5",
    "h200": "nd-h200-v5",
    "mi300x": "nd-mi300x-v5",
    "h100-gt96": "grand-teton",
    "b200": "dgx-b200",
    "h800": "hgx-h800",
    "gb200": "gb200-nvl72",
    "local": "local",
}


# ---- this machine -----------------------------------------------------------------------------
# Ranks on one host talk through gloo over loopback/shared memory: a few GB/s. An estimate,
# not a measurement; it only matters for multi-rank local plans.
LOCAL_LINK_GBPS = 4.0


class _MeasuredPeaks(dict):
    """dtype -> TFLOP/s, measured on first use only (a bf16 probe on a CPU takes seconds)."""

    def __init__(self, threads: int, share: float = 1.0):
        super().__init__()
        self.threads = threads
        self.share = share  # below 1 when more ranks than cores: each rank gets part of a core

    def get(self, dtype, default=None):
        if dtype not in ("fp32", "bf16"):
            return default
        if dtype not in self:
            from supercluster.hardware import local

            self[dtype] = local.local_peak(dtype, self.threads) * self.share
        return self[dtype]


def _memory_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


def local_accelerator(ranks: int = 1) -> Accelerator:
    """This machine's CPU as one "GPU" per rank, sharing the cores among `ranks` processes.

    Peaks are measured once (a matmul probe in `hardware.local`, which imports torch) and
    read from the cache afterwards; memory bandwidth is measured with numpy.
    """
    from supercluster.hardware import local

    cores = os.cpu_count() or 1
    threads = max(1, cores // ranks)
    peaks = _MeasuredPeaks(threads, share=min(1.0, cores / (ranks * threads)))
    return Accelerator(
        "local", "cpu", peaks, _memory_gib() / ranks, local.memory_bandwidth_tbps() / ranks, LOCAL_LINK_GBPS
    )


def local_node(ranks: int = 1) -> NodeType:
    return NodeType("local", "local", max(1, ranks), LOCAL_LINK_GBPS, 8 * LOCAL_LINK_GBPS, source="this machine")


# ---- lookups -----------------------------------------------------------------------------------


def accelerator(name: str, ranks: int = 1) -> Accelerator:
    """The accelerator called `name` (or an alias); "local" measures this machine."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "local":
        return local_accelerator(ranks)
    if key not in ACCELERATORS:
        names = [*ACCELERATORS, "local"]
        raise UserError(f"Unknown GPU type {name!r}{closest(key, names)}; choose one of {', '.join(names)}.")
    return ACCELERATORS[key]


def node_type(name: str, ranks: int = 1) -> NodeType:
    """The node type called `name`, e.g. "nd-h100-v5"; "local" is this machine."""
    key = NODE_ALIASES.get(name.lower(), name.lower())
    if key == "local":
        return local_node(ranks)
    if key not in NODE_TYPES:
        names = [*NODE_TYPES, "local"]
        raise UserError(f"Unknown node type {name!r}{closest(key, names)}; choose one of {', '.join(names)}.")
    return NODE_TYPES[key]


def default_node_type(accelerator_name: str, ranks: int = 1) -> NodeType:
    """The node type a plan assumes for an accelerator when none is named."""
    key = ALIASES.get(accelerator_name.lower(), accelerator_name.lower())
    if key not in DEFAULT_NODE:
        accelerator(key)  # raises the "did you mean" error
    return node_type(DEFAULT_NODE[key], ranks)


# Device names as the runtime reports them (torch.cuda.get_device_name / nvidia-smi / rocm-smi),
# e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200", "AMD Instinct MI300X".
# PCIe and NVL boards have other clocks and power limits than the SXM parts catalogued here.
_DEVICE_PATTERNS = (
    ("a100", "40gb", "a100-40gb"),
    ("a100", "80gb", "a100-80gb"),
    ("h100", "", "h100"),
    ("h800", "", "h800"),
    ("h200", "", "h200"),
    ("mi300x", "", "mi300x"),
    ("gb200", "", "gb200"),
    ("b200", "", "b200"),
)


def match_device_name(name: str) -> Accelerator | None:
    """The catalogued accelerator a runtime device name refers to, or None if it is not one."""
    text = name.lower().replace(" ", "")
    if "pcie" in text or "nvl" in text:
        return None
    for part, size, key in _DEVICE_PATTERNS:
        if part in text and size in text:
            return ACCELERATORS[key]
    return None
