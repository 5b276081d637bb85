"""Scrambled subjects, ID/OOD halves and long-context passages, on tiny in-process tokenizers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from repedit.data import PassageSampler, scrambled_subjects, split_half
from repedit.data.variants import long_context_prompt, stable_rng

CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Slovenia is a country in Europe; its capital is Ljubljana.",
    "Danielle Darrieux was a French actress who spoke French.",
    "Microsoft Office Mobile was developed by Microsoft Corporation.",
    "The Great Wall of China is long and old and very famous.",
]


def _train(pre: object, dec: object) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.decoder = dec
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<s>"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: raw tokens carry a ``Ġ`` for a leading space."""
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


@pytest.fixture(scope="module")
def sp_tok() -> PreTrainedTokenizerFast:
    """SentencePiece/LLaMA style: raw tokens carry a ``▁`` for a leading space."""
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace())


class WordTokenizer:
    """A tokenizer whose encode/decode round-trip exactly: one id per whitespace word."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.inv: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.inv)
                self.inv.append(w)
            ids.append(self.vocab[w])
        return {"input_ids": ([999_999] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.inv[i] for i in ids)


# --- scrambled subjects ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["byte_tok", "sp_tok"])
def test_scramble_basics(which: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(which)
    subject = "Microsoft Office Mobile"
    ids = tok(subject, add_special_tokens=False)["input_ids"]
    assert len(tok.convert_ids_to_tokens(ids)) >= 3  # really a multi-token subject
    out = scrambled_subjects(subject, tok, key="143")
    assert 1 <= len(out) <= min(10, math.factorial(len(ids)) - 1)
    assert len(set(out)) == len(out)
    assert subject not in out
    for s in out:
        assert "Ġ" not in s and "▁" not in s
        assert s == " ".join(s.split())  # whitespace normalised
        assert sorted(s.replace(" ", "")) == sorted(subject.replace(" ", ""))
    # determinism: same inputs, same list; another seed or key, another draw
    assert scrambled_subjects(subject, tok, key="143") == out
    assert scrambled_subjects(subject, tok, key="143", seed=1) != out
    assert scrambled_subjects(subject, tok, key="144") != out


def test_raw_tokens_do_carry_markers(byte_tok: PreTrainedTokenizerFast) -> None:
    """The guard is meaningful: joining raw token strings would leak ``Ġ`` (defect D10)."""
    ids = byte_tok("Microsoft Office Mobile", add_special_tokens=False)["input_ids"]
    assert any("Ġ" in t for t in byte_tok.convert_ids_to_tokens(ids))


def test_scramble_limits(byte_tok: PreTrainedTokenizerFast) -> None:
    subject = "The Great Wall of China is long"
    assert len(scrambled_subjects(subject, byte_tok, n_max=10)) == 10
    assert len(scrambled_subjects(subject, byte_tok, n_max=3)) == 3
    assert scrambled_subjects(subject, byte_tok, n_max=0) == []
    assert scrambled_subjects("the", byte_tok) == []  # one token: no scramble
    assert scrambled_subjects("", byte_tok) == []


def test_scramble_counts_follow_factorial() -> None:
    tok = WordTokenizer()
    assert scrambled_subjects("Slovenia", tok) == []
    two = scrambled_subjects("Danielle Darrieux", tok)
    assert two == ["DarrieuxDanielle"]  # 2! - 1; pieces are joined without separator
    assert len(scrambled_subjects("a b c", tok)) == 5  # 3! - 1
    assert len(scrambled_subjects("a b c d", tok)) == 10  # capped at n_max
    long = "one two three four five six seven eight nine ten eleven"
    out = scrambled_subjects(long, tok, n_max=7)  # beyond exhaustive enumeration
    assert len(out) == len(set(out)) == 7 and long not in out
    assert out == scrambled_subjects(long, tok, n_max=7)


def test_scramble_drops_orders_with_the_subjects_text() -> None:
    tok = WordTokenizer()
    # swapping two equal tokens gives back the identity's text
    assert scrambled_subjects("New New", tok) == []
    assert sorted(scrambled_subjects("a a b", tok)) == ["aba", "baa"]


def test_scramble_is_independent_of_call_order() -> None:
    tok = WordTokenizer()
    a = scrambled_subjects("a b c d e", tok, key="1")
    scrambled_subjects("f g h", tok, key="2")
    assert scrambled_subjects("a b c d e", tok, key="1") == a


def test_stable_rng_is_stable() -> None:
    assert stable_rng("x", 0).random() == stable_rng("x", 0).random()
    assert stable_rng("x", 0).random() != stable_rng("x", 1).random()
    # pinned: Python's salted hash() would make this differ between processes
    assert stable_rng("scramble", 0, "", "abc").randrange(10**6) == 772425


# --- ID / OOD halves -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "first"), [(0, 0), (1, 1), (2, 1), (3, 2), (5, 3), (10, 5)])
def test_split_half(n: int, first: int) -> None:
    xs = list(range(n))
    a, b = split_half(xs)
    assert len(a) == first and a + b == xs


# --- long-context passages -------------------------------------------------------------------

WIKI = "\n".join(
    [
        "",
        " = Valkyria Chronicles III = ",
        "",
        " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing game .",
        " The game began development in 2010 , carrying over the work {done} on the II .",
        "",
        " = = Gameplay = = ",
        "",
        " As with previous Valkyira Chronicles games , the player controls a { small } squad .",
        " Troops are divided into classes : Scouts , Shocktroopers , Engineers and Lancers .",
        " = = = Plot = = =",
        " The game takes place during the Second Europan War , and follows the Nameless .",
    ]
)


def _words(text: str) -> int:
    return len(text.split())


def test_passages_words_exact_and_clean() -> None:
    ps = PassageSampler(WIKI, length=12, unit="words", seed=0)
    out = ps.passages("143", 20)
    assert len(out) == 20
    for p in out:
        assert _words(p) == 12
        assert "{" not in p and "}" not in p
        assert "Valkyria Chronicles III =" not in p and "= =" not in p
        assert p == " ".join(p.split())
    assert ps.passages("143", 20) == out
    assert PassageSampler(WIKI, length=12, unit="words", seed=0).passages("143", 20) == out
    assert ps.passages("144", 20) != out
    assert PassageSampler(WIKI, length=12, unit="words", seed=1).passages("143", 20) != out
    assert ps.passages("143", 0) == []


def test_passages_are_contiguous_text() -> None:
    body = " ".join(f"w{i}" for i in range(200))
    ps = PassageSampler(body, length=30, unit="words")
    for p in ps.passages("k", 10):
        nums = [int(w[1:]) for w in p.split()]
        assert nums == list(range(nums[0], nums[0] + 30))


def test_passages_tokens_exact_length() -> None:
    tok = WordTokenizer()
    ps = PassageSampler(WIKI, length=15, unit="tokens", tokenizer=tok, seed=3)
    out = ps.passages("x", 10)
    for p in out:
        assert len(tok(p, add_special_tokens=False)["input_ids"]) == 15
        assert "{" not in p and "}" not in p and "= =" not in p
    assert ps.passages("x", 10) == out


def test_passages_tokens_with_bpe(byte_tok: PreTrainedTokenizerFast) -> None:
    text = "\n".join(CORPUS * 40 + [" = Heading = ", ""] + ["{ brace } " + CORPUS[0]] * 5)
    ps = PassageSampler(text, length=40, unit="tokens", tokenizer=byte_tok)
    for p in ps.passages("k", 8):
        assert "Ġ" not in p and "{" not in p and "}" not in p and "Heading" not in p
        n = len(byte_tok(p, add_special_tokens=False)["input_ids"])
        assert abs(n - 40) <= 2  # exact as a window of ids; re-encoding may merge at the edges


def test_passages_chunked_encoding_matches_whole(byte_tok: PreTrainedTokenizerFast) -> None:
    from repedit.data.variants import _chunked_ids

    lines = [c for c in CORPUS * 30]
    whole = byte_tok(" ".join(lines), add_special_tokens=False)["input_ids"]
    assert _chunked_ids(byte_tok, lines, chunk_chars=200) == whole


def test_passage_sampler_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_text(WIKI, encoding="utf-8")
    a = PassageSampler(path, length=10, unit="words").passages("1", 3)
    b = PassageSampler.from_file(str(path), length=10, unit="words").passages("1", 3)
    assert a == b == PassageSampler(WIKI, length=10, unit="words").passages("1", 3)


def test_passage_sampler_errors() -> None:
    with pytest.raises(ValueError, match="fewer than one passage"):
        PassageSampler("a b c", length=10, unit="words")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PassageSampler(WIKI, unit="tokens")
    with pytest.raises(ValueError, match="unit"):
        PassageSampler(WIKI, unit="chars")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        PassageSampler(WIKI, length=0, unit="words")


def test_long_context_prompt() -> None:
    assert long_context_prompt("Some text .", "Slovenia is in") == "Some text . Slovenia is in"


def test_heading_filter_keeps_ordinary_lines() -> None:
    text = "a = b is an equation\n = Title = \n = = Sub = = \nx y z w"
    out = PassageSampler(text, length=10, unit="words").passages("k", 1)[0]
    assert out == "a = b is an equation x y z w"
