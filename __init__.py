"""tiersim: a discrete-event simulator of a tiered GPU KV-cache hierarchy, and its hardware validator."""

__version__ = "0.1.0"
