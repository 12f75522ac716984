"""tiersim: a discrete-event simulator of a tiered GPU KV-cache hierarchy, and its hardware validator.

The Python API (tiersim/api.py) is reached from here without importing it up front (PEP 562), so
`import tiersim` stays light: `tiersim.simulate(model="r1-qwen-14b", hardware="h200-sxm", batch=128)`.
`tiersim.validation` is api.validate: the name `tiersim.validate` is the module validate.py.
"""

from tiersim.version import __version__

_API = {"simulate": "simulate", "search": "search", "advise": "advise", "scaling": "scaling", "sweep": "sweep",
        "capture": "capture", "calibrate": "calibrate", "validation": "validate",
        "reproduce_prototype": "reproduce_prototype"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Load tiersim.api on first use of one of its functions."""
    if name in _API:
        from tiersim import api

        return getattr(api, _API[name])
    raise AttributeError(f"module 'tiersim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
