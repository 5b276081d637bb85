"""The demo's pipeline on a tiny model: plain vs REP cells, the data-less text source."""

from __future__ import annotations

from pathlib import Path

import pytest

from repedit import demo
from repedit.data import builtin_facts
from repedit.editors import StatsConfig, make_editor
from repedit.models.tiny import tiny_loaded
from repedit.rep import RepConfig


def test_story_scores_every_probe_plain_and_with_rep(playground) -> None:
    lm = playground.lm
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    editor = make_editor("rome", None, playground.sources.stats)
    facts = builtin_facts()[:2]
    story = demo.run_story(lm, editor, facts, playground.sources)
    assert [f.case_id for f in story.facts] == [c.case_id for c in facts]
    for f in story.facts:
        assert list(f.plain) == list(demo.PROBE_KINDS)  # the corpus gives long contexts
        assert f.rep is not None and list(f.rep) == list(f.plain)
        assert f.probes["prompt"] == builtin_facts()[0 if f is story.facts[0] else 1].request.text
        assert f.probes["long-context"].endswith(f.probes["prompt"])
    counts = story.counts()
    assert counts["plain"][1] == counts["rep"][1] == 4 * len(facts)
    assert counts["plain"][0] == sum(v for f in story.facts for v in f.plain.values())
    # every edit was reverted
    for k, v in lm.model.state_dict().items():
        assert (weights[k] == v).all(), k
    assert story.to_dict()["counts"]["rep"] == list(counts["rep"])


def test_held_out_probes_are_not_trained_on(playground) -> None:
    from repedit.data.variants import scrambled_subjects, split_half

    case = builtin_facts()[0]
    probes = demo.variant_probes(playground.lm, case, None)
    assert "long-context" not in probes  # no passage sampler, no such probe
    assert probes["paraphrase"] == case.request.with_subject(case.ood_paraphrases[0]).text
    drawn = scrambled_subjects(case.request.subject, playground.lm.tokenizer, key=case.case_id)
    train = split_half(drawn)[0]
    scrambled = probes["scramble"]
    assert all(case.request.with_subject(s).text != scrambled for s in train)


def test_without_a_data_folder_the_text_is_model_sampled_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REPEDIT_DATA", raising=False)
    monkeypatch.setattr(demo, "SAMPLED_TOKENS", 64)
    monkeypatch.setattr(demo, "SAMPLED_DOC_TOKENS", 16)
    monkeypatch.setattr(demo, "SAMPLED_BATCH", 4)
    lm = tiny_loaded()
    said: list[str] = []
    sources = demo.text_sources(lm, StatsConfig(cache=str(tmp_path)), said.append)
    path = Path(sources.stats.corpus)
    assert path.is_file() and path.parent == tmp_path / "sampled"
    assert sources.long_context_corpus == str(path) and sources.stats.n_tokens == 64
    assert "model-sampled" in sources.note and said
    cfg = sources.rep_config()  # no data folder: no CounterFact pool either, said in the note
    assert cfg.long_context_corpus == str(path) and cfg.pool_negatives == 0
    assert "without pool negatives" in sources.note
    stamp = path.stat().st_mtime_ns
    again = demo.text_sources(lm, StatsConfig(cache=str(tmp_path)))
    assert again.stats.corpus == str(path) and path.stat().st_mtime_ns == stamp  # cached
    tokens = len(lm.tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    assert tokens >= 64


def test_a_data_folder_or_a_chosen_corpus_is_left_alone(tmp_path: Path) -> None:
    lm = tiny_loaded()
    chosen = StatsConfig(corpus=str(tmp_path / "x.txt"), n_tokens=123)
    sources = demo.text_sources(lm, chosen)
    assert sources.stats is chosen and sources.long_context_corpus is None and not sources.note
    assert sources.rep_config() == RepConfig()  # REP's own defaults, pool negatives included


def test_demo_command_prints_plain_against_rep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.serve.conftest import _corpus

    from repedit.cli import main
    from repedit.models.tiny import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    corpus = _corpus(tmp_path / "corpus.txt")
    common = ["--model", str(tmp_path / "tiny"), "--corpus", str(corpus)]
    common += ["--stats-tokens", "2000", "--cache-dir", str(tmp_path / "cache"), "--n", "1"]
    assert main(["demo", *common]) == 0
    out = capsys.readouterr().out
    assert "plain / REP" in out and "Slovenia → Antarctica" in out
    assert "plain edit" in out and "/4[/]" not in out and "with REP" in out
    assert main(["demo", "--no-rep", *common]) == 0
    assert "edits took effect" in capsys.readouterr().out
