"""Probe scoring: known values on a hand-built model, tokenisation, batching, generation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from numerics import forward_tolerance
from repedit.errors import InvalidRequestError
from repedit.evaluation.scoring import (
    Probe,
    greedy_completion,
    next_token_probs,
    predictions,
    score_probes,
    tokenize_probe,
)
from repedit.models.tiny import TINY_FAMILIES, tiny_loaded

torch.set_num_threads(1)

# --------------------------------------------------------------------------- a hand-built LM

VOCAB = ["<pad>", "the", "sky", "is", "blue", "sea", "red", "green", "is_blue", "▁"]
ID = {w: i for i, w in enumerate(VOCAB)}


class WordTokenizer:
    """Whitespace word tokenizer; unknown words vanish. Options mimic real tokenizer quirks:
    ``bos`` prepends id 1 ("the") with special tokens, ``merge`` tokenises "is blue" as one
    piece (a boundary merge), ``dummy_prefix`` emits a blank piece for a leading space."""

    pad_token_id = 0
    eos_token_id = 0

    def __init__(self, *, bos: bool = False, merge: bool = False, dummy_prefix: bool = False):
        self.bos, self.merge, self.dummy_prefix = bos, merge, dummy_prefix
        self.padding_side = "right"

    def encode_one(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.merge:
            text = text.replace("is blue", "is_blue")
        ids = [ID[w] for w in text.split() if w in ID]
        if self.dummy_prefix and text.startswith(" "):
            ids = [ID["▁"], *ids]
        return ([ID["the"]] if self.bos and add_special_tokens else []) + ids

    def __call__(self, texts, add_special_tokens: bool = True):
        return {"input_ids": [self.encode_one(t, add_special_tokens) for t in texts]}

    def decode(self, ids):
        return " ".join(VOCAB[i] for i in ids).replace("▁", " ")


def _log_probs(**probs: float) -> torch.Tensor:
    """A next-token log-prob row: the named probabilities, the rest spread evenly."""
    p = torch.full((len(VOCAB),), (1.0 - sum(probs.values())) / (len(VOCAB) - len(probs)))
    for word, value in probs.items():
        p[ID[word]] = value
    return p.log()


class TableLM(nn.Module):
    """Next-token logits depend only on the current token: ``logits[b, t] = table[ids[b, t]]``."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.full((len(VOCAB), len(VOCAB)), -math.log(len(VOCAB)))
        table[ID["is"]] = _log_probs(blue=0.5, red=0.3)  # after "is": blue, then red
        table[ID["blue"]] = _log_probs(sky=0.4, sea=0.3)  # after "blue": sky beats sea
        self.table = nn.Parameter(table)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, use_cache=None, position_ids=None):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=self.table[input_ids])


def table_lm(tokenizer: WordTokenizer | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        model=TableLM(), tokenizer=tokenizer or WordTokenizer(), device=torch.device("cpu")
    )


def test_known_values_on_hand_built_model():
    lm = table_lm()
    half = Probe("the sky is", "blue sea", alt="red", test="efficacy")  # 2nd token wrong
    full = Probe("the sky is", "blue sky")
    s_half, s_full = score_probes(lm, [half, full], reference=[[4, 5], [4, 2]])

    assert s_half.target_tokens == [ID["blue"], ID["sea"]]
    assert s_half.pred_tokens == [ID["blue"], ID["sky"]]
    assert s_half.exact is False
    assert s_half.token_acc == pytest.approx(0.5)
    assert s_half.logprob == pytest.approx(math.log(0.5) + math.log(0.3), abs=1e-5)
    assert s_half.mean_logprob == pytest.approx((math.log(0.5) + math.log(0.3)) / 2, abs=1e-5)
    assert s_half.prob == pytest.approx(0.15, abs=1e-5)
    assert s_half.alt_logprob == pytest.approx(math.log(0.3), abs=1e-5)
    # The *sum* favours "red" (-1.20 > -1.90) but the per-token mean favours the target
    # (-0.95 > -1.20): beats_alt must use the mean, as ROME does.
    assert s_half.logprob < s_half.alt_logprob
    assert s_half.beats_alt is True
    assert s_half.agree == pytest.approx(0.5)  # reference [blue, sea] vs pred [blue, sky]

    assert s_full.exact is True and s_full.token_acc == 1.0
    assert s_full.alt_logprob is None and s_full.beats_alt is None
    assert s_full.agree == 1.0

    losing = score_probes(lm, [Probe("the sky is", "red", alt="blue")])[0]
    assert losing.beats_alt is False and losing.exact is False and losing.token_acc == 0.0
    assert score_probes(lm, [half])[0].agree is None


