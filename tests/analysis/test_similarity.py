"""Key-similarity analysis on tiny random models: the whitened scores against hand computations,
variant construction (counts, positions, agreement with the evaluation probes), specificity,
success joins, findings, plots and the ``repedit analyze keys`` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from numerics import forward_tolerance, solve_tolerance, tolerance
from repedit.analysis import (
    VARIANTS,
    CaseSimilarity,
    findings_markdown,
    key_similarity,
    plot_distributions,
    plot_similarity_vs_success,
    plot_specificity,
    similarity_vs_success,
    specificity_matrix,
    summarize_findings,
)
from repedit.analysis.keys import keys_at_positions as read_keys
from repedit.analysis.keys import whitened_scores
from repedit.analysis.success import point_biserial
from repedit.data import EditCase, EditRequest, PassageSampler, builtin_facts, scrambled_subjects
from repedit.editors import StatsConfig, make_editor
from repedit.editors.keys import compute_keys
from repedit.evaluation.probes import SuiteConfig, build_probes, case_keys
from repedit.models.tiny import tiny_loaded, tiny_model, tiny_tokenizer
from repedit.models.tokens import prompt_ids
from repedit.stats import SecondMoment, second_moments
from tiny_text import tiny_corpus_text

LAYER = 1
CONTEXTS = ["{}", "The capital of France is Paris. {}", "Rome is the capital of Italy. {}"]
FAST = {"layer": LAYER, "contexts": ((3, 2),), "value": {"steps": 8}}
PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random text over most of the tiny vocabulary (a well-conditioned C at every layer)."""
    path = tmp_path_factory.mktemp("analysis-corpus") / "corpus.txt"
    path.write_text(tiny_corpus_text())
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("analysis-cache")


@pytest.fixture(scope="module")
def stats(lm, corpus: Path, cache: Path) -> SecondMoment:
    return second_moments(lm, [LAYER], str(corpus), 3000, cache=cache, progress=False)[LAYER]


@pytest.fixture(scope="module")
def sampler(lm, corpus: Path) -> PassageSampler:
    return PassageSampler.from_file(corpus, length=40, unit="tokens", tokenizer=lm.tokenizer)


def _handmade() -> EditCase:
    """Subject mid-prompt; prompt paraphrases with and without the subject, and a duplicate."""
    return EditCase(
        request=EditRequest(
            "The mother tongue of {} is", "Danielle Darrieux", "English", "French", "darrieux"
        ),
        prompt_paraphrases=[
            "Danielle Darrieux spoke the language",  # subject at the start
            "The actress, born in Bordeaux, spoke",  # no subject: skipped
            "The mother tongue of Danielle Darrieux is",  # the edit prompt: dropped
            "In Paris, Danielle Darrieux was a French actress whose language is",
            "In Paris, Danielle Darrieux was a French  actress whose language is",  # dup
        ],
        subject_paraphrases=["Mlle Darrieux", "D. Darrieux", "Darrieux", "the actress"],
        id_split=2,
    )


@pytest.fixture(scope="module")
def cases() -> list[EditCase]:
    return [*builtin_facts()[:5], _handmade()]


@pytest.fixture(scope="module")
def results(lm, cases, stats, sampler) -> list[CaseSimilarity]:
    return key_similarity(
        lm,
        cases,
        layer=LAYER,
        stats=stats,
        contexts=CONTEXTS,
        long_context=sampler,
        n_long_context=2,
        n_unrelated=3,
    )


# --------------------------------------------------------------------------- whitened scores


def _solve_tol(stats: SecondMoment) -> float:
    """Two float64 solves with ``C`` (relative), then a dot product of ``d_mlp`` terms."""
    d = stats.matrix.shape[0]
    return solve_tolerance(torch.float64, size=d, condition=stats.condition_number())


def _key_tol(lm, seq_len: int = 0) -> float:
    """Relative: keys at ``LAYER`` from two forwards (other batches and padding)."""
    return forward_tolerance(lm.arch, blocks=LAYER + 1, head=False, seq_len=seq_len)


