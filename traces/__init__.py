"""Attention traces: the on-disk format (read, write, validate) and the synthetic generator."""

from tiersim.traces.format import (
    FORMAT_VERSION,
    Request,
    Trace,
    increments_length,
    page_offsets,
    read_trace,
    row_offset,
    trace_summary,
    write_trace,
)
from tiersim.traces.synth import SynthParams, synth_request, synth_requests, write_synth_trace

__all__ = [
    "FORMAT_VERSION",
    "Request",
    "SynthParams",
    "Trace",
    "increments_length",
    "page_offsets",
    "read_trace",
    "row_offset",
    "synth_request",
    "synth_requests",
    "trace_summary",
    "write_synth_trace",
    "write_trace",
]
