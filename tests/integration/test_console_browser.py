"""The web console in a real browser: Debian's chromium, headless, driven through chromium-driver, against
`screener serve` (console enabled) after DCMTK's dcmsend stored real cxr3 chest radiographs.

Set CONSOLE_SCREENSHOTS=DIR to keep the dashboard and study screenshots there (docs/console/ holds them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from screener.ops.console import accounts
from tests.helpers import SCREENER, Server, cli, free_port, wait_for, wrap_png_as_dx

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
PASSWORD = "correct horse battery staple"
CANARY = "Canaryconsole^Patricia"  # a patient name that must reach the study page, and no URL or log

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver"
    ),
]


def _add_user(server: Server, name: str, role: str, password: str = PASSWORD) -> None:
    res = subprocess.run(
        [str(SCREENER), "users", "add", name, "--role", role, "--password-stdin"],
        input=password + "\n",
        cwd=server.workdir,
        env=server.env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def console(
    make_server, tiny_model_dir: Path, cxr3_dir: Path, tmp_path: Path
) -> Iterator[tuple[Server, str]]:
    port = free_port()
    server = make_server(
        SCREENER__CONSOLE__ENABLED="true",
        SCREENER__CONSOLE__PORT=str(port),
        SCREENER__INFERENCE__STUDY_SETTLE_SECONDS="1",
        SCREENER__INFERENCE__POLL_SECONDS="0.2",
        SCREENER__INFERENCE__MAX_WAIT_MS="100",
    )
    cli(server, "models", "register", str(tiny_model_dir), "--activate")  # migrates the new database too
    _add_user(server, "ana", "admin")  # the real command once; the others straight into the same table
    engine = create_engine(server.env()["SCREENER__DATABASE__URL"])
    with Session(engine) as session, session.begin():
        accounts.add_user(session, "rui", "reviewer", PASSWORD)
        accounts.add_user(session, "vera", "viewer", PASSWORD)
    engine.dispose()
    started = time.monotonic()
    server.start()
    print(f"serve ready in {time.monotonic() - started:.1f} s")
    files = []
    for n, cls in enumerate(("covid19", "normal", "viral_pneumonia")):
        png = sorted((cxr3_dir / cls).glob("*.png"))[0]
        ds = wrap_png_as_dx(png, study_uid=generate_uid())
        ds.PatientName = CANARY
        ds.save_as(tmp_path / f"dx{n}.dcm", enforce_file_format=True)
        files.append(str(tmp_path / f"dx{n}.dcm"))
    sent = subprocess.run(
        ["dcmsend", "-aec", "CXRSCREENER", "127.0.0.1", str(server.port), *files],
        capture_output=True,
        text=True,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: len(server.rows("SELECT id FROM study_results")) == 3, 180, "three study results")
    print(f"three study results {time.monotonic() - started:.1f} s after start")
    yield server, f"http://127.0.0.1:{port}"


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _submit(driver, button_id: str) -> None:  # type: ignore[no-untyped-def]
    """Click a form's button and wait until the next page has replaced this one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, button_id).click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(page))


def _sign_in(driver, base: str, name: str, password: str = PASSWORD) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    _submit(driver, "signin")


