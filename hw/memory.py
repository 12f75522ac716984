"""The replay's memory budget: what a plan allocates on the device and in host memory, checked against what is
free (torch on CUDA, /proc/meminfo on the host) before anything is allocated."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tiersim.errors import TiersimError
from tiersim.hw.config import ReplayConfig
from tiersim.hw.kernels import activation_width
from tiersim.hw.plan import kv_geometry
from tiersim.workload.build import COL, Workload

GB = 1e9
BOUNCE_ROWS = 1 << 15  # rows per pinned bounce buffer: the chunk the host gathers while the DMA runs


def meminfo_bytes(key: str, sysconf_pages: str) -> float:
    """A /proc/meminfo field ("MemTotal", "MemAvailable") in bytes; sysconf pages where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf(sysconf_pages))


def mem_total_bytes() -> float:
    """Installed RAM (MemTotal)."""
    return meminfo_bytes("MemTotal", "SC_PHYS_PAGES")


def mem_available_bytes() -> float:
    """RAM available to a new allocation without swapping (MemAvailable)."""
    return meminfo_bytes("MemAvailable", "SC_AVPHYS_PAGES")


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """Bytes the replay allocates on the device and in host memory, by part."""

    device: dict[str, float]
    host: dict[str, float]

    @property
    def device_bytes(self) -> float:
        """Everything on the device."""
        return float(sum(self.device.values()))

    @property
    def host_bytes(self) -> float:
        """Everything in host memory (pinned on CUDA)."""
        return float(sum(self.host.values()))

    def describe(self, part: str) -> str:
        """One line: the parts in GB."""
        parts = self.device if part == "device" else self.host
        return ", ".join(f"{k} {v / GB:.2f}" for k, v in parts.items() if v)


def memory_need(cfg: ReplayConfig, workload: Workload) -> MemoryNeed:
    """Weights, T0 pools, sliding-window rings, staging, landing and re-tier buffers and activations on the device;
    the DDR pool, bounce and re-tier buffers on the host. From the workload's tier counts alone, so a replay that
    cannot fit is refused before it is planned. Per layer group (hw/plan.KVGeometry): only full-attention layers
    have T0 and host pools, sliding layers a ring of `window` tokens per slot; a row is one KV head's K or V (MLA:
    the latent and rope key, one part). The copy buffers are hw.copies.Copier's: a landing buffer of parts x
    staged rows for the CUDA dma paths, and parts x the most rows one step demotes (promotes) on the device and, on
    CUDA, in host memory (pinned when the pool is)."""
    m, dt, strategy = cfg.model, cfg.model.dtype_bytes, cfg.strategy_record
    geo = kv_geometry(m)
    full, sliding, parts = len(geo.full_layers), len(geo.sliding_layers), geo.parts
    tables, totals = workload.tables, workload.totals
    resident = tables[..., COL["hbm"] if strategy.applies_policy else COL["tokens"]].max()
    chunks = -(-int(resident) // cfg.chunk)
    t0_rows = cfg.batch * chunks * geo.heads * cfg.chunk
    staged_rows = int(totals[:, COL["ddr"]].max()) * geo.heads if strategy.prefetches else 0
    # A re-tier decided at the end of step k moves in step k + 1; the most one step moves, every slot together.
    moved = lambda name: int(totals[:, COL[name]].max()) * geo.heads if strategy.keeps_ddr else 0  # noqa: E731
    demote_rows, promote_rows = moved("hbm_to_ddr"), moved("ddr_to_hbm")
    row = geo.width * dt
    tokens = int((totals[:, COL["decode"]] + totals[:, COL["prefill_tokens"]]).max())
    prompt = int(tables[:, 0, COL["prefill_tokens"]].max())
    scores = cfg.batch * m.attention_heads * (int(tables[..., COL["tokens"]].max()) + 2 * cfg.chunk) * 4 * 3
    causal = cfg.batch * m.attention_heads * prompt * prompt * 4
    landing = cfg.cuda and cfg.pinned and cfg.copy_method in ("dma", "dma-batched") and staged_rows > 0
    device = {"weights": m.layers * m.layer_weight_bytes + m.vocab * m.hidden * dt,
              "T0 pools": parts * t0_rows * row * full,
              "sliding windows": parts * cfg.batch * geo.heads * (geo.window or 0) * row * sliding,
              "staging": cfg.staging_buffers * parts * staged_rows * row,
              "landing": parts * max(1, staged_rows) * row if landing else 0,
              "re-tier buffers": parts * (demote_rows + promote_rows) * row,
              "activations": tokens * activation_width(m) * dt * 2 + scores + causal + cfg.batch * m.vocab * dt}
    host = {}
    if strategy.keeps_ddr:
        positions = max(s.prompt_tokens + s.steps for s in workload.schedules) + 1
        host["DDR pool"] = parts * cfg.batch * geo.heads * positions * row * full
        if cfg.cuda and cfg.pinned:
            host["bounce buffers"] = 2 * BOUNCE_ROWS * row
        if cfg.cuda:  # the DMA's side of demotions (pinned only) and promotions
            host["re-tier buffers"] = parts * ((demote_rows if cfg.pinned else 0) + promote_rows) * row
        if not cfg.pinned:
            host["pageable gather"] = parts * staged_rows * row
    return MemoryNeed(device, host)


def available_memory(device: str) -> tuple[float, float, str, str]:
    """(device bytes free, host bytes available, device label, host label); on CPU both are host RAM."""
    host = mem_available_bytes()
    if device.startswith("cuda"):
        import torch  # lazy: `import tiersim.hw` stays torch-free

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free), host, f"{device} free", "host MemAvailable"
    return host, host, "host MemAvailable (the CPU device is host RAM)", "host MemAvailable"


def check_memory(cfg: ReplayConfig, need: MemoryNeed) -> None:
    """Refuse, before allocating, a replay that does not fit (device and host; on CPU their sum in RAM)."""
    dev_free, host_free, dev_label, host_label = available_memory(cfg.device)
    hint = "lower --batch, --gen-tokens or --layers"
    if cfg.cuda:
        if need.device_bytes > dev_free:
            raise TiersimError(f"the replay needs {need.device_bytes / GB:.2f} GB of device memory "
                               f"({need.describe('device')}) but {dev_label} is {dev_free / GB:.2f} GB; {hint}")
        if need.host_bytes > host_free:
            raise TiersimError(f"the replay needs {need.host_bytes / GB:.2f} GB of host memory "
                               f"({need.describe('host')}) but {host_label} is {host_free / GB:.2f} GB; {hint}")
        return
    total = need.device_bytes + need.host_bytes
    if total > 0.9 * host_free:
        raise TiersimError(f"the replay needs {total / GB:.2f} GB of RAM (device side: {need.describe('device')}; "
                           f"host side: {need.describe('host') or 'none'}) but {dev_label} is "
                           f"{host_free / GB:.2f} GB (90% usable); {hint}")
