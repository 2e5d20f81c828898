"""The web console through its HTTP interface (Starlette's test client over a real migrated SQLite database
with a real spooled radiograph): sign-in, roles, CSRF, headers, reviews into ``labels``, audit, users CLI."""

from __future__ import annotations

import argparse
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from screener.core.db.models import AuditEvent, ConsoleUser, Label, StudyReview
from screener.ops.console import accounts
from screener.ops.console.dashboard import collect_dashboard
from screener.ops.console.sessions import COOKIE_NAME
from screener.ops.console.users_cli import users_command
from screener.ops.status import collect_status
from tests.console_data import PASSWORD, ConsoleDb, client, copy_db, csrf_of, make_db, sign_in


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> ConsoleDb:
    return make_db(tmp_path_factory.mktemp("console-template"))


@pytest.fixture
def db(template: ConsoleDb, tmp_path: Path) -> ConsoleDb:
    return copy_db(template, tmp_path)


def _audit(db: ConsoleDb, action: str) -> list[AuditEvent]:
    with Session(db.engine) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def test_accounts_lock_after_repeated_wrong_passwords_and_passwd_unlocks(db: ConsoleDb) -> None:
    lockout = timedelta(minutes=15)
    with Session(db.engine) as s, s.begin():
        outcomes = [
            accounts.authenticate(s, "rui", "wrong password!!", max_failures=5, lockout=lockout).outcome
            for _ in range(5)
        ]
        assert outcomes == [accounts.LoginOutcome.WRONG] * 4 + [accounts.LoginOutcome.LOCKED]
        # Locked: even the right password is refused until the lockout ends.
        assert accounts.authenticate(s, "rui", PASSWORD, max_failures=5, lockout=lockout).outcome == "locked"
        accounts.set_password(s, "rui", "another long password")
        assert (
            accounts.authenticate(s, "rui", "another long password", max_failures=5, lockout=lockout).outcome
            == "ok"
        )
        user = s.scalar(select(ConsoleUser).where(ConsoleUser.name == "rui"))
        assert user is not None and user.password_hash.startswith("$argon2id$")
        with pytest.raises(accounts.AccountError, match="at least 12"):
            accounts.add_user(s, "newbie", "viewer", "short")
        with pytest.raises(accounts.AccountError, match="exists"):
            accounts.add_user(s, "rui", "viewer", PASSWORD)
        with pytest.raises(accounts.AccountError, match="role"):
            accounts.add_user(s, "newbie", "superuser", PASSWORD)


