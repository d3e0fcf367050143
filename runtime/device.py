"""Device facts: free memory, native bf16, the precision `auto` resolves to, autocast, the inference
layout and allocator setting, the device's name and its measured GEMM peak (the yardstick of MFU and of the
latency table's GFLOP/s)."""
from __future__ import annotations

import platform
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from data_pipeline.errors import UserError, proc_field_bytes

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def add_device_option(ap, default: str = "auto") -> None:
    ap.add_argument("--device", default=default, help=f"auto (a GPU where there is one), cpu, cuda or cuda:N (default: {default})")


def check_device(name: str) -> str:
    """--device as torch names it: 'auto' -> cuda where this machine has a GPU, else cpu; an
    unknown name or a GPU this machine lacks is one error line, not a traceback at first use."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "cpu" and not match:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if match and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}, {build})")
    if match and match.group(1) and int(match.group(1)) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a new model: the GPU's free memory, or the host's available memory (MemAvailable,
    within a container's cgroup limit); None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    found = []
    try:
        found.append(proc_field_bytes(Path("/proc/meminfo").read_text(), "MemAvailable"))
    except (OSError, AttributeError):
        pass
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:  # cgroup v2, v1
            found.append(int(Path("/sys/fs/cgroup", limit).read_text()) - int(Path("/sys/fs/cgroup", usage).read_text()))
        except (OSError, ValueError):  # none, or no limit ("max")
            pass
    return min(found) if found else None


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: CUDA with bf16 support, or a CPU with
    AVX-512 (BF16/AMX) kernels in oneDNN. Elsewhere bf16 is emulated and several times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where it is native, fp16 on CUDA without bf16, fp32 otherwise; others unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def native_fp16(device: torch.device) -> bool:
    """CUDA computes fp16 natively; a CPU only with AVX-512 FP16 / AMX-FP16 kernels in oneDNN."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_fp16_supported()


def emulated_precision_warning(precision: str, device: torch.device) -> str | None:
    """The warning for a half precision asked for where it is emulated (bf16 20-30x slower than fp32
    on an AVX2 CPU; fp16 on an AVX-512 BF16 EPYC 11x slower for the shipped U-Net on a 256² tile in
    channels_last, 300x in NCHW); None where the precision is fine."""
    precision = resolve_precision(precision, device)
    if precision == "fp32" or {"bf16": native_bf16, "fp16": native_fp16}[precision](device):
        return None
    return (f"{precision} is emulated on this {device_name(device)} (no native {precision} kernels): expect it to be "
            "many times slower than fp32 (precision auto picks what is fast here)")


def autocast_for(precision: str, device: torch.device):
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def inference_channels_last(device: torch.device) -> bool:
    """Whether inference runs faster with the weights in channels_last here: on CPUs (oneDNN's
    NHWC convolutions; 1.1-2.0x in fp32 for every architecture on a 2-core AVX2 EPYC, outputs equal
    to 4e-7). GPUs keep NCHW for fp32 (not measured there)."""
    return torch.device(device).type == "cpu"


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _matmul_rate(n: int, dtype: torch.dtype, device: str, reps: int) -> float:
    a, b = torch.rand(n, n, device=device, dtype=dtype), torch.rand(n, n, device=device, dtype=dtype)
    a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def _conv_rate(dtype: torch.dtype, reps: int) -> float:
    """GFLOP/s of a 3x3 convolution, 256 -> 256 channels on 128x128, channels_last (oneDNN on CPUs)."""
    x = torch.rand(1, 256, 128, 128, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.rand(256, 256, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.nn.functional.conv2d(x, w, padding=1)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.conv2d(x, w, padding=1)
    return reps * 2 * 256 * 256 * 9 * 128 * 128 / (time.perf_counter() - t0) / 1e9


def matmul_peak(device: str = "cpu", n: int = 2048, budget_s: float = 3.0) -> dict[str, float]:
    """The machine's measured GEMM GFLOP/s in fp32 and bf16: a matmul's, and on CPUs a 3x3
    convolution's where that is faster (MKL's matmul takes its AVX2 path on AMD CPUs: 208 GFLOP/s
    fp32 on a 2-core AVX-512 EPYC, whose convolutions in oneDNN reach 500, so networks there
    measured 150-200% MFU). A dtype too slow to time within the budget (emulated bf16) is timed once
    at a small size."""
    if device.startswith("cuda"):
        n = 8192
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = _matmul_rate(512, dtype, device, reps=1)
        fits = 5 * 2 * n**3 / (rate * 1e9) <= budget_s
        peak[name] = _matmul_rate(n, dtype, device, reps=5) if fits else rate
        if device == "cpu" and fits:
            peak[name] = max(peak[name], _conv_rate(dtype, reps=3))
    return peak