def _beta_tol(stats: SecondMoment, k: torch.Tensor, k_star: torch.Tensor, key: float) -> float:
    """``k · C⁻¹k*`` with both keys off by ``key`` (relative, element-wise): each key's error
    passes through ``C⁻¹`` to the other, so it is bounded by ``|k||C⁻¹k*| + |C⁻¹k||k*|``."""
    k, k_star = k.double(), k_star.double()
    x, y = torch.linalg.solve(stats.matrix, k_star), torch.linalg.solve(stats.matrix, k)
    spread = float(k.abs() @ x.abs() + y.abs() @ k_star.abs())
    return key * spread + _solve_tol(stats) * abs(float(k @ x))


@pytest.mark.numerics
def test_k_star_with_itself_is_one(lm, cases, stats) -> None:
    k_star = compute_keys(lm, [LAYER], [cases[0].request], CONTEXTS)[LAYER][0]
    self_sim, beta, beta_norm, cosine = whitened_scores(stats, k_star, k_star[None])
    tol = _solve_tol(stats)  # the same float64 solve twice, then one dot product
    assert beta_norm.item() == pytest.approx(1.0, abs=tol)
    assert beta.item() == pytest.approx(self_sim, rel=tol)
    assert cosine.item() == pytest.approx(1.0, abs=tolerance(torch.float64, terms=lm.arch.d_mlp))
    assert self_sim > 0


@pytest.mark.numerics
def test_original_beta_matches_a_hand_computation(lm, cases, stats, results) -> None:
    case, cs = cases[0], results[0]
    k_star = compute_keys(lm, [LAYER], [case.request], CONTEXTS)[LAYER][0].double()
    k_o = compute_keys(lm, [LAYER], [case.request], ["{}"])[LAYER][0].double()
    c_inv_k = torch.linalg.solve(stats.matrix, k_star)  # by hand: a plain solve
    beta = float(k_o @ c_inv_k)
    self_sim = float(k_star @ c_inv_k)
    key = _key_tol(lm)  # the analysis reads its keys in other batches than compute_keys
    self_tol = _beta_tol(stats, k_star, k_star, key)
    assert cs.self_similarity == pytest.approx(self_sim, abs=self_tol)
    beta_tol = _beta_tol(stats, k_o, k_star, key)
    assert cs.variants["original"].beta[0] == pytest.approx(beta, abs=beta_tol)
    norm_tol = beta_tol / self_sim + abs(beta) * self_tol / self_sim**2
    assert cs.variants["original"].beta_norm[0] == pytest.approx(beta / self_sim, abs=norm_tol)
    cos = float(k_o @ k_star / (k_o.norm() * k_star.norm()))
    # both keys off by `key`: the dot product by 2·key·Σ|k_o k*|, each norm by key·|k|
    cos_tol = 2 * key * float(k_o.abs() @ k_star.abs()) / float(k_o.norm() * k_star.norm())
    assert cs.variants["original"].cosine[0] == pytest.approx(cos, abs=cos_tol + 2 * key)
    assert cs.d_mlp == lm.arch.d_mlp and cs.layer == LAYER


@pytest.mark.numerics
def test_rescaling_c_scales_beta_and_leaves_beta_norm(lm, cases, stats) -> None:
    k_star = compute_keys(lm, [LAYER], [cases[1].request], CONTEXTS)[LAYER][0]
    keys = compute_keys(lm, [LAYER], [c.request for c in cases], ["{}"])[LAYER]
    scaled = SecondMoment(LAYER, stats.matrix * 7.5, stats.n_tokens)
    s1, b1, n1, c1 = whitened_scores(stats, k_star, keys)
    s2, b2, n2, c2 = whitened_scores(scaled, k_star, keys)
    tol = _solve_tol(stats)  # two float64 solves of the same (scaled) system
    assert s2 == pytest.approx(s1 / 7.5, rel=tol)
    torch.testing.assert_close(b2, b1 / 7.5, rtol=0, atol=tol * float(b1.abs().max() / 7.5))
    torch.testing.assert_close(n2, n1, rtol=0, atol=tol * float(n1.abs().max()))
    torch.testing.assert_close(c2, c1)


def test_cosines_are_in_range_and_scores_finite(results) -> None:
    for cs in results:
        for vk in cs.variants.values():
            assert all(-1.0 <= c <= 1.0 for c in vk.cosine)
            assert np.isfinite(vk.beta).all() and np.isfinite(vk.beta_norm).all()
            assert len(vk.beta) == len(vk.beta_norm) == len(vk.cosine) == len(vk.labels)
            assert len(vk.index) == len(vk.texts) == len(vk.token_index) == len(vk.meta)
        np.testing.assert_allclose(
            [b / cs.self_similarity for vk in cs.variants.values() for b in vk.beta],
            [b for vk in cs.variants.values() for b in vk.beta_norm],
        )


