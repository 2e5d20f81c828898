"""Security of the web console (issue 18), on SQLite and PostgreSQL (the checks that do not touch the
database's behaviour, CSRF, sign-in timing and TLS, on SQLite only).

- Every page and action by role: signed out (sign-in page / 401), viewer, reviewer, admin (403 below the
  role needed), and every refusal audited; no PHI in a refused page.
- CSRF: every POST without its token, with a forged one, or with another session's token is refused and
  changes nothing.
- Sessions: a tampered, expired, signed-out or disabled account's cookie is worthless; the database holds
  only the token's sha256.
- Passwords: five wrong in a row lock the account (even the right one is refused until the lockout ends);
  an unknown name costs as long as a wrong password; argon2id hashes.
- Injection: HTML in a comment or a destination is escaped; SQL in the worklist filters is data.
- TLS: the real server (uvicorn) under ``[console.tls]`` marks the cookie Secure, sends HSTS, refuses plain
  HTTP; security headers on every response; no patient name in the log.
"""

from __future__ import annotations

import http.client
import json
import ssl
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from screener.core.config import ConsoleConfig, TLSConfig
from screener.core.db.models import AuditEvent, ConsoleSession, ConsoleUser
from screener.ops.console import accounts
from screener.ops.console.server import ConsoleServer
from screener.ops.console.sessions import COOKIE_NAME
from screener.ops.console.web import ConsoleContext
from tests.console_data import PASSWORD, ConsoleDb, client, copy_db, csrf_of, make_db, sign_in
from tests.helpers import free_port