def test_predictions_and_next_token_probs_on_hand_built_model():
    lm = table_lm()
    probes = [Probe("the sky is", "blue sea", alt="red"), Probe("the sky is", "red")]
    assert predictions(lm, probes) == [[ID["blue"], ID["sky"]], [ID["blue"]]]
    probs = next_token_probs(lm, ["the sky is", "the sky is"], ["blue sea", "red"])
    assert probs == pytest.approx([0.5, 0.3], abs=1e-5)


def test_reference_must_match_probes():
    lm = table_lm()
    probe = Probe("the sky is", "blue sea")
    with pytest.raises(InvalidRequestError):
        score_probes(lm, [probe], reference=[])
    with pytest.raises(InvalidRequestError, match="reference has 1 tokens"):
        score_probes(lm, [probe], reference=[[4]])


# --------------------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("target", ["", "   ", "zzz qqq"])
def test_empty_target_raises_naming_the_probe(target):
    lm = table_lm()
    with pytest.raises(InvalidRequestError, match="the sky is") as info:
        score_probes(lm, [Probe("the sky is", "blue"), Probe("the sky is", target, test="loc")])
    assert "loc" in str(info.value)


def test_empty_alt_raises():
    with pytest.raises(InvalidRequestError, match="alt="):
        score_probes(table_lm(), [Probe("the sky is", "blue", alt=" ")])


def test_bos_only_on_prompt():
    tok = WordTokenizer(bos=True)
    assert tokenize_probe(tok, "sky is", "blue sea") == ([ID["the"], 2, 3], [4, 5])


def test_boundary_merge_falls_back_to_separate_target():
    # Joint "sky is blue" -> [sky, is_blue] does not start with the prompt's [sky, is].
    assert tokenize_probe(WordTokenizer(merge=True), "sky is", "blue") == ([2, 3], [4])
    # A SentencePiece-like dummy prefix piece in front of " blue" is dropped.
    tok = WordTokenizer(merge=True, dummy_prefix=True)
    assert tokenize_probe(tok, "sky is", "blue") == ([2, 3], [4])


def test_fed_sequence_is_prompt_plus_target_ids():
    lm = tiny_loaded("gpt2")
    tok = lm.tokenizer
    seen = []
    hook = lm.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    try:
        score_probes(lm, [Probe("The capital of France is", "Paris")], batch_size=1)
    finally:
        hook.remove()
    p_ids, t_ids = tokenize_probe(tok, "The capital of France is", "Paris")
    assert p_ids == tok("The capital of France is")["input_ids"]
    assert t_ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert seen[0][0].tolist() == p_ids + t_ids