def test_sign_in_sets_a_strict_httponly_cookie_and_security_headers(db: ConsoleDb) -> None:
    c = client(db)
    assert c.get("/dashboard").url.path == "/login"  # not signed in: the sign-in page
    page = c.get("/login")
    r = c.post(
        "/login",
        data={"name": "vera", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(COOKIE_NAME))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # no TLS here; under [console.tls] it is marked Secure
    d = c.get("/dashboard")
    assert d.status_code == 200
    csp = d.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert d.headers["x-content-type-options"] == "nosniff" and d.headers["cache-control"] == "no-store"
    assert "<script>" not in d.text and " style=" not in d.text  # nothing inline for the CSP to refuse
    assert [e.detail and json.loads(e.detail)["outcome"] for e in _audit(db, "console.login")] == ["ok"]


def test_login_form_without_its_token_is_refused(db: ConsoleDb) -> None:
    c = client(db)
    c.get("/login")
    r = c.post("/login", data={"name": "ana", "password": PASSWORD})
    assert r.status_code == 403 and "expired" in r.text
    assert COOKIE_NAME not in c.cookies


def test_dashboard_numbers_are_those_of_screener_status(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "vera")
    data = c.get("/dashboard.json").json()
    status = collect_status(db.engine)
    assert data["status"]["instances"] == status["instances"]
    assert data["status"]["studies"] == 3 and data["queue_depth"] == 0
    assert data["verdicts"] == {"covid19": 1, "normal": 1, "not_analysed": 1}
    assert {(d["channel"], d["status"], d["count"]) for d in data["deliveries"]} == {
        ("dicom", "sent", 1),
        ("dicom", "dead", 1),
    }
    measures = {r["measure"]: r for r in data["turnaround"]}
    assert measures["seconds_to_result"]["n"] == 3 and measures["seconds_to_delivery"]["n"] == 1
    assert data["model"]["version"] == "cxr-test-1" and data["model"]["figures"]["macro_f1"] == 0.88
    html = c.get("/dashboard").text
    assert '<span class="n" id="instances-total">3</span>' in html and "<svg" in html
    assert data["model"]["calibration"] == {
        "vector_scale": "1.400 / 1.500 / 2.200",
        "vector_bias": "-0.100 / -0.800 / 0.900",
    }
    assert "vector_scale 1.400 / 1.500 / 2.200" in html
    assert collect_dashboard(db.engine).as_dict()["verdicts"] == data["verdicts"]


def test_viewer_cannot_open_a_study_and_the_refusal_is_audited(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "vera")
    r = c.get(f"/studies/{db.study_ids[0]}")
    assert r.status_code == 403 and db.patient_name not in r.text
    assert c.get("/studies").status_code == 403
    assert c.get(f"/studies/{db.study_ids[0]}/images/1.png").status_code == 403
    denied = _audit(db, "console.denied")
    assert len(denied) == 3 and denied[0].actor == "console:vera"
    assert db.study_uids[0] not in (denied[0].subject + (denied[0].detail or ""))  # ids only in URLs


def test_reviewer_disagreement_becomes_a_label_as_trainer_labels_import_would(
    db: ConsoleDb, tmp_path: Path
) -> None:
    from trainer.labels import import_labels

    c = client(db)
    sign_in(c, "rui")
    sid, uid = db.study_ids[0], db.study_uids[0]
    page = c.get(f"/studies/{sid}")
    assert page.status_code == 200 and db.patient_name in page.text  # a reviewer sees the patient
    assert '<strong class="verdict" id="verdict">covid19</strong>' in page.text
    assert '<span class="flag">finding</span>' in page.text
    img = c.get(f"/studies/{sid}/images/{sid}.png")
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    r = c.post(
        f"/studies/{sid}/review",
        data={
            "decision": "disagree",
            "correct_class": "viral_pneumonia",
            "comment": "ground glass, but typical",
            "csrf_token": csrf_of(page.text),
        },
    )
    assert r.status_code == 200 and "Your review was recorded." in r.text
    csv = tmp_path / "same.csv"
    csv.write_text(f"study_instance_uid,label,confirmed_by\n{uid},Viral Pneumonia,rui\n")
    with Session(db.engine) as s, s.begin():
        import_labels(s, csv)
    with Session(db.engine) as s:
        console_label, imported = s.scalars(select(Label).order_by(Label.id)).all()
        review = s.scalars(select(StudyReview)).one()
    columns = ("sop_instance_uid", "study_instance_uid", "accession_number", "label", "confirmed_by")
    assert [getattr(console_label, k) for k in columns] == [getattr(imported, k) for k in columns]
    assert console_label.confirmed_at is not None and console_label.source_file == "console"
    assert (review.decision, review.label, review.label_id, review.comment) == (
        "disagree",
        "viral_pneumonia",
        console_label.id,
        "ground glass, but typical",
    )
    reviewed = _audit(db, "console.study_reviewed")
    assert len(reviewed) == 1 and reviewed[0].subject == uid and reviewed[0].actor == "console:rui"
    assert json.loads(reviewed[0].detail or "{}")["label_id"] == console_label.id
    viewed = _audit(db, "console.study_viewed")
    assert viewed and all(json.loads(v.detail or "{}")["from"] == "testclient" for v in viewed)
    assert _audit(db, "console.image_viewed")


def test_not_assessable_adds_no_label_and_bad_reviews_are_explained(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "rui")
    sid = db.study_ids[2]  # not analysed: nothing to agree with
    page = c.get(f"/studies/{sid}")
    token = csrf_of(page.text)
    r = c.post(f"/studies/{sid}/review", data={"decision": "agree", "csrf_token": token})
    assert r.status_code == 400 and "names no class to agree with" in r.text
    r = c.post(f"/studies/{sid}/review", data={"decision": "disagree", "csrf_token": token})
    assert r.status_code == 400 and "needs the correct class" in r.text
    r = c.post(
        f"/studies/{sid}/review",
        data={"decision": "not_assessable", "comment": "rotated", "csrf_token": token},
    )
    assert r.status_code == 200
    with Session(db.engine) as s:
        assert s.scalar(text("SELECT COUNT(*) FROM labels")) == 0
        assert s.scalars(select(StudyReview.decision)).all() == ["not_assessable"]


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "ana")
    sid = db.study_ids[0]
    for data in ({"decision": "agree"}, {"decision": "agree", "csrf_token": "forged"}):
        r = c.post(f"/studies/{sid}/review", data=data)
        assert r.status_code == 403 and "security token" in r.text
    r = c.post("/admin/deliveries/retry", data={"dead": "1"})
    assert r.status_code == 403
    with Session(db.engine) as s:
        assert s.scalar(text("SELECT COUNT(*) FROM labels")) == 0
        assert s.scalar(text("SELECT COUNT(*) FROM deliveries WHERE status = 'dead'")) == 1
    assert len(_audit(db, "console.csrf_refused")) == 3