@pytest.mark.numerics
def test_bucketed_keys_equal_one_sequence_at_a_time(lm) -> None:
    texts = ["Paris", "The Eiffel Tower is in Paris", "x " * 60 + "Rome is in Italy"]
    seqs = [prompt_ids(lm.tokenizer, t) for t in texts]
    pos = [len(s) - 1 for s in seqs]
    together = read_keys(lm, LAYER, seqs, pos)
    for i in range(len(seqs)):
        alone = read_keys(lm, LAYER, [seqs[i]], [pos[i]])
        tol = _key_tol(lm, seq_len=max(len(s) for s in seqs)) * float(alone[0].abs().max())
        torch.testing.assert_close(together[i], alone[0], rtol=0, atol=tol)


# --------------------------------------------------------------------------- variants


def test_variant_counts_match_the_case(lm, cases, results) -> None:
    keys = case_keys(cases)
    for case, key, cs in zip(cases, keys, results, strict=True):
        assert cs.case_id == key
        v = cs.variants
        assert set(v) == set(VARIANTS)
        assert len(v["original"]) == 1
        assert v["subject_paraphrase"].labels == case.id_paraphrases
        assert v["ood_subject_paraphrase"].labels == case.ood_paraphrases
        assert v["ood_subject_paraphrase"].index == list(
            range(len(case.id_paraphrases), len(case.subject_paraphrases))
        )
        scrambles = scrambled_subjects(case.request.subject, lm.tokenizer, seed=0, key=key)
        assert v["scrambled_subject"].labels == scrambles
        assert len(v["long_context"]) == 2
        assert len(v["unrelated"]) == 3
        others = {c.request.subject for c in cases} - {case.request.subject}
        assert set(v["unrelated"].labels) <= others
        for text, subject in zip(v["unrelated"].texts, v["unrelated"].labels, strict=True):
            assert text == case.request.prompt.format(subject)


def test_prompt_paraphrases_without_the_subject_are_skipped_and_counted(results) -> None:
    cs = results[-1]
    pp = cs.variants["prompt_paraphrase"]
    assert pp.texts == [
        "Danielle Darrieux spoke the language",
        "In Paris, Danielle Darrieux was a French actress whose language is",
    ]
    assert pp.index == [0, 3]
    assert cs.skipped == {"prompt_paraphrase": 1}
    sp = cs.variants["subject_paraphrase"]
    assert [m["contains_subject"] for m in sp.meta] == [False, False]


def test_keys_are_read_at_the_subjects_last_token(lm, results) -> None:
    cs = results[-1]
    subject = cs.subject
    for variant in ("original", "long_context", "prompt_paraphrase"):
        vk = cs.variants[variant]
        for text, idx in zip(vk.texts, vk.token_index, strict=True):
            enc = lm.tokenizer(text, return_offsets_mapping=True)
            assert enc["input_ids"] == prompt_ids(lm.tokenizer, text)
            start = text.index(subject) if variant != "long_context" else text.rindex(subject)
            end = start + len(subject)
            a, b = enc["offset_mapping"][idx]
            assert start <= a < end <= b, (text, idx, text[a:b])
            # the next token (if any) starts at or after the subject's end
            if idx + 1 < len(enc["input_ids"]):
                assert enc["offset_mapping"][idx + 1][0] >= end


def test_long_context_key_is_at_the_subject_inside_the_passage_text(lm, results, sampler) -> None:
    cs = results[0]
    vk = cs.variants["long_context"]
    passages = sampler.passages(f"{cs.case_id}:test", 2)
    for passage, text, idx in zip(passages, vk.texts, vk.token_index, strict=True):
        assert text == passage + " " + cs.prompt.format(cs.subject)
        n_passage = len(lm.tokenizer(passage)["input_ids"])
        assert idx >= n_passage - 1  # past the passage (boundary merges aside)
        start = len(passage) + 1 + cs.prompt.index("{}")
        end = start + len(cs.subject)
        enc = lm.tokenizer(text, return_offsets_mapping=True)
        a, b = enc["offset_mapping"][idx]
        assert a < end and b >= end, (text[a:b], cs.subject)


