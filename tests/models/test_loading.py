"""Model loading (dtype resolution, local directories, error messages) and fingerprints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from repedit.errors import ModelLoadError, UnsupportedArchitectureError
from repedit.models import LoadedModel, load_model, model_fingerprint
from repedit.models.loading import _resolve_dtype, resolve_model_path
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded, tiny_model, tiny_tokenizer

# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        (None, "cpu", torch.float32),
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("auto", "cuda:1", torch.bfloat16),
        (None, "cuda", torch.bfloat16),
        ("auto", "mps", torch.float32),
        ("float32", "cuda", torch.float32),
        ("fp32", "cpu", torch.float32),
        ("float16", "cpu", torch.float16),
        ("fp16", "cpu", torch.float16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
        (torch.float64, "cpu", torch.float64),
        (torch.float16, "cuda", torch.float16),
    ],
)
def test_resolve_dtype(dtype: object, device: str, expected: torch.dtype) -> None:
    assert _resolve_dtype(dtype, device) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["float8", "half", "int8", ""])
def test_resolve_dtype_rejects_unknown(bad: str) -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype") as info:
        _resolve_dtype(bad, "cpu")
    assert "bfloat16" in str(info.value)


# --------------------------------------------------------------------------- local directory


def _save_tiny(family: str, where: Path) -> torch.nn.Module:
    model = tiny_model(family, seed=5)
    model.save_pretrained(where)
    tiny_tokenizer().save_pretrained(where)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_local_directory_round_trip(family: str, tmp_path: Path, tmp_cache: Path) -> None:
    original = _save_tiny(family, tmp_path / "model")
    lm = load_model(str(tmp_path / "model"), device="cpu")
    assert isinstance(lm, LoadedModel)
    assert lm.name == str(tmp_path / "model")
    assert lm.dtype == torch.float32
    assert lm.device == torch.device("cpu")
    assert lm.n_layers == 4
    assert not lm.model.training
    assert lm.fingerprint == model_fingerprint(original)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 1
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, original(ids).logits)
    for a, b in zip(lm.model.state_dict().values(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert list(tmp_cache.iterdir()) == []  # a plain directory is not copied into the cache


def test_local_directory_dtype_and_pathlike(tmp_path: Path, tmp_cache: Path) -> None:
    original = _save_tiny("qwen2", tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu", dtype="bf16")
    assert lm.dtype == torch.bfloat16
    # the fingerprint is dtype-independent, so a bf16 load matches the float32 original
    assert lm.fingerprint == model_fingerprint(original)


def test_loaded_model_sets_missing_pad_token(tmp_path: Path, tmp_cache: Path) -> None:
    _save_tiny("gpt2", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    lm = load_model(str(tmp_path / "m"), device="cpu")
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id


def test_missing_gguf_file(tmp_path: Path, tmp_cache: Path) -> None:
    missing = tmp_path / "nowhere" / "model.Q4_K_M.gguf"
    with pytest.raises(ModelLoadError, match="GGUF file not found") as info:
        load_model(str(missing), device="cpu")
    assert str(missing) in str(info.value)
    with pytest.raises(ModelLoadError):
        resolve_model_path(str(missing))


def test_directory_that_is_not_a_model(tmp_path: Path, tmp_cache: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load model from") as info:
        load_model(str(tmp_path / "empty"), device="cpu")
    assert str(tmp_path / "empty") in str(info.value)


def test_unsupported_family_in_a_local_directory(tmp_path: Path, tmp_cache: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "opt",
        vocab_size=384,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    tiny_tokenizer().save_pretrained(tmp_path / "opt")
    with pytest.raises(UnsupportedArchitectureError, match="'opt'"):
        load_model(str(tmp_path / "opt"), device="cpu")


def test_unreachable_hub_id_suggests_a_local_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_cache: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time; make sure it is in force here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # the id must not resolve to a folder by accident
    spec = "repedit-tests/no-such-model-anywhere"
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, device="cpu")
    message = str(info.value)
    assert repr(spec) in message
    assert "local directory" in message
    assert "smollm2-135m" in message


# --------------------------------------------------------------------------- fingerprint


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fingerprint_stable_and_seed_dependent(family: str) -> None:
    a = model_fingerprint(tiny_model(family, seed=0))
    assert a == model_fingerprint(tiny_model(family, seed=0))
    assert a != model_fingerprint(tiny_model(family, seed=1))
    assert len(a) == 16
    int(a, 16)


def test_fingerprint_differs_between_families() -> None:
    prints = {model_fingerprint(tiny_model(f)) for f in TINY_FAMILIES}
    assert len(prints) == len(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fingerprint_same_for_bfloat16_copy(family: str) -> None:
    model = tiny_model(family)
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == model_fingerprint(model)


@pytest.mark.xfail(
    strict=True,
    reason="float32 -> float16 -> bfloat16 double rounding differs from float32 -> bfloat16 for "
    "some sampled values, so a float16 copy gets another fingerprint (the fingerprint "
    "docstring claims float16 matches too)",
)
def test_fingerprint_same_for_float16_copy() -> None:
    model = tiny_model("llama")
    assert model_fingerprint(copy.deepcopy(model).to(torch.float16)) == model_fingerprint(model)


def test_fingerprint_sees_a_config_change() -> None:
    model = tiny_model("llama")
    before = model_fingerprint(model)
    model.config.rms_norm_eps = 1e-3
    assert model_fingerprint(model) != before


def test_loaded_model_keeps_base_fingerprint_after_edit() -> None:
    lm = tiny_loaded("gpt2", seed=3)
    base = lm.fingerprint
    assert base == model_fingerprint(tiny_model("gpt2", seed=3))
    torch.manual_seed(0)
    u, v = torch.randn(lm.arch.d_model, 1), torch.randn(1, lm.arch.d_mlp)
    with torch.no_grad():
        lm.arch.weight(2).add_(lm.arch.to_storage(u @ v))  # a rank-one edit
    assert model_fingerprint(lm.model) != base  # the edited weights do hash differently
    assert lm.fingerprint == base  # but the LoadedModel keeps the base model's identity
