"""``repedit analyze ceiling`` on tiny models: oracle positions, the key rewrite, the tally and the
command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from numerics import forward_tolerance
from repedit.analysis.ceiling import (
    Item,
    case_items,
    ceiling_markdown,
    key_oracle,
    oracle_rates,
    patched_probe_scores,
    plain_rates,
    reference_ids,
    rep_gate_open,
    tally,
)
from repedit.data import load_cases
from repedit.data.variants import NearSubjects
from repedit.editors.keys import keys_at
from repedit.evaluation.probes import SuiteConfig, case_keys
from repedit.evaluation.scoring import score_probes
from repedit.models.tiny import tiny_loaded, tiny_model, tiny_tokenizer
from repedit.models.tokens import locate, prompt_ids
from tiny_text import tiny_corpus_text

CASES = Path(__file__).parents[1] / "golden" / "analysis" / "cases.json"
LAYER = 1


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def cases():
    return load_cases(str(CASES), id_split=2).cases


def _items(lm, cases) -> list[Item]:
    near = NearSubjects(cases, lm.tokenizer)
    suite = SuiteConfig(long_context_passages=0)
    return case_items(lm, cases[3], case_keys(cases)[3], suite, None, near)


def test_oracle_positions_are_the_subject_tokens(lm, cases) -> None:
    items = _items(lm, cases)
    eff = next(i for i in items if i.test == "efficacy")
    req = cases[3].request
    _, pos = locate(lm.tokenizer, req.prompt, req.subject)
    assert eff.last == (pos,)
    assert eff.every is not None and eff.every[-1] == pos and len(eff.every) >= 1
    tests = {i.test for i in items}
    assert {"scrambled_subject_id", "near_subject", "neighbourhood"} <= tests
    assert "scrambled_subject" not in tests
    assert all(i.last is None for i in items if i.test in ("neighbourhood", "near_subject"))


def test_writing_a_probes_own_key_changes_nothing(lm, cases) -> None:
    """The oracle rewrite at the right token: writing the key the probe already has there
    leaves every score as it was; writing a large foreign key changes the token's output."""
    items = [i for i in _items(lm, cases) if i.test == "efficacy"]
    ref = reference_ids(lm, items, 8)
    plain = plain_rates(lm, items, ref, 8)
    ids, pos = locate(lm.tokenizer, cases[3].request.prompt, cases[3].request.subject)
    own = keys_at(lm, [LAYER], [ids], [pos])[LAYER][0]
    same = oracle_rates(lm, items, ref, {LAYER: own}, "oracle_key", 8, plain)
    assert same == plain
    # and the hook really reaches the model: a huge key flips the greedy continuation
    from repedit.evaluation.scoring import score_probes
    from repedit.models.hooks import Hooks

    def huge(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, pos] = 1e3
        return x

    before = score_probes(lm, [items[0].probe])[0].logprob
    with Hooks() as h:
        h.rewrite(lm.arch.down_proj(LAYER), huge)
        after = score_probes(lm, [items[0].probe])[0].logprob
    assert before != after


def test_an_oracle_group_scores_as_its_probes_alone(lm, cases) -> None:
    """Probes sharing oracle positions are scored in one call; each must get ``k*`` at its own
    subject token, exactly as when scored alone (a packed scorer puts the second probe of a row
    at another offset, so its rewrite would land on the wrong token)."""
    items = [i for i in _items(lm, cases) if i.last is not None][:4]
    assert len(items) >= 3
    pos = items[0].last
    forced = [Item(i.probe, i.test, pos, pos) for i in items]
    ref = reference_ids(lm, forced, 8)
    k = {LAYER: torch.full((lm.arch.d_mlp,), 3.0)}
    where, install = key_oracle(lm, k, "oracle_key")
    together = patched_probe_scores(lm, forced, ref, where, install, 8)
    for j, (item, r) in enumerate(zip(forced, ref, strict=True)):
        alone = patched_probe_scores(lm, [item], [r], where, install, 8)[0]
        tol = forward_tolerance(lm.arch, blocks=lm.arch.n_layers, magnitude=abs(alone.logprob))
        assert together[j].logprob == pytest.approx(alone.logprob, abs=tol), j
    # the rewrite matters: without it the log-probs differ by far more than rounding
    plain = score_probes(lm, [f.probe for f in forced], reference=ref)
    assert max(abs(p.logprob - together[j].logprob) for j, p in enumerate(plain)) > 100 * tol


