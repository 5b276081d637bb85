"""Gate negatives from a subject pool: what is drawn, what is never drawn, how they are used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_rome import tiny_rome

from repedit.data.augment import fold, probe_texts
from repedit.data.case import EditCase, EditRequest, Neighbour
from repedit.data.loaders import DATASETS, load_cases
from repedit.data.variants import NearSubjects
from repedit.errors import DataError, InvalidRequestError
from repedit.models.tiny import tiny_loaded
from repedit.rep import RepConfig, train_rep
from repedit.rep.inject import RepInjection
from repedit.rep.losses import _gate_negatives, _Roles
from repedit.rep.negatives import SubjectPool, subject_pool
from repedit.rep.variants import build_pool, item_variants, rep_items

CASE = EditCase(
    EditRequest("The Eiffel Tower is in {}", "Paris", "Italy", case_id="eiffel"),
    subject_paraphrases=["the city of Paris", "Paris France", "Pari", "Lutetia"],
    neighbourhood=[Neighbour("The Louvre is in the city of", "Paris")],
    id_split=2,
)

#: pool subjects: look-alikes of "Paris" (sharing a word beginning), unrelated ones, and ones
#: that must never be drawn (the case's own forms, a subject its neighbourhood prompt mentions,
#: one that begins with the subject, an excluded one)
POOL = [
    "New Paris", "Old Parisian Quarter", "Avenue de Paris", "Parisa Tabriz",
    "Oslo", "Lima", "Bern", "Quito", "Dakar", "Lutetia", "Louvre", "Excluded Town",
]  # fmt: skip


def _pool_file(root: Path) -> Path:
    records = [
        {
            "case_id": i,
            "prompt": f"{s} is located in",
            "target_new": "Nowhere",
            "subject": s,
            "ground_truth": "Somewhere",
            "rephrase_prompt": f"Where is {s}? It is in",
            "locality_prompt": "The sky is",
            "locality_ground_truth": "blue",
        }
        for i, s in enumerate(POOL)
    ]
    path = root / "pool.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def pool_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pool_file(tmp_path_factory.mktemp("subject-pool"))


@pytest.fixture(scope="module")
def pool(lm, pool_path: Path) -> SubjectPool:
    got = subject_pool(lm, str(pool_path))
    assert got is not None
    return got


BANNED = ("Lutetia", "Louvre", "Excluded Town", "Parisa Tabriz")


def test_draw_prefers_lookalikes_and_never_draws_what_the_evaluation_uses(lm, pool) -> None:
    texts = [fold(n.prompt) for n in CASE.neighbourhood]
    excluded = {fold("Excluded Town")}
    drawn = pool.draw(CASE, 6, excluded=excluded, texts=texts, key="k")
    assert len(drawn) == 6 and len(set(drawn)) == 6
    index = NearSubjects(load_cases(pool.source).cases, lm.tokenizer)
    mine = index.pieces("Paris")
    lookalike = [bool(mine & index.pieces(s)) for s in drawn]
    assert all(lookalike[:3]), drawn  # the first half shares a piece with the subject
    # asked for everything: exactly the pool less what the evaluation uses (an own held-out
    # paraphrase, a subject of a neighbourhood prompt, an excluded subject, one that begins
    # with the subject)
    every = pool.draw(CASE, len(POOL), excluded=excluded, texts=texts, key="k")
    assert set(every) == set(POOL) - set(BANNED)
    # seeded: the same draw every time
    assert drawn == pool.draw(CASE, 6, excluded=excluded, texts=texts, key="k")
    assert pool.draw(CASE, 0) == []


def test_a_shared_adapter_set_avoids_every_edit_s_probes(lm, pool) -> None:
    other = EditCase(
        EditRequest("{} is the capital of", "Zurich", "France", case_id="z"),
        subject_paraphrases=["Zuerich", "Oslo"],  # Oslo: a held-out form of this edit
        neighbourhood=[Neighbour("The Dakar rally starts in", "Paris")],
        id_split=1,
    )
    cfg = RepConfig(pool_negatives=len(POOL), long_context=False)
    got = build_pool(lm, rep_items([CASE, other]), ["{}"], cfg, subject_pool=pool)
    texts = " ".join(ex.text for ex in got.negatives if ex.kind == "pool_subject")
    for banned in ("Oslo", "Dakar", "Lutetia", "Louvre", "Parisa"):
        assert banned not in texts
    assert "Lima" in texts


def test_kin_share_the_true_answer_and_kinds_split_the_draw(lm, pool) -> None:
    case = EditCase(EditRequest("{} is located in", "Quitoville", "Mars", "Somewhere"))
    drawn = pool.draw(case, 4, kinds=("kin",), key="k")
    assert len(drawn) == 4  # every pool case answers "Somewhere"
    none = EditCase(EditRequest("{} is located in", "Quitoville", "Mars", "Elsewhere"))
    assert pool.draw(none, 4, kinds=("kin",), key="k") == []
    mixed = pool.draw(CASE, 6, kinds=("lookalike", "random"), key="k")
    assert mixed == pool.draw(CASE, 6, key="k")  # the default kinds
    with pytest.raises(InvalidRequestError, match="pool kind"):
        pool.draw(CASE, 2, kinds=("nearest",))
    with pytest.raises(InvalidRequestError, match="pool_kinds"):
        RepConfig(pool_kinds="kin,nearest")
    assert RepConfig(pool_kinds="kin, random").pool_kinds == ("kin", "random")


def test_pool_is_cached_per_file_and_model_and_missing_data_is_an_error(
    lm, pool_path, pool, tmp_path
) -> None:
    assert subject_pool(lm, str(pool_path)) is pool
    assert subject_pool(tiny_loaded("gpt2"), str(pool_path)) is not pool
    with pytest.raises(DataError, match="negative_pool"):
        subject_pool(lm, str(tmp_path / "absent.json"))


def test_build_pool_marks_the_other_subject_and_leaks_no_probe(lm, pool) -> None:
    cfg = RepConfig(pool_negatives=len(POOL), long_context=False)
    (item,) = rep_items(CASE)
    got = build_pool(lm, [item], ["{}", "A note. {}"], cfg, subject_pool=pool)
    negs = [ex for ex in got.negatives if ex.kind == "pool_subject"]
    # every pool subject but the banned ones ("Excluded Town" is not excluded here), in the
    # prompt and one context
    assert len(negs) == (len(POOL) - len(BANNED) + 1) * 2
    probes = probe_texts(item_variants(lm, item, cfg, None)) | {fold(CASE.neighbourhood[0].prompt)}
    tok = lm.tokenizer
    for ex in negs:
        assert ex.position is None and ex.subject_start is not None and ex.subject_end is not None
        span = tok.decode(list(ex.ids[ex.subject_start : ex.subject_end + 1])).strip()
        assert fold(span) in {fold(s) for s in POOL}
        assert "Parisa" not in ex.text and fold(ex.text) not in probes
    no_pool = RepConfig(long_context=False, pool_negatives=0)
    off = build_pool(lm, [item], ["{}"], no_pool, subject_pool=pool)
    assert not off.negatives  # pool_negatives=0: none


def test_pool_subject_tokens_are_near_negatives(lm, pool) -> None:
    cfg = RepConfig(pool_negatives=1, long_context=False, gate_subject_tokens="ignore")
    (item,) = rep_items(CASE)
    got = build_pool(lm, [item], ["{}"], cfg, subject_pool=pool)
    neg = got.negatives[0]
    batch = [got.prompts[0], neg]
    d = 8
    ks = [torch.arange(len(ex.ids) * d, dtype=torch.float32).view(len(ex.ids), d) for ex in batch]
    near, far = _gate_negatives(ks, _Roles.of(batch, cfg), cfg)
    assert neg.subject_start is not None and neg.subject_end is not None
    span = ks[1][neg.subject_start : neg.subject_end + 1]
    assert any(n.shape == span.shape and torch.equal(n, span) for n in near)
    far_rows = torch.cat(far)
    for row in span:  # no pool-subject token is also a far negative
        assert not (far_rows == row).all(-1).any()
    assert sum(len(f) for f in far) + sum(len(n) for n in near) >= len(neg.ids)


def test_training_with_pool_negatives_shuts_the_gate_on_them(lm, pool_path) -> None:
    t = tiny_rome(pool_path.parent, CASE, lm)
    result, layer, kw = t.result, t.layer, t.kw
    on = RepConfig(pool_negatives=4, negative_pool=str(pool_path), long_context=False, steps=20)
    rep = train_rep(lm, result, CASE, cfg=on, **kw)
    assert rep.info["pool"]["pool_subject"] > 0
    # the same pool sequences under adapters trained without them: their soft gate at the
    # drawn subject's tokens is higher
    off = train_rep(lm, result, CASE, cfg=on.replace(pool_negatives=0), report=False, **kw)
    spool = subject_pool(lm, str(pool_path))
    (item,) = rep_items(CASE)
    negs = build_pool(lm, [item], kw["contexts"], on, subject_pool=spool).negatives
    assert negs

    def soft(adapters) -> float:
        total = 0.0
        with torch.no_grad(), RepInjection(lm, adapters, record=True) as inj:
            for ex in negs:
                lm.model(torch.tensor([ex.ids]))
                g = inj.last_gate[layer][0]
                total += float(g[ex.subject_start : ex.subject_end + 1].mean())
        return total / len(negs)

    assert soft(rep.adapters) < soft(off.adapters)


def test_auto_pool_uses_counterfact_when_found_and_trains_without_it_otherwise(
    lm, pool_path, tmp_path, monkeypatch
) -> None:
    """``negative_pool="auto"``: CounterFact from the data folder when it is there; without a
    data folder a warning, no pool negatives, and the training result says so. A named pool
    that is missing stays an error."""
    t = tiny_rome(pool_path.parent, CASE, lm)
    cfg = RepConfig(pool_negatives=4, negative_pool="auto", long_context=False, steps=2)
    data = tmp_path / "data"
    monkeypatch.setenv("REPEDIT_DATA", str(data))
    target = data / DATASETS["counterfact"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pool_path.read_bytes())
    found = train_rep(lm, t.result, CASE, cfg=cfg, report=False, **t.kw)
    assert found.info["subject_pool"] == str(target)
    assert found.info["pool"]["pool_subject"] > 0

    monkeypatch.setenv("REPEDIT_DATA", str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="training without them"):
        missing = train_rep(lm, t.result, CASE, cfg=cfg, report=False, **t.kw)
    assert missing.info["subject_pool"] is None
    assert missing.info["pool"].get("pool_subject", 0) == 0
    with pytest.raises(DataError, match="negative_pool"):
        train_rep(lm, t.result, CASE, cfg=cfg.replace(negative_pool="counterfact"), **t.kw)