def test_admin_retries_dead_deliveries_and_manages_users(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "ana")
    page = c.get("/admin/deliveries")
    assert "association rejected" in page.text and "<td>dicom</td>" in page.text
    assert "No deliveries." in c.get("/admin/deliveries?channel=hl7").text
    assert "association rejected" in c.get("/admin/deliveries?channel=dicom&status=dead").text
    r = c.post("/admin/deliveries/retry", data={"dead": "1", "csrf_token": csrf_of(page.text)})
    assert r.status_code == 200 and "Deliveries re-driven." in r.text
    with Session(db.engine) as s:
        assert s.scalar(text("SELECT COUNT(*) FROM deliveries WHERE status = 'dead'")) == 0
    assert len(_audit(db, "console.deliveries_retried")) == 1
    users = c.get("/admin/users")
    r = c.post("/admin/users/disable", data={"name": "vera", "csrf_token": csrf_of(users.text)})
    assert r.status_code == 200
    other = client(db)
    assert "account is disabled" in sign_in(other, "vera")
    # A reviewer is no admin.
    reviewer = client(db)
    sign_in(reviewer, "rui")
    assert reviewer.get("/admin/deliveries").status_code == 403


def test_signing_out_ends_the_session(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "vera")
    token = c.cookies[COOKIE_NAME]
    page = c.get("/dashboard")
    c.post("/logout", data={"csrf_token": csrf_of(page.text)})
    c.cookies.set(COOKIE_NAME, token)  # a copy of the old cookie no longer works
    assert c.get("/dashboard").url.path == "/login"


def test_users_command_reads_the_password_from_stdin(db: ConsoleDb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a brand new password\n"))
    out = io.StringIO()
    args = argparse.Namespace(users_command="add", name="nina", role="reviewer", password_stdin=True)
    assert users_command(db.engine, args, out) == 0
    assert out.getvalue().strip() == "added nina (reviewer)"
    c = client(db)
    assert "Worklist" in sign_in(c, "nina", "a brand new password")
    listed = io.StringIO()
    users_command(db.engine, argparse.Namespace(users_command="list"), listed)
    assert [line.split()[:3] for line in listed.getvalue().splitlines()] == [
        ["ana", "admin", "active"],
        ["nina", "reviewer", "active"],
        ["rui", "reviewer", "active"],
        ["vera", "viewer", "active"],
    ]


def test_worklist_filters_and_site_pages(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "rui")
    assert c.get("/studies").text.count('class="study-link"') == 3
    only = c.get("/studies?verdict=covid19").text
    assert only.count('class="study-link"') == 1 and f'href="/studies/{db.study_ids[0]}"' in only
    assert "No study matches." in c.get("/studies?model=other-version").text
    assert "No study matches." in c.get("/studies?from=2001-01-01&to=2001-01-02").text
    page = c.get(f"/studies/{db.study_ids[0]}")
    c.post(f"/studies/{db.study_ids[0]}/review", data={"decision": "agree", "csrf_token": csrf_of(page.text)})
    assert c.get("/studies?unreviewed=1").text.count('class="study-link"') == 2
    site = c.get("/site")
    assert site.status_code == 200 and "cxr-test-1" in site.text  # the agreed label is a confirmed case
    plot = c.get("/site/site-performance.png")
    assert plot.status_code == 200 and plot.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get("/site/other.png").status_code == 404