ROLES = ("viewer", "reviewer", "admin")
USER_OF = {"viewer": "vera", "reviewer": "rui", "admin": "ana"}


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> ConsoleDb:
    return make_db(tmp_path_factory.mktemp("console-template"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> ConsoleDb:
    if request.param == "sqlite":
        return copy_db(request.getfixturevalue("sqlite_template"), tmp_path)
    url = request.getfixturevalue("pg_url")
    return make_db(tmp_path, url)


@pytest.fixture
def sqlite_db(sqlite_template: ConsoleDb, tmp_path: Path) -> ConsoleDb:
    """For checks whose outcome does not depend on the database (they run once, not once per engine)."""
    return copy_db(sqlite_template, tmp_path)


def _pages(db: ConsoleDb) -> dict[str, str]:
    """GET pages and the least role that may open each."""
    sid = db.study_ids[0]
    return {
        "/dashboard": "viewer",
        "/dashboard.json": "viewer",
        "/site": "viewer",
        "/studies": "reviewer",
        f"/studies/{sid}": "reviewer",
        f"/studies/{sid}/images/{sid}.png": "reviewer",
        "/admin/deliveries": "admin",
        "/admin/models": "admin",
        "/admin/users": "admin",
    }


def _count(db: ConsoleDb, sql: str) -> int:
    with Session(db.engine) as s:
        return int(s.scalar(text(sql)) or 0)


def test_every_page_by_role_and_signed_out(db: ConsoleDb, figure: Any) -> None:
    pages = _pages(db)
    anonymous = client(db)
    for path in pages:
        r = anonymous.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
    checked = 0
    for role in ROLES:
        c = client(db)
        sign_in(c, USER_OF[role])
        for path, needed in pages.items():
            r = c.get(path)
            allowed = ROLES.index(role) >= ROLES.index(needed)
            assert r.status_code == (200 if allowed else 403), (role, path, r.status_code)
            if not allowed:
                assert db.patient_name not in r.text
            checked += 1
    denied = _count(db, "SELECT COUNT(*) FROM audit_events WHERE action = 'console.denied'")
    assert denied == 6 + 3  # viewer: 6 pages above its role; reviewer: the 3 admin pages
    figure("console_role_checks", checked, "requests")


def _posts(db: ConsoleDb) -> dict[str, dict[str, str]]:
    sid = db.study_ids[0]
    return {
        f"/studies/{sid}/review": {"decision": "disagree", "correct_class": "normal"},
        "/admin/deliveries/retry": {"dead": "1"},
        "/admin/users/add": {"name": "mallory", "role": "admin", "password": "a long enough password"},
        "/admin/users/disable": {"name": "rui"},
        "/admin/models/rollback": {},
        "/logout": {},
    }


def _state(db: ConsoleDb) -> tuple[int, ...]:
    return (
        _count(db, "SELECT COUNT(*) FROM labels"),
        _count(db, "SELECT COUNT(*) FROM study_reviews"),
        _count(db, "SELECT COUNT(*) FROM deliveries WHERE status = 'dead'"),
        _count(db, "SELECT COUNT(*) FROM console_users"),
        _count(db, "SELECT COUNT(*) FROM console_users WHERE disabled"),
        _count(db, "SELECT COUNT(*) FROM console_sessions"),
    )


def test_every_form_needs_its_own_sessions_csrf_token(sqlite_db: ConsoleDb, figure: Any) -> None:
    admin, other = client(sqlite_db), client(sqlite_db)
    sign_in(admin, "ana")
    other_token = csrf_of(sign_in(other, "rui"))
    own_token = csrf_of(admin.get("/dashboard").text)
    before = _state(sqlite_db)
    refused = 0
    for path, data in _posts(sqlite_db).items():
        for token in (None, "", "forged-token", other_token, own_token[:-1]):
            form = dict(data) if token is None else {**data, "csrf_token": token}
            r = admin.post(path, data=form, follow_redirects=False)
            assert r.status_code == 403, (path, token, r.status_code)
            refused += 1
    assert _state(sqlite_db) == before
    refusals = "SELECT COUNT(*) FROM audit_events WHERE action = 'console.csrf_refused'"
    assert _count(sqlite_db, refusals) == refused
    # Signed out, a POST is 401 whatever it carries.
    anonymous = client(sqlite_db)
    for path, data in _posts(sqlite_db).items():
        assert anonymous.post(path, data={**data, "csrf_token": own_token}).status_code == 401
    assert _state(sqlite_db) == before
    figure("console_csrf_refusals", refused, "posts")


def test_tampered_expired_signed_out_and_disabled_sessions_are_worthless(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "rui")
    token = c.cookies[COOKIE_NAME]
    with Session(db.engine) as s:
        stored = s.scalars(select(ConsoleSession.token_sha256)).all()
    assert token not in stored and all(len(h) == 64 for h in stored)  # only the digest is stored
    for forged in (token[:-1] + ("A" if token[-1] != "A" else "B"), "x" * 200, ""):
        d = client(db)
        d.cookies.set(COOKIE_NAME, forged)
        assert d.get("/studies").url.path == "/login"
    with Session(db.engine) as s, s.begin():
        s.execute(update(ConsoleSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert c.get("/studies").url.path == "/login"
    sign_in(c, "rui")
    assert c.get("/studies").status_code == 200
    with Session(db.engine) as s, s.begin():
        s.execute(update(ConsoleUser).where(ConsoleUser.name == "rui").values(disabled=True))
    assert c.get("/studies").url.path == "/login"


def test_five_wrong_passwords_lock_until_the_lockout_ends(db: ConsoleDb, figure: Any) -> None:
    settings = ConsoleConfig(max_failed_logins=5, lockout_minutes=15)
    c = client(db, settings)
    pages = [sign_in(c, "rui", "wrong password number x") for _ in range(5)]
    assert all("Wrong name or password." in p for p in pages[:4]) and "locked" in pages[4]
    assert "locked" in sign_in(c, "rui")  # the right password, refused while locked
    assert COOKIE_NAME not in c.cookies
    with Session(db.engine) as s, s.begin():
        s.execute(
            update(ConsoleUser)
            .where(ConsoleUser.name == "rui")
            .values(locked_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert "Worklist" in sign_in(c, "rui")
    with Session(db.engine) as s:
        outcomes = [
            json.loads(e.detail or "{}")["outcome"]
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action.like("console.login%")))
        ]
    assert outcomes == ["wrong"] * 4 + ["locked", "locked", "ok"]
    figure("console_lockout_after", 5, "wrong passwords")


def test_an_unknown_name_costs_as_long_as_a_wrong_password(sqlite_db: ConsoleDb, figure: Any) -> None:
    lockout = timedelta(minutes=1)

    def timed(name: str) -> float:
        with Session(sqlite_db.engine) as s, s.begin():
            started = time.perf_counter()
            accounts.authenticate(s, name, "some wrong password", max_failures=1000, lockout=lockout)
            return time.perf_counter() - started

    known = statistics.median(timed("rui") for _ in range(5))
    unknown = statistics.median(timed("nobody-here") for _ in range(5))
    figure("console_login_time_ratio_unknown_to_known", round(unknown / known, 2), "")
    assert unknown > 0.5 * known  # an argon2 verification either way: names cannot be told apart by time
    with Session(sqlite_db.engine) as s:
        hashes = s.scalars(select(ConsoleUser.password_hash)).all()
    assert all(h.startswith("$argon2id$") and PASSWORD not in h for h in hashes)


def test_html_and_sql_are_data(db: ConsoleDb) -> None:
    c = client(db)
    sign_in(c, "ana")
    sid = db.study_ids[0]
    page = c.get(f"/studies/{sid}")
    payload = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    c.post(
        f"/studies/{sid}/review",
        data={"decision": "not_assessable", "comment": payload, "csrf_token": csrf_of(page.text)},
    )
    shown = c.get(f"/studies/{sid}").text
    assert payload not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
    with Session(db.engine) as s, s.begin():
        s.execute(text("UPDATE deliveries SET destination = :d"), {"d": "<b onmouseover=alert(3)>PACS</b>"})
    assert "<b onmouseover" not in c.get("/admin/deliveries").text
    for query in (
        "verdict=' OR 1=1 --",
        "model=x' UNION SELECT password_hash FROM console_users --",
        "page=-1",
    ):
        r = c.get(f"/studies?{query}")
        assert r.status_code == 200 and "$argon2" not in r.text
    assert "No study matches." in c.get("/studies?model=' OR '1'='1").text
    # Images only through their own study; nothing outside the static folder.
    assert c.get(f"/studies/{db.study_ids[1]}/images/{sid}.png").status_code == 404
    assert c.get("/static/../web.py").status_code == 404
    assert c.get("/static/%2e%2e/web.py").status_code == 404


def test_real_server_under_tls(sqlite_db: ConsoleDb, pki: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    settings = ConsoleConfig(
        enabled=True, port=port, tls=TLSConfig(cert_file=pki["server_pem"], key_file=pki["server_key"])
    )
    server = ConsoleServer(ConsoleContext(settings, sqlite_db.engine, sqlite_db.spool))
    with structlog.testing.capture_logs() as logs:
        server.start()
        try:
            context = ssl.create_default_context(cafile=str(pki["ca_pem"]))
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
            conn.request("GET", "/login")
            r = conn.getresponse()
            body = r.read().decode()
            assert r.status == 200 and r.getheader("strict-transport-security") == "max-age=31536000"
            assert "frame-ancestors 'none'" in (r.getheader("content-security-policy") or "")
            login_cookie = r.getheader("set-cookie") or ""
            assert "Secure" in login_cookie and "HttpOnly" in login_cookie
            form = f"name=rui&password={PASSWORD.replace(' ', '+')}&csrf_token={csrf_of(body)}"
            conn.request(
                "POST",
                "/login",
                body=form,
                headers={
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Cookie": login_cookie.split(";")[0],
                },
            )
            r = conn.getresponse()
            r.read()
            assert r.status == 303
            cookie = next(v for k, v in r.getheaders() if k.lower() == "set-cookie" and COOKIE_NAME in v)
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
            study = f"/studies/{sqlite_db.study_ids[0]}"
            conn.request("GET", study, headers={"Cookie": cookie.split(";")[0]})
            r = conn.getresponse()
            assert r.status == 200 and sqlite_db.patient_name in r.read().decode()
            assert r.getheader("server") is None  # no server banner
            plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
                plain.request("GET", "/login")
                plain.getresponse().read()
            conn.close()
        finally:
            server.stop()
    assert not server.is_alive()
    assert sqlite_db.patient_name not in json.dumps(logs, default=str)
    assert any(e.get("event") == "console.login" for e in logs)


def test_dashboard_turnaround_is_the_reports(db: ConsoleDb) -> None:
    """On PostgreSQL the dashboard's percentiles come from the database; they equal the report function's."""
    from screener.ops.console.dashboard import _turnaround, _turnaround_rows
    from screener.ops.reporting import turnaround_summary

    since = datetime.now(UTC) - timedelta(days=1)
    with Session(db.engine) as s:
        assert _turnaround(s, db.engine, since) == turnaround_summary(_turnaround_rows(s, since))
        (measure_result, measure_delivery) = _turnaround(s, db.engine, since)
    assert (measure_result["n"], measure_delivery["n"], measure_delivery["missing"]) == (3, 1, 2)


def test_real_server_can_require_a_client_certificate(sqlite_db: ConsoleDb, pki: dict[str, Path]) -> None:
    port = free_port()
    tls = TLSConfig(
        cert_file=pki["server_pem"],
        key_file=pki["server_key"],
        ca_file=pki["ca_pem"],
        require_client_cert=True,
    )
    server = ConsoleServer(
        ConsoleContext(ConsoleConfig(enabled=True, port=port, tls=tls), sqlite_db.engine, sqlite_db.spool)
    )
    server.start()
    try:
        bare = ssl.create_default_context(cafile=str(pki["ca_pem"]))
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=bare, timeout=10)
            conn.request("GET", "/login")
            conn.getresponse().read()
        signed = ssl.create_default_context(cafile=str(pki["ca_pem"]))
        signed.load_cert_chain(str(pki["client_pem"]), str(pki["client_key"]))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=signed, timeout=10)
        conn.request("GET", "/login")
        r = conn.getresponse()
        assert r.status == 200 and b"Sign in" in r.read()
        conn.close()
    finally:
        server.stop()
