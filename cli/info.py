"""What tiersim knows and keeps: `specs` (models and hardware profiles) and `cache` (reused tier schedules)."""

from __future__ import annotations

from tiersim.cli.group import cli
from tiersim.cli.options import hardware_option, json_option, model_option
from tiersim.cli.output import emit_json, new_table, print_table, say


@cli.command()
@model_option(None, multiple=True, help="Also show this model (repeatable).")
@hardware_option(None, multiple=True, help="Also show this hardware profile (repeatable).")
@json_option
def specs(model: tuple[str, ...], hardware: tuple[str, ...], json_out: str | None) -> None:
    """Show built-in models and hardware profiles (and yours)."""
    from tiersim.specs import hardware_names, hardware_spec, model_names, model_spec

    models = {m.name: m for m in (model_spec(n) for n in [*model_names(), *model])}
    profiles = {h.name: h for h in (hardware_spec(n) for n in [*hardware_names(), *hardware])}
    if emit_json(json_out, {"models": {k: {**m.to_dict(), "kind": model_kind(m)} for k, m in models.items()},
                            "hardware": {k: h.to_dict() for k, h in profiles.items()}}):
        return
    # New columns go last: scripts read the earlier ones by position.
    t = new_table("models (KV bytes per token at the model's dtype; growing: the layers that keep every token)",
                  ("name", "layers", "heads", "kv heads", "head dim", "hidden", "params (B)", "weights (GB)", "KV B/token",
                   "KV B/token, paper formula", "kind", "active params (B)", "KV B/token growing"),
                  left=("name", "kind"))
    for m in models.values():
        t.add_row(m.name, str(m.layers), str(m.attention_heads), str(m.kv_heads), str(m.head_dim), str(m.hidden),
                  f"{m.params / 1e9:.3f}", f"{m.weight_bytes / 1e9:.2f}", f"{m.kv_bytes_per_token:,}",
                  f"{m.kv_bytes_per_token_paper:,}", model_kind(m), f"{m.active_params / 1e9:.3f}",
                  f"{m.kv_bytes_per_token_global:,}")
    print_table(t)
    t = new_table("hardware (GB = 1e9 B; see each profile's sources with --json)",
                  ("name", "HBM GB", "HBM GB/s spec / eff.", "bf16 TFLOP/s spec / eff.", "link", "H2D / D2H GB/s pinned",
                   "H2D / D2H GB/s pageable", "copy µs", "duplex", "DDR GB", "DDR GB/s", "NVLink GB/s", "GPUs/host"),
                  left=("name", "link"))
    dash = lambda v: "—" if v is None else f"{v:g}"  # noqa: E731  (a profile without NVLink or host data)
    for h in profiles.values():
        t.add_row(h.name, f"{h.hbm_gb:g}", f"{h.hbm_gbps_spec:g} / {h.hbm_gbps_effective:g}",
                  f"{h.bf16_tflops_spec:g} / {h.bf16_tflops_effective:g}", h.link,
                  f"{h.h2d_gbps_pinned:g} / {h.d2h_gbps_pinned:g}", f"{h.h2d_gbps_pageable:g} / {h.d2h_gbps_pageable:g}",
                  f"{h.copy_latency_us:g}", f"{h.duplex_factor:g}", f"{h.ddr_gb:g}", f"{h.ddr_gbps:g}",
                  dash(h.nvlink_gbps), dash(h.gpus_per_host))
    print_table(t)


def model_kind(m) -> str:
    """dense, or what the model has beyond a dense transformer: MoE (experts), MLA (latent KV), hybrid (sliding layers)."""
    parts = [name for name, has in (("MoE", m.moe), ("MLA", m.mla), ("hybrid", m.sliding_layers)) if has]
    return " + ".join(parts) or "dense"


@cli.group()
def cache() -> None:
    """The on-disk cache of tier schedules and fits: info, clear."""


@cache.command("info")
@json_option
def cache_info(json_out: str | None) -> None:
    """Where the cache is, its entries and bytes, and its size limit."""
    from tiersim.workload.cache import cache_info as info

    i = info()
    if emit_json(json_out, i):
        return
    t = new_table("schedule and fit cache (TIERSIM_CACHE_DIR moves it, TIERSIM_CACHE=0 turns it off)",
                  ("folder", "entries", "MB", "limit MB"), left=("folder",))
    mb = lambda b: "—" if b is None else f"{b / 1e6:,.1f}"  # noqa: E731
    t.add_row(str(i["dir"]) if i["dir"] is not None else "off", str(i["entries"]), mb(i["bytes"]), mb(i["limit"]))
    print_table(t)


@cache.command("clear")
def cache_clear() -> None:
    """Remove every cached entry (they are recomputed when needed)."""
    from tiersim.workload.cache import cache_clear as clear
    from tiersim.workload.cache import cache_info as info

    folder = info()["dir"]
    say(f"removed {clear()} entries from {folder}")
