"""Generated subject forms: what each kind makes, determinism, and the filters (reorderings,
forbidden texts) that keep them off the evaluation's probes."""

from __future__ import annotations

import pytest

from repedit.data.augment import (
    AUGMENT_KINDS,
    AugmentForm,
    augment_forms,
    candidates,
    fold,
    is_reordering,
    parse_kinds,
    probe_texts,
)
from repedit.data.case import EditCase, EditRequest
from repedit.data.variants import case_variants
from repedit.errors import InvalidRequestError
from repedit.models.tiny import tiny_tokenizer
from repedit.rep import RepConfig
from repedit.rep.adapter import GENERATED_FORMS


class CharTokenizer:
    """Every character a token: any anagram of the subject is a token reordering."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _texts(subject: str, kind: str, tok, n: int = 100, **kw: object) -> list[str]:
    return [f.text for f in augment_forms(subject, [kind], n, tokenizer=tok, **kw)]  # type: ignore[arg-type]


def test_each_kind_makes_its_forms(tok) -> None:
    s = "Steve Jobs"
    assert {"steve jobs", "STEVE JOBS"} <= set(_texts(s, "case", tok))
    assert {"SteveJobs", "Steve-Jobs", "Ste ve Jobs"} <= set(_texts(s, "spacing", tok))
    assert {'"Steve Jobs"', "Steve Jobs,", "(Steve Jobs)"} <= set(_texts(s, "punct", tok))
    assert {"the Steve Jobs", "The Steve Jobs"} == set(_texts(s, "determiner", tok))
    assert {"S. Jobs", "S Jobs", "SJ", "S.J."} == set(_texts(s, "initials", tok))
    assert _texts(s, "truncate", tok) == ["Jobs"]
    assert _texts("Paris", "initials", tok) == [] and _texts("Paris", "truncate", tok) == []
    assert _texts("The Beatles", "determiner", tok) == []
    assert "R. of Slovenia" in _texts("Republic of Slovenia", "initials", tok)
    # the key is read at the subject's last token: punctuation and determiners stay outside
    for f in candidates(s, "punct") + candidates(s, "determiner"):
        assert f.core == s and (f.prefix or f.suffix)
    assert AugmentForm("punct", s, '"', '"').wrap("{} was born in") == '"{}" was born in'


def test_noise_is_one_typo_never_in_a_first_letter(tok) -> None:
    s = "Steve Jobs"
    forms = _texts(s, "noise", tok)
    assert {"Stvee Jobs", "Stve Jobs", "Stteve Jobs", "Steve Jbos"} <= set(forms)
    for f in forms:
        words = f.split()
        assert [w[0] for w in words] == ["S", "J"]
        assert abs(len(f) - len(s)) <= 1 and f != s


def test_forms_are_seeded_and_capped_per_kind(tok) -> None:
    kinds = ["noise", "spacing", "punct"]
    a = augment_forms("Steve Jobs", kinds, 2, tokenizer=tok, seed=3, key="k")
    assert a == augment_forms("Steve Jobs", kinds, 2, tokenizer=tok, seed=3, key="k")
    assert [f.kind for f in a] == ["noise", "noise", "spacing", "spacing", "punct", "punct"]
    other = [
        augment_forms("Steve Jobs", kinds, 2, tokenizer=tok, seed=s, key="k") for s in range(8)
    ]
    assert any(o != a for o in other)  # the seed picks among many candidates
    assert augment_forms("Steve Jobs", kinds, 0, tokenizer=tok) == []


def test_reorderings_are_never_generated(tok) -> None:
    pieces = ["steve", "jobs"]
    assert is_reordering("Jobs Steve", "Steve Jobs", pieces)
    assert is_reordering("JobsSteve", "Steve Jobs", pieces)
    assert not is_reordering("steve jobs", "Steve Jobs", pieces)
    assert not is_reordering("SteveJobs", "Steve Jobs", pieces)
    assert not is_reordering("Stvee Jobs", "Steve Jobs", pieces)
    # character tokens: every swap of two letters is a token reordering, so noise keeps only
    # drops and doubles, and no form of any kind has the subject's token multiset
    chars = CharTokenizer()
    noise = _texts("Steve Jobs", "noise", chars)
    assert noise and all(len(f) != len("Steve Jobs") for f in noise)
    own = sorted("SteveJobs")
    for kind in AUGMENT_KINDS:
        for f in _texts("Steve Jobs", kind, chars):
            flat = "".join(f.split())
            assert flat == "SteveJobs" or sorted(flat) != own, (kind, f)


def test_span_forms_are_strict_runs_of_the_subjects_tokens() -> None:
    chars = CharTokenizer()
    spans = _texts("Jobs", "span", chars)
    # every contiguous run shorter than the whole keeping >= 40 % of its letters, none a
    # reordering of all four tokens
    assert set(spans) == {"Jo", "ob", "bs", "Job", "obs"}
    assert _texts("J", "span", chars) == []  # one token: nothing shorter
    assert "of" not in _texts("Edwin of York", "span", chars)  # a minor word is no form
    with pytest.raises(ValueError, match="needs the tokenizer"):
        candidates("Jobs", "span")


def test_forms_equal_to_a_probe_are_dropped(tok) -> None:
    # the case's probes spell several generated forms (up to case and spaces)
    req = EditRequest("{} was born in", "Steve Jobs", "Paris", "San Francisco", "c1")
    case = EditCase(
        req,
        subject_paraphrases=["the  steve jobs", "S. Jobs", "STEVE jobs", "Jobs"],
        id_split=1,
    )
    variants = case_variants(case, tok, key="c1")
    forbidden = probe_texts(variants) | {fold("Steve-Jobs")}  # a look-alike subject
    plain = probe_texts(case_variants(EditCase(req), tok, key="c1"))
    assert fold("Steve Jobs") not in plain  # the subject itself is no probe
    kinds = list(AUGMENT_KINDS)
    free = augment_forms("Steve Jobs", kinds, 100, tokenizer=tok, key="c1")
    kept = augment_forms("Steve Jobs", kinds, 100, tokenizer=tok, key="c1", forbidden=forbidden)
    free_folded = {fold(f.text) for f in free}
    for clash in ("the Steve Jobs", "S. Jobs", "Jobs", "steve jobs", "Steve-Jobs"):
        assert fold(clash) in free_folded  # the collision is real ...
    assert not {fold(f.text) for f in kept} & forbidden  # ... and filtered out
    assert len(kept) < len(free)


def test_config_parses_and_checks_augment_kinds() -> None:
    cfg = RepConfig().replace(augment="case, noise,case", n_augment="3")
    assert cfg.augment == ("case", "noise") and cfg.n_augment == 3
    assert cfg.to_dict()["augment"] == ["case", "noise"]
    assert RepConfig().augment == GENERATED_FORMS  # every kind but span, by default
    assert "span" not in GENERATED_FORMS and RepConfig(augment=()).augment == ()
    with pytest.raises(InvalidRequestError, match="augment"):
        RepConfig(augment=("case", "typos"))
    with pytest.raises(InvalidRequestError, match="n_augment"):
        RepConfig(n_augment=-1)
    with pytest.raises(ValueError, match="unknown augment kind"):
        parse_kinds("swap")
