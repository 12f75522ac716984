"""What a model, a GPU and a deployment are, as numbers: `ModelSpec` (dense, MoE, MLA, hybrid attention;
built-in table in specs/catalog.py or any local HF config.json via specs/hf_config.py), `HardwareSpec`
(TOML profiles in calibration/profiles/, every number with its source, in specs/hardware.py) and
`Deployment` (TP/EP/DP, KV and weight dtypes, and the per-GPU sizes that follow, in specs/deployment.py).

Units: GB = 1e9 bytes, GB/s = 1e9 B/s, TFLOP/s = 1e12 FLOP/s, everywhere.
"""

from tiersim.specs.catalog import MODELS, PUBLISHED_ACTIVE_PARAMS, PUBLISHED_PARAMS, model_names, model_spec
from tiersim.specs.deployment import KV_DTYPE_BYTES, VLLM_FLAGS, WEIGHT_DTYPE_BITS, Deployment, PerGPU, per_gpu
from tiersim.specs.families import FULL, SLIDING, KVLayerGroup, MLASpec, MoESpec
from tiersim.specs.hardware import (
    HardwareSpec,
    hardware_names,
    hardware_numeric_fields,
    hardware_optional_fields,
    hardware_spec,
)
from tiersim.specs.models import PARAM_GROUPS, ModelSpec

__all__ = [
    "FULL",
    "KV_DTYPE_BYTES",
    "MODELS",
    "PARAM_GROUPS",
    "PUBLISHED_ACTIVE_PARAMS",
    "PUBLISHED_PARAMS",
    "SLIDING",
    "VLLM_FLAGS",
    "WEIGHT_DTYPE_BITS",
    "Deployment",
    "HardwareSpec",
    "KVLayerGroup",
    "MLASpec",
    "MoESpec",
    "ModelSpec",
    "PerGPU",
    "hardware_names",
    "hardware_numeric_fields",
    "hardware_optional_fields",
    "hardware_spec",
    "model_names",
    "model_spec",
    "per_gpu",
]
