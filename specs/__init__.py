"""What a model and a GPU are, as numbers: `ModelSpec` (built-in table or any HF config.json, in
specs/models.py) and `HardwareSpec` (TOML profiles in calibration/profiles/, every number with its
source, in specs/hardware.py).

Units: GB = 1e9 bytes, GB/s = 1e9 B/s, TFLOP/s = 1e12 FLOP/s, everywhere.
"""

from tiersim.specs.hardware import HardwareSpec, hardware_names, hardware_numeric_fields, hardware_spec
from tiersim.specs.models import MODELS, PUBLISHED_PARAMS, ModelSpec, model_names, model_spec

__all__ = [
    "MODELS",
    "PUBLISHED_PARAMS",
    "HardwareSpec",
    "ModelSpec",
    "hardware_names",
    "hardware_numeric_fields",
    "hardware_spec",
    "model_names",
    "model_spec",
]