def _text(driver, element_id: str) -> str:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def test_console_in_chromium(console: tuple[Server, str], browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server, base = console
    driver = browser
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)

    # A reviewer signs in; the dashboard's numbers are the database's.
    _sign_in(driver, base, "rui")
    assert driver.current_url.endswith("/studies")
    driver.get(f"{base}/dashboard")
    (instances,) = server.rows("SELECT COUNT(*) FROM instances")[0]
    (studies,) = server.rows("SELECT COUNT(*) FROM studies")[0]
    (results,) = server.rows("SELECT COUNT(*) FROM study_results")[0]
    assert _text(driver, "instances-total") == str(instances) == "3"
    assert _text(driver, "studies-total") == str(studies)
    assert _text(driver, "results-total") == str(results)
    classified = driver.find_element(By.CSS_SELECTOR, 'td[data-status="classified"]').text
    assert classified == str(server.rows("SELECT COUNT(*) FROM instances WHERE status = 'classified'")[0][0])
    for verdict, count in server.rows("SELECT verdict, COUNT(*) FROM study_results GROUP BY verdict"):
        assert driver.find_element(By.CSS_SELECTOR, f'td[data-verdict="{verdict}"]').text == str(count)
    driver.save_screenshot(str(shots / "dashboard.png"))

    # Open a study from the worklist: the image is rendered, the patient shown, the URL holds an id only.
    driver.get(f"{base}/studies")
    driver.get(driver.find_element(By.CSS_SELECTOR, "a.study-link").get_attribute("href"))
    study_url = driver.current_url
    study_id = int(study_url.rsplit("/", 1)[1])
    assert CANARY.split("^")[0] in driver.find_element(By.ID, "patient").text
    image = driver.find_element(By.CSS_SELECTOR, ".image img")
    wait_for(lambda: driver.execute_script("return arguments[0].naturalWidth", image) > 0, 30, "the image")
    verdict = _text(driver, "verdict")
    other = next(c for c in ("normal", "covid19", "viral_pneumonia") if c != verdict)
    driver.save_screenshot(str(shots / "study.png"))

    # Record a disagreement with the correct class and a comment.
    driver.find_element(By.ID, "decision-disagree").click()
    Select(driver.find_element(By.ID, "correct-class")).select_by_value(other)
    driver.find_element(By.ID, "comment").send_keys("reviewed in the browser test")
    _submit(driver, "review-submit")
    assert "Your review was recorded." in driver.page_source, driver.page_source
    uid = server.rows("SELECT study_instance_uid FROM studies WHERE id = :i", i=study_id)[0][0]
    labels = server.rows(
        "SELECT label, confirmed_by, source_file FROM labels WHERE study_instance_uid = :u", u=uid
    )
    assert labels == [(other, "rui", "console")]
    audit = server.rows(
        "SELECT actor, detail FROM audit_events WHERE action = 'console.study_reviewed' AND subject = :u",
        u=uid,
    )
    assert len(audit) == 1 and audit[0][0] == "console:rui" and '"decision": "disagree"' in audit[0][1]
    assert server.rows("SELECT COUNT(*) FROM audit_events WHERE action = 'console.study_viewed'")[0][0] >= 1

    # A form posted without its CSRF token is refused, and records nothing.
    driver.get(study_url)
    driver.execute_script("document.querySelector('#review-form input[name=csrf_token]').remove()")
    driver.find_element(By.ID, "decision-na").click()
    _submit(driver, "review-submit")
    assert driver.find_element(By.TAG_NAME, "h1").text == "403"
    assert server.rows("SELECT COUNT(*) FROM study_reviews")[0][0] == 1

    # A viewer cannot open a study page.
    driver.delete_all_cookies()
    _sign_in(driver, base, "vera")
    assert driver.current_url.endswith("/dashboard")
    driver.get(study_url)
    assert driver.find_element(By.TAG_NAME, "h1").text == "403"
    assert CANARY.split("^")[0] not in driver.page_source

    # Five wrong passwords lock the account; then even the right one is refused.
    driver.delete_all_cookies()
    for _ in range(5):
        _sign_in(driver, base, "ana", "not the password at all")
    assert "locked" in driver.page_source
    _sign_in(driver, base, "ana")
    assert driver.current_url.endswith("/login") and "locked" in driver.page_source
    locked = server.rows("SELECT locked_until FROM console_users WHERE name = 'ana'")[0][0]
    assert locked is not None

    # No patient name in the daemon's log, no UID in any URL the browser saw.
    time.sleep(0.2)
    assert CANARY.split("^")[0] not in server.log_text()
    assert uid not in study_url