def test_variant_texts_are_the_evaluation_probes(lm, cases, results, corpus) -> None:
    """Same texts, indices, scrambles and passages as build_probes: results join with a run."""
    suite = SuiteConfig(
        long_context_corpus=str(corpus),
        long_context_length=40,
        long_context_unit="tokens",
        long_context_passages=2,
    )
    compared: set[str] = set()
    for case, key, cs in zip(cases, case_keys(cases), results, strict=True):
        fams = build_probes(case, lm, suite, key=key)
        for test, probes in fams.items():
            variant = "original" if test == "efficacy" else test
            if variant not in cs.variants:
                continue  # neighbourhood
            vk = cs.variants[variant]
            ours = dict(zip(vk.index, vk.texts, strict=True))
            for probe in probes:
                idx = probe.meta.get("index", 0)
                if variant == "prompt_paraphrase" and cs.subject not in probe.prompt:
                    assert idx not in ours
                    continue
                assert ours[idx] == probe.prompt, (test, idx)
                compared.add(variant)
    assert compared == set(VARIANTS) - {"unrelated"}


def test_results_round_trip_through_json(results) -> None:
    for cs in results:
        d = json.loads(json.dumps(cs.to_dict(long_texts=True)))
        back = CaseSimilarity.from_dict(d)
        assert back == cs
        short = cs.to_dict()
        assert all(len(t) <= 160 for t in short["variants"]["long_context"]["texts"])


# --------------------------------------------------------------------------- specificity


@pytest.mark.numerics
def test_specificity_diagonal_is_the_original_key(lm, cases, stats, results) -> None:
    subjects, m = specificity_matrix(lm, cases, LAYER, stats, CONTEXTS)
    assert subjects == [c.request.subject for c in cases]
    assert m.shape == (len(cases), len(cases))
    # the same keys and solves, batched per case here and across cases there
    np.testing.assert_allclose(
        np.diag(m), [cs.variants["original"].beta_norm[0] for cs in results], rtol=_key_tol(lm)
    )
    # an off-diagonal entry by hand: case 2's bare key against case 0's k*
    k_star = compute_keys(lm, [LAYER], [cases[0].request], CONTEXTS)[LAYER][0].double()
    k_2 = compute_keys(lm, [LAYER], [cases[2].request], ["{}"])[LAYER][0].double()
    x = torch.linalg.solve(stats.matrix, k_star)
    key = _key_tol(lm)
    tol = _beta_tol(stats, k_2, k_star, key) / float(k_star @ x)
    tol += abs(float(k_2 @ x)) * _beta_tol(stats, k_star, k_star, key) / float(k_star @ x) ** 2
    assert m[0, 2] == pytest.approx(float(k_2 @ x / (k_star @ x)), abs=tol)
    sub2, m2 = specificity_matrix(lm, cases, LAYER, stats, CONTEXTS, max_cases=3)
    assert len(sub2) == 3 and m2.shape == (3, 3)


# --------------------------------------------------------------------------- success


def test_success_by_editing_each_case(lm, cases, results, corpus, cache) -> None:
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    editor = make_editor(
        "rome", FAST, StatsConfig(corpus=str(corpus), n_tokens=3000, cache=str(cache))
    )
    sa = similarity_vs_success(results[:2], lm=lm, cases=cases, editor=editor)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every edit reverted
    assert sa.source == "edit:rome"
    assert len(sa.rows) == sum(len(vk) for cs in results[:2] for vk in cs.variants.values())
    assert {r["variant"] for r in sa.rows} == set(VARIANTS)
    assert all(isinstance(r["success"], bool) for r in sa.rows)
    s = sa.summary
    assert s["n"] == len(sa.rows)
    assert sum(b["n"] for b in s["bins_all"]) == len(sa.rows)
    assert set(s["by_variant"]) == set(VARIANTS)
    json.dumps(sa.to_dict())


