"""``EditRequest.subject_forms``: optional, validated, round-trips through JSON, and a case
fills it with its in-domain paraphrases only."""

from __future__ import annotations

import pytest

from repedit.data.case import EditCase, EditRequest
from repedit.errors import InvalidRequestError

REQ = EditRequest("{} is located in", "Slovenia", "Antarctica", "Europe", case_id="7")


def test_a_request_without_forms_serialises_as_before() -> None:
    assert REQ.subject_forms == ()
    assert REQ.to_dict() == {
        "prompt": "{} is located in", "subject": "Slovenia", "target_new": "Antarctica",
        "target_true": "Europe", "case_id": "7",
    }  # fmt: skip


def test_forms_round_trip_and_leave_the_identity_alone() -> None:
    req = EditRequest.from_dict({**REQ.to_dict(), "subject_forms": ["Republic of Slovenia"]})
    assert req.subject_forms == ("Republic of Slovenia",)
    assert req.to_dict()["subject_forms"] == ["Republic of Slovenia"]
    assert EditRequest.from_dict(req.to_dict()) == req
    assert req.identity() == REQ.to_dict()
    assert req.with_subject("Slovenija").subject_forms == ()  # another subject, no forms


@pytest.mark.parametrize("forms", ["Slovenia", [""], [3], {"a": 1}])
def test_bad_forms_are_rejected(forms: object) -> None:
    with pytest.raises(InvalidRequestError, match="subject_forms"):
        EditRequest.from_dict({**REQ.to_dict(), "subject_forms": forms})


def test_a_case_edits_with_its_in_domain_paraphrases_only() -> None:
    case = EditCase(REQ, subject_paraphrases=["SLO", "Slovenija", "Carniola"], id_split=2)
    assert case.edit_request.subject_forms == ("SLO", "Slovenija")
    assert case.request.subject_forms == ()  # the case's own request is untouched
    assert EditCase(REQ).edit_request == REQ
