"""The JSON API on a tiny model: roundtrip, bad input, and concurrent requests."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests.serve.conftest import SLOVENIA


def post(server, path: str, body) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json"}
    return httpx.post(server.url + path, content=data, headers=headers, timeout=300)


def test_edit_probe_revert_roundtrip(server, playground) -> None:
    weights = {k: v.clone() for k, v in playground.lm.model.state_dict().items()}
    r = post(server, "/api/edit", {**SLOVENIA, "rep": True, "probe": ["Slovenia is in"]})
    assert r.status_code == 200, r.text
    report = r.json()
    # the object `repedit edit --json` prints
    assert set(report) == {
        "method",
        "model",
        "fingerprint",
        "seconds",
        "layers",
        "requests",
        "loaded",
        "probes",
        "saved",
        "exported",
        "rep",
    }
    assert report["method"] == "rome" and report["rep"]["trained"] is True
    kinds = [p["kind"] for p in report["probes"]]
    assert kinds[0] == "prompt" and kinds[-1] == "probe"
    assert all({"before", "after", "after_rep"} <= set(p) for p in report["probes"])
    state = httpx.get(server.url + "/api/state").json()
    assert state["edit"]["report"] == report
    gates = state["edit"]["gates"]
    assert len(gates) == len(report["probes"])
    assert all(len(g["tokens"]) == len(g["gate"]) > 0 for g in gates)
    assert state["edit"]["beta"] and "<svg" in state["edit"]["beta_svg"]
    assert [e["stage"] for e in state["progress"]["log"]][-1] == "done"

    probed = post(server, "/api/probe", {"prompts": ["Slovenia is in the continent of"]})
    assert probed.status_code == 200, probed.text
    row = probed.json()["probes"][0]
    assert row["edit"]["p_new"] == pytest.approx(row["edit"]["p_new"]) and "edit_rep" in row
    assert row["gate"]["tokens"]

    for what in ("edit", "adapters"):
        got = httpx.get(f"{server.url}/api/download/{what}", timeout=60)
        assert got.status_code == 200 and len(got.content) > 0

    changed = any(not (weights[k] == v).all() for k, v in playground.lm.model.state_dict().items())
    assert changed
    assert post(server, "/api/revert", {}).json() == {"reverted": True}
    for k, v in playground.lm.model.state_dict().items():
        assert (weights[k] == v).all(), k
    assert playground.current is None
    assert httpx.get(server.url + "/api/download/edit").status_code == 400


MALFORMED = [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"]


@pytest.mark.parametrize("path", ["/api/edit", "/api/probe", "/api/revert"])
@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_json_is_a_4xx_with_a_message(server, path: str, body: bytes) -> None:
    r = post(server, path, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/api/edit", {"subject": "Slovenia"}, "'prompt' is required"),
        ("/api/edit", {**SLOVENIA, "method": "nope"}, "'method' must be one of"),
        ("/api/edit", {**SLOVENIA, "layer": 99}, "out of range"),
        ("/api/edit", {**SLOVENIA, "layer": "3"}, "'layer' must be an integer"),
        ("/api/edit", {**SLOVENIA, "prompt": "x" * 5000}, "longer than"),
        ("/api/edit", {**SLOVENIA, "prompt": "Narnia is in"}, "must contain"),
        ("/api/edit", {**SLOVENIA, "new_tokens": 10_000}, "new_tokens"),
        ("/api/edit", {**SLOVENIA, "bogus": 1}, "unknown field"),
        ("/api/probe", {"prompts": []}, "at least one"),
        ("/api/probe", {"prompts": ["a"] * 100}, "at most"),
        ("/api/revert", {"x": 1}, "takes no fields"),
    ],
)
def test_bad_fields_are_explained(server, path: str, body, says: str) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]


def test_unknown_path_is_a_json_404(server) -> None:
    r = httpx.get(server.url + "/api/nothing")
    assert r.status_code == 404 and r.json()["error"]


def test_twenty_concurrent_requests_never_see_a_half_edited_model(server, playground) -> None:
    """Edits, probes and reverts at once: each answer is consistent with one whole state."""
    prompt = "Slovenia is located in the continent of"
    post(server, "/api/revert", {})
    plain = post(server, "/api/probe", {"prompts": [prompt], "target": "Antarctica"}).json()
    p_plain = plain["probes"][0]["edit"]["p_new"]

    def job(i: int) -> tuple[str, httpx.Response]:
        if i % 5 == 0:
            return "edit", post(server, "/api/edit", SLOVENIA)
        if i % 7 == 0:
            return "revert", post(server, "/api/revert", {})
        return "probe", post(server, "/api/probe", {"prompts": [prompt], "target": "Antarctica"})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(job, range(20)))
    edited = post(server, "/api/edit", SLOVENIA).json()
    p_edited = edited["probes"][0]["after"]["p_new"]
    assert p_edited != pytest.approx(p_plain, rel=1e-3, abs=0)
    for kind, r in answers:
        assert r.status_code == 200, r.text
        if kind == "probe":
            got = r.json()
            p = got["probes"][0]["edit"]["p_new"]
            # the same edit every time, so a probe sees exactly the plain or the edited model
            want = p_edited if got["edited"] else p_plain
            assert p == pytest.approx(want, rel=1e-4, abs=0)
    post(server, "/api/revert", {})