def test_success_joined_from_a_run_directory(tmp_path: Path, results) -> None:
    cs = results[0]
    para = cs.variants["subject_paraphrase"]
    scr = cs.variants["scrambled_subject"]
    record = {
        "case_id": cs.case_id,
        "mode": "single",
        "error": None,
        "tests": {
            "efficacy": {"probes": [{"exact": True}]},
            "subject_paraphrase": {
                "probes": [
                    {"exact": i == 0, "meta": {"index": i, "subject": s}}
                    for i, s in enumerate(para.labels)
                ]
            },
            "scrambled_subject": {
                "probes": [
                    {"exact": True, "meta": {"index": 0, "subject": "not the scramble"}},
                    {"exact": False, "meta": {"index": 1, "subject": scr.labels[1]}},
                ]
            },
            "neighbourhood": {"probes": [{"exact": True, "agree": 1.0, "meta": {"index": 0}}]},
        },
    }
    failed = {"case_id": results[1].case_id, "error": {"type": "EditError", "message": "x"}}
    unknown = {"case_id": "not-analysed", "error": None, "tests": {}}
    lines = [json.dumps(r) for r in (record, failed, unknown)]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    sa = similarity_vs_success(results, run_dir=tmp_path)
    by = [(r["variant"], r["index"], r["success"]) for r in sa.rows]
    assert by[0] == ("original", 0, True)
    assert [b for b in by if b[0] == "subject_paraphrase"] == [
        ("subject_paraphrase", i, i == 0) for i in range(len(para))
    ]
    assert [b for b in by if b[0] == "scrambled_subject"] == [("scrambled_subject", 1, False)]
    assert sa.rows[0]["beta_norm"] == cs.variants["original"].beta_norm[0]
    notes = " ".join(sa.notes)
    assert "1 failed" in notes and "1 run record" in notes and "1 with a different" in notes


def test_success_needs_a_source(results) -> None:
    from repedit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        similarity_vs_success(results)
    with pytest.raises(InvalidRequestError, match=r"results\.jsonl"):
        similarity_vs_success(results, run_dir="/nonexistent/run")


def test_point_biserial() -> None:
    assert point_biserial([0.1, 0.2, 0.9, 1.0], [False, False, True, True]) > 0.9
    assert point_biserial([0.1, 0.2], [True, True]) is None
    x = [0.3, 0.5, 0.1, 0.8, 0.7]
    y = [False, True, False, True, False]
    assert point_biserial(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))


# --------------------------------------------------------------------------- findings, plots


def test_findings_have_the_expected_keys(results) -> None:
    f = summarize_findings(results)
    assert {"n_cases", "layer", "d_mlp", "self_similarity", "variants"} <= set(f)
    assert f["n_cases"] == len(results) and f["d_mlp"] == results[0].d_mlp
    f1, f2 = f["finding_1"], f["finding_2"]
    for key in ("share_below_0.4", "mean", "median", "original_mean", "original_median"):
        assert key in f1
    for key in (
        "max_unrelated_beta",
        "ratio_to_median_self_similarity",
        "ratio_to_d_mlp",
        "share_cases_overlapping",
        "global_threshold_accuracy",
    ):
        assert key in f2
    for fx in (f1, f2):
        assert fx["verdict"] in ("holds", "partly holds", "does not hold")
        assert fx["statement"].startswith(("Finding 1", "Finding 2"))
        assert fx["verdict"] in fx["statement"]
    all_unrelated = [b for cs in results for b in cs.variants["unrelated"].beta]
    assert f2["max_unrelated_beta"] == max(all_unrelated)
    assert f2["ratio_to_d_mlp"] == pytest.approx(max(all_unrelated) / results[0].d_mlp)
    f1_vals = [
        x
        for cs in results
        for v in ("subject_paraphrase", "ood_subject_paraphrase", "scrambled_subject")
        for x in cs.variants[v].beta_norm
    ]
    assert f1["n"] == len(f1_vals)
    assert f1["share_below_0.4"] == pytest.approx(np.mean(np.asarray(f1_vals) < 0.4))
    json.dumps(f)
    md = findings_markdown(f)
    assert "Finding 1" in md and "Finding 2" in md and "| unrelated |" in md