def test_tally_rates_and_gap_closed() -> None:
    rows = [
        ("efficacy", {"plain": 0.0, "rep": 1.0, "oracle_key": 1.0, "oracle_key_all": 0.0}),
        ("efficacy", {"plain": 0.0, "rep": 0.0, "oracle_key": 1.0, "oracle_key_all": 1.0}),
        ("neighbourhood", {"plain": 1.0, "rep": 1.0, "oracle_key": 1.0, "oracle_key_all": 1.0}),
    ]
    doc = tally(rows, with_rep=True)
    eff = doc["tests"]["efficacy"]
    assert eff == {
        "n": 2,
        "plain": 0.0,
        "rep": 0.5,
        "oracle_key": 1.0,
        "oracle_key_all": 0.5,
        "gap_closed": 0.5,
    }
    assert doc["tests"]["neighbourhood"]["gap_closed"] is None  # no gap to close
    assert "rep" not in tally(rows, with_rep=False)["tests"]["efficacy"]
    assert "| efficacy | 2 | 0.0 | 50.0 | 100.0 | 50.0 | 50 % | — |" in ceiling_markdown(doc)


def test_tally_gate_open_share_skips_probes_without_a_subject() -> None:
    modes = {"plain": 0.0, "rep": 0.0, "oracle_key": 0.0, "oracle_key_all": 0.0}
    nan = float("nan")
    rows = [
        ("ood_subject_paraphrase", {**modes, "rep_gate": 1.0}),
        ("ood_subject_paraphrase", {**modes, "rep_gate": 0.0}),
        ("ood_subject_paraphrase", {**modes, "rep_gate": 1.0}),
        ("ood_subject_paraphrase", {**modes, "rep_gate": nan}),
        ("neighbourhood", {**modes, "rep_gate": nan}),
    ]
    doc = tally(rows, with_rep=True)
    assert doc["tests"]["ood_subject_paraphrase"]["rep_gate_open"] == pytest.approx(2 / 3)
    assert "rep_gate_open" not in doc["tests"]["neighbourhood"]
    assert "| — | 67 % |" in ceiling_markdown(doc)


class _HalfGate(torch.nn.Module):
    """A gate that opens where the key's mean is positive (τ = 0.5)."""

    tau = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def gate(self, k: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(1e3 * k.mean(-1) + self.w)


def test_rep_gate_open_reads_the_key_at_each_probes_last_subject_token(lm, cases) -> None:
    items = [i for i in _items(lm, cases) if i.last is not None][:5]
    local = [i for i in _items(lm, cases) if i.last is None][:1]
    got = rep_gate_open(lm, {LAYER: _HalfGate()}, [*items, *local])
    for item, g in zip(items, got[: len(items)], strict=True):
        ids = prompt_ids(lm.tokenizer, item.probe.prompt)
        key = keys_at(lm, [LAYER], [ids], [item.last[0]])[LAYER][0]
        assert g == float(key.mean() > 0)
    assert got[-1] != got[-1]  # NaN: a locality probe has no subject token


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ceiling-tiny")
    tiny_model("llama", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ceiling-corpus") / "corpus.txt"
    path.write_text(tiny_corpus_text())
    return path


def test_cli_analyze_ceiling_end_to_end(tmp_path, tiny_dir, corpus, tmp_cache, capsys) -> None:
    from repedit.cli import main

    out = tmp_path / "ceiling"
    argv = [
        "analyze", "ceiling", "--model", str(tiny_dir), "--threads", "1",
        "--corpus", str(corpus), "--stats-tokens", "2000", "--cache-dir", str(tmp_cache),
        "--data", str(CASES), "--n", "2", "--id-split", "2",
        "--long-context-corpus", str(corpus), "--long-context-tokens", "30",
        "--set", "contexts=[[3, 2]]", "--set", "value.steps=6",
        "--rep", "--rep-set", "steps=3", "--rep-set", "long_context=false",
        "--out", str(out), "--json",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "ceiling.json").read_text())
    assert doc == json.loads(capsys.readouterr().out)
    tests = doc["tests"]
    assert {"efficacy", "subject_paraphrase", "long_context", "neighbourhood"} <= set(tests)
    assert "scrambled_subject_id" in tests and "scrambled_subject" not in tests
    for t in tests.values():
        assert {"plain", "rep", "oracle_key", "oracle_key_all", "n"} <= set(t)
        assert t["n"] > 0
        assert all(0.0 <= t[m] <= 1.0 for m in ("plain", "rep", "oracle_key", "oracle_key_all"))
    nb = tests["neighbourhood"]
    assert nb["oracle_key"] == nb["plain"] == nb["oracle_key_all"]
    assert tests["efficacy"]["n"] == 2
    assert 0.0 <= tests["efficacy"]["rep_gate_open"] <= 1.0
    assert "rep_gate_open" not in nb
    assert "| efficacy | 2 |" in (out / "ceiling.md").read_text()
