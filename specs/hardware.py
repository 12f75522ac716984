"""What a GPU and its host are, as numbers: HardwareSpec (TOML profiles in calibration/profiles/,
every number with its source). NVLink and host-topology fields are optional: a profile leaves them
out where the machine has no NVLink or the host is unknown.

Units: GB = 1e9 bytes, GB/s = 1e9 B/s, TFLOP/s = 1e12 FLOP/s, everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from tiersim.errors import SpecError

# ---------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------

_TEXT_FIELDS = ("name", "description", "link")
# Optional numeric fields: absent (None) where the machine lacks the part or the host is not known.
_OPTIONAL_FIELDS = ("nvlink_gbps", "nvlink_latency_us", "gpus_per_host", "sockets", "cores_per_socket",
                    "ddr_gbps_per_socket", "dma_half_size_kb", "dma_batch_descriptor_us", "gather_kernel_link_frac",
                    "gather_kernel_sm_share", "host_gather_chunk_mb", "host_core_gflops", "host_roundtrip_us",
                    "attention_efficiency", "step_overhead_us", "roofline_overlap", "matmul_fixed_us", "copy_engine_slowdown",
                    "fp8_tflops_spec", "fp8_tflops_effective")
# Optional fields that are shares: at most 1 (an SM share below 1: compute must keep some SMs).
_FRACTION_FIELDS = ("gather_kernel_link_frac", "gather_kernel_sm_share", "attention_efficiency", "roofline_overlap",
                    "copy_engine_slowdown")
# Optional tables of a measured profile: what was fitted, and the measured error of its predictions.
_TABLE_FIELDS = ("fit", "validation")
# Optional fields that count things: whole numbers.
_COUNT_FIELDS = ("gpus_per_host", "sockets", "cores_per_socket")


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """One GPU, its host link and its host: capacities, bandwidths, FLOP rates and fixed costs."""

    name: str
    description: str
    link: str
    hbm_gb: float
    hbm_gbps_spec: float
    hbm_gbps_effective: float
    bf16_tflops_spec: float  # dense, no sparsity
    bf16_tflops_effective: float
    h2d_gbps_pinned: float
    d2h_gbps_pinned: float
    h2d_gbps_pageable: float
    d2h_gbps_pageable: float
    copy_latency_us: float  # fixed cost of one cudaMemcpyAsync
    duplex_factor: float  # share of one-direction bandwidth each direction keeps while both copy
    ddr_gb: float
    ddr_gbps: float  # host memory bandwidth available to host-side attention
    launch_us: float  # kernel launches and other fixed cost per layer
    nvlink_gbps: float | None = None  # NVLink bandwidth per GPU, one direction (half the datasheet's bidirectional)
    nvlink_latency_us: float | None = None  # fixed cost of one small all-reduce among the GPUs of a host over NVLink
    gpus_per_host: int | None = None  # GPUs sharing one host's DDR and cores
    sockets: int | None = None  # CPU sockets of the host
    cores_per_socket: int | None = None  # physical cores per socket
    ddr_gbps_per_socket: float | None = None  # host memory bandwidth of one socket (STREAM-like), GB/s
    fit: dict | None = None  # [fit] of a calibrated profile: shapes fitted and held out, residuals per field
    validation: dict | None = None  # [validation]: measured |step error| per strategy / mechanism (validate --suite)
    # Copy mechanisms (sim/copies.py), each needed only by the mechanism that uses it.
    dma_half_size_kb: float | None = None  # piece size (KiB) at which one cudaMemcpyAsync reaches half the link rate
    dma_batch_descriptor_us: float | None = None  # cost per piece (descriptor) of cudaMemcpyBatchAsync
    gather_kernel_link_frac: float | None = None  # share of the link rate a zero-copy gather kernel reaches
    gather_kernel_sm_share: float | None = None  # share of the SMs a gather kernel occupies while it copies
    host_gather_chunk_mb: float | None = None  # pinned bounce chunk (MiB) the CPU fills before each DMA
    host_core_gflops: float | None = None  # fp32 FLOP rate of one host core on attention (GFLOP/s)
    host_roundtrip_us: float | None = None  # per-layer GPU -> host -> GPU synchronisation for host attention
    # Refinements of the compute roofline where measured (sim/costs.py): absent, the roofline stands as it is.
    attention_efficiency: float | None = None  # share in (0, 1] of the roofline attention kernels reach
    step_overhead_us: float | None = None  # per decode step outside the layers: sampling, scheduling
    # share in (0, 1] of the shorter of a kernel's memory and FLOP times hidden under the longer (1: the roofline's max)
    roofline_overlap: float | None = None
    # fixed cost per GEMM call beyond its bytes and FLOPs (a cold weight matrix's start on a CPU); absent: 0
    matmul_fixed_us: float | None = None
    # share by which every layer's compute slows while a per-layer copy engine runs beside it (its thread's wake-ups
    # and hand-offs; on CUDA also the events), beyond the copies' own time: charged to prefetch-layer; absent: 0
    copy_engine_slowdown: float | None = None
    # FP8 tensor-core rate (dense, no sparsity) where the GPU has FP8 tensor cores (compute capability >= 8.9): the
    # rate of W8A8 fp8 matmuls (sim/costs.py). Absent (Ampere and older): fp8 weights run weight-only at the bf16 rate.
    fp8_tflops_spec: float | None = None
    fp8_tflops_effective: float | None = None
    sources: dict[str, str] = field(default_factory=dict)  # numeric field -> where its number comes from
    path: str = ""  # the profile it was loaded from

    def __post_init__(self):
        where = self.path or f"hardware {self.name!r}"
        for key in _TEXT_FIELDS:
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise SpecError(f"{where}: field '{key}' is {getattr(self, key)!r}; accepted: a non-empty string")
        for key in hardware_numeric_fields():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise SpecError(f"{where}: field '{key}' is {value!r}; accepted: a finite number > 0")
        for key in _OPTIONAL_FIELDS:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf) or (
                    key in _COUNT_FIELDS and value != int(value)):
                kind = "a whole number >= 1" if key in _COUNT_FIELDS else "a finite number > 0"
                raise SpecError(f"{where}: field '{key}' is {value!r}; accepted: {kind}, or absent")
        for key in _FRACTION_FIELDS:
            value = getattr(self, key)
            if value is not None and (value > 1 or (key == "gather_kernel_sm_share" and value >= 1)):
                raise SpecError(f"{where}: field '{key}' is {value!r}; accepted: a share in (0, 1]"
                                + (" below 1" if key == "gather_kernel_sm_share" else ""))
        if self.duplex_factor > 1:
            raise SpecError(f"{where}: field 'duplex_factor' is {self.duplex_factor!r}; "
                            "accepted: 0 < duplex_factor <= 1")
        for measured, spec in (("hbm_gbps_effective", "hbm_gbps_spec"), ("bf16_tflops_effective", "bf16_tflops_spec")):
            if getattr(self, measured) > getattr(self, spec):
                raise SpecError(f"{where}: field '{measured}' = {getattr(self, measured)} exceeds {spec} = "
                                f"{getattr(self, spec)}; accepted: effective <= spec")
        if (self.fp8_tflops_spec is None) != (self.fp8_tflops_effective is None):
            raise SpecError(f"{where}: fields 'fp8_tflops_spec' and 'fp8_tflops_effective' go together; accepted: both "
                            "(a GPU with FP8 tensor cores) or neither")
        if self.fp8_tflops_spec is not None and self.fp8_tflops_effective > self.fp8_tflops_spec:
            raise SpecError(f"{where}: field 'fp8_tflops_effective' = {self.fp8_tflops_effective} exceeds "
                            f"fp8_tflops_spec = {self.fp8_tflops_spec}; accepted: effective <= spec")
        for key in _TABLE_FIELDS:
            if getattr(self, key) is not None and not isinstance(getattr(self, key), dict):
                raise SpecError(f"{where}: field '{key}' is {getattr(self, key)!r}; accepted: a table, or absent")
        for key in self.sources:
            if key not in hardware_numeric_fields() + _OPTIONAL_FIELDS:
                raise SpecError(f"{where}: sources names unknown field '{key}'; "
                                f"accepted: {', '.join(hardware_numeric_fields() + _OPTIONAL_FIELDS)}")
            if key in _OPTIONAL_FIELDS and getattr(self, key) is None:
                raise SpecError(f"{where}: sources names field '{key}', which has no value; "
                                "accepted: a source only for a field that is set")

    def h2d_gbps(self, pinned: bool) -> float:
        """Host-to-device bandwidth in GB/s from pinned or pageable host memory."""
        return self.h2d_gbps_pinned if pinned else self.h2d_gbps_pageable

    def d2h_gbps(self, pinned: bool) -> float:
        """Device-to-host bandwidth in GB/s into pinned or pageable host memory."""
        return self.d2h_gbps_pinned if pinned else self.d2h_gbps_pageable

    def host_ddr_gbps_per_gpu(self) -> tuple[float, str]:
        """This GPU's share of host DDR bandwidth (GB/s), all GPUs of the host offloading at once, and how it was found."""
        if None not in (self.sockets, self.ddr_gbps_per_socket, self.gpus_per_host):
            return (self.sockets * self.ddr_gbps_per_socket / self.gpus_per_host,
                    f"{self.sockets} sockets x {self.ddr_gbps_per_socket:g} GB/s shared by {self.gpus_per_host} GPUs")
        return self.ddr_gbps, "the profile gives no host topology: ddr_gbps taken as this GPU's whole share"

    def host_cores_per_gpu(self) -> float | None:
        """Host cores per GPU (all GPUs of the host using theirs), or None when the profile does not say."""
        if None in (self.sockets, self.cores_per_socket):
            return None
        return self.sockets * self.cores_per_socket / (self.gpus_per_host or 1)

    def error_bar(self, strategy: str) -> tuple[float | None, str | None]:
        """The measured error band of a prediction with this profile: (p90 |step error| %, where and when it was
        validated), the strategy's own where the suite measured it; (None, None) for an unvalidated profile."""
        v = self.validation
        if not v or "p90_abs_pct" not in v:
            return None, None
        own = (v.get("by_strategy") or {}).get(strategy)
        pct = own["p90_abs_pct"] if isinstance(own, dict) and "p90_abs_pct" in own else v["p90_abs_pct"]
        scope = "" if own else ", all strategies"
        return float(pct), f"{v.get('machine', 'unknown machine')}, {v.get('date', 'undated')}{scope}"

    def to_dict(self) -> dict[str, Any]:
        """Every field with its value, plus sources; HardwareSpec(**d) rebuilds it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["sources"] = dict(self.sources)
        return d

    def to_toml(self) -> str:
        """The profile file that loads back to this spec (a number without a source gets 'unknown')."""
        lines = [f"{key} = {json.dumps(getattr(self, key))}" for key in _TEXT_FIELDS]
        for key in hardware_numeric_fields():
            source = self.sources.get(key, "unknown")
            lines.append(f"{key} = {{ value = {float(getattr(self, key))!r}, source = {json.dumps(source)} }}")
        for key in _OPTIONAL_FIELDS:
            if (value := getattr(self, key)) is not None:
                value = int(value) if key in _COUNT_FIELDS else float(value)
                lines.append(f"{key} = {{ value = {value!r}, source = {json.dumps(self.sources.get(key, 'unknown'))} }}")
        for key in _TABLE_FIELDS:  # tables last: TOML puts every key after a [table] header into it
            if getattr(self, key):
                lines += ["", f"[{key}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in getattr(self, key).items()
                                             if v is not None]
        return "\n".join(lines) + "\n"


def hardware_numeric_fields() -> tuple[str, ...]:
    """Names of the numeric fields every hardware profile gives, each as { value, source }."""
    skip = _TEXT_FIELDS + _OPTIONAL_FIELDS + _TABLE_FIELDS + ("sources", "path")
    return tuple(f.name for f in dataclasses.fields(HardwareSpec) if f.name not in skip)


def hardware_optional_fields() -> tuple[str, ...]:
    """Names of the numeric fields a profile may leave out (NVLink, host topology), each as { value, source } when given."""
    return _OPTIONAL_FIELDS


def _profiles_dir():
    return files("tiersim.calibration") / "profiles"


def hardware_names() -> list[str]:
    """Names of the built-in hardware profiles."""
    return sorted(p.name.removesuffix(".toml") for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


def hardware_spec(name_or_path: str | Path) -> HardwareSpec:
    """A built-in hardware profile by name, or a profile TOML file by path."""
    if isinstance(name_or_path, str) and name_or_path in hardware_names():
        profile = _profiles_dir() / f"{name_or_path}.toml"
        return _parse_profile(profile.read_text(), str(profile))
    path = Path(name_or_path)
    if not (path.exists() or path.suffix == ".toml" or len(path.parts) > 1):
        raise SpecError(f"unknown hardware {str(name_or_path)!r}; accepted: a profile .toml path or one of "
                        f"{', '.join(hardware_names())}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; accepted: a hardware profile .toml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read ({e}); accepted: a readable hardware profile .toml") from None
    return _parse_profile(text, str(path))


def _parse_profile(text: str, where: str) -> HardwareSpec:
    """Check a profile's TOML text field by field; every numeric field is { value = N, source = "..." }."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{where}: invalid TOML ({e}); accepted: a hardware profile .toml") from None
    numeric = hardware_numeric_fields()
    required = _TEXT_FIELDS + numeric
    accepted = required + _OPTIONAL_FIELDS + _TABLE_FIELDS
    for key in data:
        if key not in accepted:
            raise SpecError(f"{where}: unknown field '{key}'; accepted: {', '.join(accepted)}")
    for key in required:
        if key not in data:
            raise SpecError(f"{where}: field '{key}' is missing; accepted fields: {', '.join(accepted)}")
    for key in _TEXT_FIELDS:
        if not isinstance(data[key], str) or not data[key]:
            raise SpecError(f"{where}: field '{key}' is {data[key]!r}; accepted: a non-empty string")
    form = '{ value = <number>, source = "<citation | measured: ... | assumption: ...>" }'
    values, sources = {}, {}
    for key in numeric + tuple(k for k in _OPTIONAL_FIELDS if k in data):
        entry = data[key]
        if not isinstance(entry, dict) or set(entry) - {"value", "source"} or "value" not in entry:
            raise SpecError(f"{where}: field '{key}' is {entry!r}; accepted: {form}")
        value, source = entry["value"], entry.get("source")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: field '{key}' value is {value!r}; accepted: a number")
        if not isinstance(source, str) or not source.strip():
            raise SpecError(f"{where}: field '{key}' has no source; accepted: {form}")
        whole = key in _COUNT_FIELDS and math.isfinite(value) and value == int(value)
        values[key], sources[key] = (int(value) if whole else float(value)), source
    for key in _TABLE_FIELDS:
        if key in data and not isinstance(data[key], dict):
            raise SpecError(f"{where}: field '{key}' is {data[key]!r}; accepted: a [{key}] table")
    tables = {k: data[k] for k in _TABLE_FIELDS if k in data}
    return HardwareSpec(**{k: data[k] for k in _TEXT_FIELDS}, **values, **tables, sources=sources, path=where)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(v: Any) -> str:
    """A value of a [fit] or [validation] table as TOML: numbers, strings, booleans, arrays and inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if isinstance(v, int) or math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise SpecError(f"cannot write {v!r} into a profile table; accepted: numbers, strings, booleans, lists, tables")


# Device names (as the driver reports them) to the built-in datasheet profile of that GPU.
DATASHEETS = ((r"GH200", "gh200"), (r"H200", "h200-sxm"), (r"H100.*PCIe", "h100-pcie"), (r"H100", "h100-sxm"),
              (r"A100", "a100-80g-sxm"), (r"B200", "b200"), (r"L40S", "l40s"), (r"4090", "rtx4090"),
              (r"5080", "rtx5080"))


def datasheet_for(device: dict) -> HardwareSpec | None:
    """The built-in datasheet profile of a CUDA device ({"kind", "name"} as hw.microbench reports it), or None."""
    if device.get("kind") != "cuda":
        return None
    for pattern, name in DATASHEETS:
        if re.search(pattern, device["name"], re.IGNORECASE):
            return hardware_spec(name)
    return None