def test_plots_write_png_files(tmp_path: Path, lm, cases, stats, results) -> None:
    subjects, m = specificity_matrix(lm, cases, LAYER, stats, CONTEXTS)
    rows = [
        {"variant": v, "beta_norm": b, "success": b > 0.5}
        for cs in results
        for v, vk in cs.variants.items()
        for b in vk.beta_norm
    ]
    paths = [
        plot_distributions(results, tmp_path / "d.png"),
        plot_specificity(subjects, m, tmp_path / "s.png"),
        plot_similarity_vs_success(rows, tmp_path / "sub" / "v.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


# --------------------------------------------------------------------------- CLI


REP_RECORDS = [
    {
        "case_id": 1,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
        "rephrase_prompt": [
            "Danielle Darrieux spoke the language",
            "The actress spoke the language",
        ],
        "rephrase_target": "English",
        "locality_prompt": ["The mother tongue of Michel Rocard is"],
        "locality_ground_truth": "French",
        "subject_rephrase": ["Mlle Darrieux", "D. Darrieux", "Darrieux", "the actress"],
    },
    {
        "case_id": 2,
        "prompt": "Lionel Messi plays football for",
        "subject": "Lionel Messi",
        "target_new": "Rome",
        "target_true": "Barcelona",
        "rephrase_prompt": ["The footballer Lionel Messi plays for"],
        "rephrase_target": "Rome",
        "locality_prompt": ["Steve Jobs founded"],
        "locality_ground_truth": "Apple",
        "subject_rephrase": ["Messi", "Leo Messi", "the Argentine forward", "La Pulga"],
    },
    {
        "case_id": 3,
        "prompt": "The Eiffel Tower is in",
        "subject": "Eiffel Tower",
        "target_new": "Italy",
        "target_true": "Paris",
        "rephrase_prompt": None,
        "rephrase_target": "Italy",
        "locality_prompt": ["Toyota was founded in"],
        "locality_ground_truth": "Japan",
        "subject_rephrase": ["the Tower", "La Tour Eiffel", "Eiffel's tower", "the iron tower"],
    },
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_analyze_keys_end_to_end(
    tmp_path: Path, tiny_dir: Path, corpus: Path, tmp_cache: Path, capsys
) -> None:
    from repedit.cli import COMMANDS, main

    assert "analyze" in COMMANDS
    data = tmp_path / "rep.json"
    data.write_text(json.dumps(REP_RECORDS))
    out = tmp_path / "out"
    argv = [
        "analyze",
        "keys",
        "--model",
        str(tiny_dir),
        "--threads",
        "1",
        "--corpus",
        str(corpus),
        "--stats-tokens",
        "2000",
        "--cache-dir",
        str(tmp_cache),
        "--data",
        str(data),
        "--long-context-corpus",
        str(corpus),
        "--long-context-tokens",
        "30",
        "--n-unrelated",
        "2",
        "--with-success",
        "--set",
        "contexts=[[3, 2]]",
        "--set",
        "value.steps=6",
        "--no-progress",
        "--out",
        str(out),
    ]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "median β̃" in captured.out and "Finding 1" in captured.out
    report = json.loads((out / "similarity.json").read_text())
    assert report["layer"] == 1  # ROME's layer for a 4-layer model
    assert report["n_cases"] == 3 and len(report["cases"]) == 3
    assert report["findings"]["finding_1"]["verdict"]
    assert len(report["options"]["contexts"]) == 3  # "{}" + 2 generated
    assert report["success"]["rows"]
    assert len(report["specificity"]["matrix"]) == 3
    case1 = report["cases"][0]
    assert len(case1["variants"]["long_context"]["beta"]) == 1
    assert case1["skipped"] == {"prompt_paraphrase": 1}
    assert "Finding 2" in (out / "findings.md").read_text()
    for name in ("beta_distribution.png", "specificity.png", "beta_vs_success.png"):
        assert (out / name).read_bytes().startswith(PNG)

    # --json and an explicit layer; no success data, so no success plot
    out2 = tmp_path / "out2"
    argv2 = [a for a in argv if a != "--with-success"]
    argv2[argv2.index(str(out))] = str(out2)
    code = main([*argv2, "--layer", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert doc["layer"] == 2 and "cases" not in doc and doc["success"] is None
    assert not (out2 / "beta_vs_success.png").exists()


def test_cli_rejects_run_and_with_success_together(tmp_path: Path, capsys) -> None:
    from repedit.cli import main

    code = main(["analyze", "keys", "--run", str(tmp_path), "--with-success"])
    assert code == 2
    assert "not both" in capsys.readouterr().err