def test_bos_tokenizer_on_tiny_model():
    from tokenizers import processors

    lm = tiny_loaded("llama")
    tok = lm.tokenizer
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)]
    )  # BOS in front *and* EOS behind: only the BOS may be kept
    p_ids, t_ids = tokenize_probe(tok, "Toyota was founded in", "Japan")
    assert p_ids[0] == 0 and 0 not in p_ids[1:] and 0 not in t_ids
    assert p_ids[1:] == tok("Toyota was founded in", add_special_tokens=False)["input_ids"]
    assert t_ids == tok(" Japan", add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- batching

PROBES = [
    Probe("The capital of France is", "Paris", alt="Berlin"),
    Probe("Rome is", "the capital of Italy"),
    Probe("The mother tongue of Michel Rocard is", "French", alt="English"),
    Probe("Toyota was founded in", "Japan and Europe"),
    Probe("Lionel Messi plays", "football", alt="tennis for Barcelona"),
]


def _naive(lm, probe: Probe, shift: int = 0) -> tuple[list[float], list[int]]:
    """Unbatched, full-logits reference: log-probs and argmax at the target positions
    (``shift`` moves the read positions: a test's off-by-one bug)."""
    p_ids, t_ids = tokenize_probe(lm.tokenizer, probe.prompt, probe.target)
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    start = len(p_ids) - 1 + shift
    rows = logp[start : start + len(t_ids)]
    return rows[torch.arange(len(t_ids)), t_ids].tolist(), rows.argmax(-1).tolist()


def _logprob_tol(lm, logprob: float, n_tokens: int) -> float:
    """A target's summed log-prob from two forwards (batched and padded, or alone): every
    block and the head, on log-probs of this size from logits of order one per token."""
    magnitude = abs(logprob) + n_tokens
    return forward_tolerance(lm.arch, blocks=lm.arch.n_layers, magnitude=magnitude)


@pytest.mark.numerics
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_equals_unbatched(family):
    lm = tiny_loaded(family)
    batched = score_probes(lm, PROBES, batch_size=4)  # several batches, mixed lengths
    single = [score_probes(lm, [p], batch_size=1)[0] for p in PROBES]
    for b, s, probe in zip(batched, single, PROBES, strict=True):
        assert b.pred_tokens == s.pred_tokens
        assert b.target_tokens == s.target_tokens
        tol = _logprob_tol(lm, s.logprob, len(s.target_tokens))
        assert b.logprob == pytest.approx(s.logprob, abs=tol)
        assert b.token_acc == s.token_acc and b.exact == s.exact
        assert (b.alt_logprob is None) == (s.alt_logprob is None)
        if b.alt_logprob is not None:
            alt_tol = _logprob_tol(
                lm, s.alt_logprob, len(tokenize_probe(lm.tokenizer, probe.prompt, probe.alt)[1])
            )
            assert b.alt_logprob == pytest.approx(s.alt_logprob, abs=alt_tol)
            assert b.beats_alt == s.beats_alt
        ref_logp, ref_pred = _naive(lm, probe)
        assert b.pred_tokens == ref_pred
        assert b.logprob == pytest.approx(sum(ref_logp), abs=tol)
    # Scoring against its own predictions is full agreement.
    again = score_probes(lm, PROBES, reference=[s.pred_tokens for s in single])
    assert [s.agree for s in again] == [1.0] * len(PROBES)


@pytest.mark.numerics
@pytest.mark.parametrize("bug", ["off by one", "dropped token"])
def test_scoring_comparison_catches_a_bug(bug: str) -> None:
    """A reference read one position late, or missing its last target token, differs from
    the batched scores by more than the derived tolerance, for every probe."""
    lm = tiny_loaded("llama")
    for b, probe in zip(score_probes(lm, PROBES, batch_size=4), PROBES, strict=True):
        logp, _ = _naive(lm, probe, shift=1 if bug == "off by one" else 0)
        wrong = sum(logp) if bug == "off by one" else sum(logp[:-1])
        assert abs(b.logprob - wrong) > _logprob_tol(lm, b.logprob, len(b.target_tokens))


def test_lm_head_sees_only_target_positions():
    lm = tiny_loaded("gemma2")
    shapes = []
    hook = lm.arch.lm_head().register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    try:
        score_probes(lm, [Probe("The capital of France is", "Paris and Berlin")])
    finally:
        hook.remove()
    n_target = len(tokenize_probe(lm.tokenizer, "x", "Paris and Berlin")[1])
    assert shapes == [torch.Size([1, n_target, lm.model.config.vocab_size])]


# --------------------------------------------------------------------------- generation

PROMPTS = ["The capital of France is", "Rome", "The mother tongue of Michel Rocard is"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_completion_batched_equals_unbatched(family):
    lm = tiny_loaded(family)
    lm.tokenizer.padding_side = "right"
    batched = greedy_completion(lm, PROMPTS, max_new_tokens=6)
    assert lm.tokenizer.padding_side == "right"
    single = [greedy_completion(lm, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert all(text for text in batched)
    # Consistent with teacher-forced scoring: the first greedy token is the argmax.
    ids = lm.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        first = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    assert batched[0].startswith(lm.tokenizer.decode([first]))


def test_padding_side_restored_after_error():
    lm = tiny_loaded("gpt2")
    lm.tokenizer.padding_side = "right"
    with pytest.raises(Exception):  # noqa: B017 - any failure inside generation
        greedy_completion(lm, [None])  # type: ignore[list-item]
    assert lm.tokenizer.padding_side == "right"
