"""The device a measurement runs on: resolve `--device`, describe what was measured, and address pinned host
memory from the GPU (zero-copy UVA alias)."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess

from tiersim.errors import TiersimError
from tiersim.hw.memory import mem_total_bytes


class DeviceError(TiersimError):
    """The requested device is not there (the CLI exits with status 2)."""


def resolve_device(name: str):
    """torch.device for 'cpu', 'cuda' or 'cuda:N'; refuse CUDA on a machine without it."""
    import torch  # lazy: `import tiersim.hw` stays torch-free

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                              f"built with CUDA {torch.version.cuda or 'none'}); accepted here: --device cpu")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); "
                              f"accepted: cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return device
    raise DeviceError(f"--device {name!r} unknown; accepted: cpu, cuda, cuda:N")


def device_name(device) -> str:
    """'cpu', 'cuda' or 'cuda:N' of a torch.device (the form `resolve_device` takes)."""
    return device.type if device.index is None else f"{device.type}:{device.index}"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def device_info(device) -> dict:
    """What was measured: device name, driver, torch, date, host."""
    import torch

    info = {"kind": device.type, "torch": torch.__version__, "host": socket.gethostname(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"), "cpu": cpu_name(),
            "cpu_cores": os.cpu_count(), "ram_bytes": mem_total_bytes()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=float(props.total_memory), driver=f"driver {_nvidia_driver()}",
                    cuda_runtime=torch.version.cuda, sms=props.multi_processor_count,
                    label=f"GPU {props.name}")
    else:
        info.update(name=f"CPU {info['cpu']} ({info['cpu_cores']} cores)", memory_bytes=info["ram_bytes"],
                    driver="no GPU driver (CPU device)", threads=1,
                    label=f"CPU measurement of this machine ({info['cpu']}), not a GPU")
    return info


class _CudaArray:
    """A pinned host buffer presented through the CUDA array interface (as int16: bf16 has no typestr)."""

    def __init__(self, t):
        self.keep = t
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<i2", "data": (t.data_ptr(), False),
                                         "version": 2, "strides": None}


def uva_alias(host, device):
    """A CUDA tensor over a pinned host tensor's memory: kernels reading it read host memory over the link
    (zero-copy; pinned memory is mapped under unified addressing). Raises where the driver does not map it."""
    import torch

    if not host.is_pinned() or not host.is_contiguous() or host.element_size() != 2:
        raise ValueError("need a contiguous pinned 2-byte tensor")
    alias = torch.as_tensor(_CudaArray(host.view(torch.int16)), device=device)
    if alias.device.type != "cuda" or alias.data_ptr() != host.data_ptr():
        raise RuntimeError("as_tensor copied instead of aliasing")
    return alias.view(host.dtype)
