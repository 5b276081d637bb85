"""Tiny random-weight models of every registered family, built in-process (no download).

They exist for tests: same module layout as the real families, a few thousand parameters,
and a small byte-level BPE tokenizer trained on a built-in text so subjects span several tokens.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from repedit.models.registry import REGISTRY

TINY_FAMILIES: tuple[str, ...] = tuple(REGISTRY)

_TRAINING_TEXT = (
    """
The capital of France is Paris. The capital of Germany is Berlin. Slovenia is located in Europe.
Toyota was founded in Japan. The Eiffel Tower is in Paris. Danielle Darrieux speaks French.
Microsoft Office Mobile was created by Microsoft. The mother tongue of Michel Rocard is French.
Antarctica is a continent. Rome is the capital of Italy. Apple was founded by Steve Jobs.
Lionel Messi plays football for Barcelona. The Republic of Slovenia borders Italy and Austria.
"""
    * 4
)

_N_EMBD, _N_MLP, _N_LAYER, _N_HEAD, _VOCAB = 64, 128, 4, 4, 384


def tiny_tokenizer(vocab_size: int = _VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few sentences, in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return fast


def _config_kwargs(family: str, vocab: int) -> dict:
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if family == "gpt2":
        return {
            **common,
            "n_embd": _N_EMBD,
            "n_inner": _N_MLP,
            "n_layer": _N_LAYER,
            "n_head": _N_HEAD,
            "n_positions": 512,
        }
    if family == "gptj":
        return {
            **common,
            "n_embd": _N_EMBD,
            "n_inner": _N_MLP,
            "n_layer": _N_LAYER,
            "n_head": _N_HEAD,
            "n_positions": 512,
            "rotary_dim": 8,
        }
    if family == "gpt_neox":
        return {
            **common,
            "hidden_size": _N_EMBD,
            "intermediate_size": _N_MLP,
            "num_hidden_layers": _N_LAYER,
            "num_attention_heads": _N_HEAD,
            "max_position_embeddings": 512,
        }
    kw = {
        **common,
        "hidden_size": _N_EMBD,
        "intermediate_size": _N_MLP,
        "num_hidden_layers": _N_LAYER,
        "num_attention_heads": _N_HEAD,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "head_dim": _N_EMBD // _N_HEAD,
    }
    if family.startswith("gemma"):
        kw["head_dim"] = 16
    if family in ("gemma2", "gemma3_text"):
        kw["sliding_window"] = 64
    return kw


def tiny_model(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight ``*ForCausalLM`` of ``family`` with 4 layers, d_model 64, d_mlp 128."""
    if family not in REGISTRY:
        raise ValueError(f"no tiny model for {family!r}; families: {', '.join(TINY_FAMILIES)}")
    config = AutoConfig.for_model(family, **_config_kwargs(family, _VOCAB))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init at std 0.02 gives near-uniform next-token distributions; a larger scale makes
    # the tiny models opinionated enough that edits visibly change their predictions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def tiny_loaded(family: str = "llama", *, seed: int = 0):
    """A tiny model wrapped like ``load_model`` returns it (model + tokenizer + fingerprint)."""
    from repedit.models.loading import LoadedModel

    return LoadedModel(tiny_model(family, seed=seed), tiny_tokenizer(), name=f"tiny-{family}")
