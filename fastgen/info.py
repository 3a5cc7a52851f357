"""What fastgen found on this machine: versions, backends, extension, device."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch

from . import _backend
from ._version import __version__

# Peak memory bandwidth (GB/s) of common accelerators, for when the driver does
# not report the memory clock and bus width.
_KNOWN_BANDWIDTH_GBPS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "A10G": 600.0,
    "RTX 4090": 1008.0,
}


def gpu_peak_bandwidth_gbps(device: int = 0) -> Optional[float]:
    """Peak DRAM bandwidth of a CUDA device in GB/s (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        # Double data rate: two transfers per memory clock.
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    for key, gbps in _KNOWN_BANDWIDTH_GBPS.items():
        if key in props.name:
            return gbps
    return None


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is empty on most Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_info() -> dict[str, Any]:
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _cpu_isa_info(ext, build: dict[str, Any]) -> dict[str, Any]:
    """The CPU kernels' ISA variant in use, and the variants built / runnable."""
    has = ext is not None and hasattr(ext, "cpu_isa")
    return {
        "cpu_isa": ext.cpu_isa() if has else None,
        "cpu_isas_built": ext.cpu_isas_built() if has else build.get("cpu_isas"),
        "cpu_isas_supported": ext.cpu_isas_supported() if has else None,
        "cpu_isa_env": os.environ.get("FASTGEN_CPU_ISA") or None,
    }


def cpu_isa() -> Optional[str]:
    """The ISA variant the CPU kernels run (None without the extension)."""
    ext = _backend.extension()
    return ext.cpu_isa() if ext is not None and hasattr(ext, "cpu_isa") else None


def info() -> dict[str, Any]:
    """A dict describing the installation (what ``fastgen info`` prints)."""
    ext = _backend.extension()
    build = _build_info()
    data: dict[str, Any] = {
        "fastgen": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _backend.triton_version(),
        "triton_interpreter": _backend.triton_interpreter_enabled(),
        "extension": {
            "built": ext is not None,
            "with_cuda": _backend.extension_has_cuda(),
            "error": _backend.extension_error(),
            "flags": build.get("cxx_flags"),
            "nvcc_flags": build.get("nvcc_flags"),
            "omp_threads": ext.omp_max_threads() if ext is not None else None,
            **_cpu_isa_info(ext, build),
        },
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "backends": {
            "cpu": _backend.available_backends("cpu"),
        },
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        data["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "peak_bandwidth_gbps": gpu_peak_bandwidth_gbps(0),
        }
        data["backends"]["cuda"] = _backend.available_backends("cuda")
    else:
        data["gpu"] = None
    return data


def format_info(data: dict[str, Any]) -> str:
    ext = data["extension"]
    if ext["built"]:
        ext_line = f"built ({'CPU + CUDA' if ext['with_cuda'] else 'CPU only'})"
    else:
        ext_line = f"MISSING: {ext['error']}"
    lines = [
        f"fastgen        {data['fastgen']}",
        f"python         {data['python']}",
        f"torch          {data['torch']} (CUDA {data['torch_cuda'] or 'none'})",
        f"triton         {data['triton'] or 'not installed'}"
        + (" (interpreter: TRITON_INTERPRET=1)" if data["triton_interpreter"] else ""),
        f"extension      {ext_line}",
    ]
    if ext["built"]:
        lines.append(f"  cxx flags    {' '.join(ext['flags'] or []) or 'unknown'}")
        if ext["with_cuda"]:
            lines.append(f"  nvcc flags   {' '.join(ext['nvcc_flags'] or []) or 'unknown'}")
        lines.append(f"  omp threads  {ext['omp_threads']}")
        if ext.get("cpu_isa"):
            forced = f" (FASTGEN_CPU_ISA={ext['cpu_isa_env']})" if ext.get("cpu_isa_env") else " (best this CPU runs)"
            lines.append(f"  cpu isa      {ext['cpu_isa']}{forced}")
            lines.append(
                f"  cpu isas     built: {', '.join(ext['cpu_isas_built'] or [])}; "
                f"this CPU runs: {', '.join(ext['cpu_isas_supported'] or [])}"
            )
    lines.append(f"cpu            {data['cpu']} ({data['cpu_threads']} torch threads)")
    gpu = data["gpu"]
    if gpu:
        bw = gpu["peak_bandwidth_gbps"]
        lines.append(
            f"gpu            {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB, "
            f"{gpu['sms']} SMs, peak bandwidth {bw:.0f} GB/s)" if bw else f"gpu            {gpu['name']}"
        )
    else:
        lines.append("gpu            none")
    for dev, names in data["backends"].items():
        lines.append(f"backends ({dev}) {', '.join(names)}")
    return "\n".join(lines)
