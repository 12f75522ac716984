"""tiersim: a discrete-event simulator of a tiered GPU KV-cache hierarchy, and its hardware validator."""

from tiersim.version import __version__

__all__ = ["__version__"]
