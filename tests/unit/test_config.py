"""config.toml -> frozen dataclasses; SCREENER__SECTION__KEY overrides; clear errors."""

from __future__ import annotations

import dataclasses
import subprocess
import tomllib
from pathlib import Path

import pytest

from screener.core.config import Config, PacsDestination, load_config, resolve_config_path
from screener.core.errors import ConfigError
from tests.helpers import REPO, SCREENER

TRAINER = SCREENER.with_name("trainer")

# Every key an operator script or a later issue relies on, with a file value and an env override value.
NAMED_KEYS = {
    "listener.ae_title": ("FILEAE", "ENVAE", "ENVAE"),
    "listener.host": ("0.0.0.0", "::1", "::1"),
    "listener.port": (104, "11113", 11113),
    "listener.allowed_calling_aets": (["A"], '["A","B@10.0.0.1"]', ("A", "B@10.0.0.1")),
    "listener.max_associations": (4, "8", 8),
    "listener.drain_seconds": (5, "7.5", 7.5),
    "listener.tls.require_client_cert": (False, "false", False),
    "storage.spool_dir": ("/srv/spool", "/data/spool", Path("/data/spool")),
    "storage.min_free_bytes": (1, "2048", 2048),
    "database.url": ("sqlite:///x.db", "postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    "database.auto_migrate": (True, "false", False),
    "inference.backend": ("torch", "onnxruntime", "onnxruntime"),
    "inference.max_batch": (8, "64", 64),
    "inference.max_wait_ms": (10, "50", 50),
    "inference.study_settle_seconds": (1, "45", 45.0),
    "models.dir": ("/srv/models", "/opt/models", Path("/opt/models")),
    "results.mode": ("shadow", "live", "live"),
    "metrics.port": (9000, "9200", 9200),
    "logging.level": ("DEBUG", "WARNING", "WARNING"),
    "logging.format": ("console", "json", "json"),
}


def _get(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _env_name(dotted: str) -> str:
    return "SCREENER__" + "__".join(p.upper() for p in dotted.split("."))


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def test_repository_config_toml_equals_built_in_defaults():
    assert load_config(REPO / "config.toml", environ={}) == Config()


def test_every_config_toml_key_has_a_comment():
    for line in (REPO / "config.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"setting without a comment: {line}"


@pytest.mark.parametrize("dotted", sorted(NAMED_KEYS))
def test_named_key_works_in_file_and_as_environment_override(tmp_path: Path, dotted: str):
    file_value, env_value, expected = NAMED_KEYS[dotted]
    *sections, key = dotted.split(".")
    path = tmp_path / "config.toml"
    path.write_text(f"[{'.'.join(sections)}]\n{key} = {_toml_value(file_value)}\n")
    from_file = _get(load_config(path, environ={}), dotted)
    expected_from_file = (
        type(expected)(file_value) if isinstance(expected, tuple | Path | float) else file_value
    )
    assert from_file == expected_from_file
    assert _get(load_config(path, environ={_env_name(dotted): env_value}), dotted) == expected


def test_pacs_destinations_from_file_and_environment(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text('[[pacs.destinations]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n')
    assert load_config(path, environ={}).pacs.destinations == (PacsDestination("ORTHANC", "127.0.0.1", 4242),)
    env = {
        "SCREENER__PACS__DESTINATIONS": '[{ae_title="A", host="h1", port=104}, '
        '{ae_title="B", host="h2", port=11112}]'
    }
    dests = load_config(path, environ=env).pacs.destinations
    assert [d.ae_title for d in dests] == ["A", "B"] and dests[1].port == 11112


def test_tls_files_from_environment(tmp_path: Path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    env = {"SCREENER__LISTENER__TLS__CERT_FILE": str(cert), "SCREENER__LISTENER__TLS__KEY_FILE": str(key)}
    tls = load_config(None, environ=env).listener.tls
    assert tls.enabled and tls.cert_file == cert and tls.key_file == key and tls.ca_file is None


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        (
            {"SCREENER__LISTENER__PORT": "abc"},
            "listener.port = 'abc' (from environment SCREENER__LISTENER__PORT): must be an integer",
        ),
        ({"SCREENER__LISTENER__PORT": "70000"}, "listener.port = 70000"),
        ({"SCREENER__LISTENER__NOPE": "1"}, "listener.nope = 1"),
        ({"SCREENER__NOSECTION__X": "1"}, "nosection = {'x': 1}"),
        (
            {"SCREENER__LISTENER__AE_TITLE": "WAY_TOO_LONG_AE_TITLE"},
            "listener.ae_title = 'WAY_TOO_LONG_AE_TITLE'",
        ),
        ({"SCREENER__INFERENCE__BACKEND": "cuda"}, "inference.backend = 'cuda'"),
        ({"SCREENER__DATABASE__AUTO_MIGRATE": "yes"}, "database.auto_migrate = 'yes'"),
        ({"SCREENER__DATABASE__URL": "mysql://x"}, "database.url = 'mysql://x'"),
        ({"SCREENER__LISTENER__TLS__CERT_FILE": "/nonexistent.pem"}, "listener.tls.cert_file"),
        ({"SCREENER__STORAGE__MIN_FREE_BYTES": "-1"}, "storage.min_free_bytes = -1"),
        ({"SCREENER__LISTENER": "1"}, "SCREENER__<SECTION>__<KEY>"),
    ],
)
def test_bad_values_stop_start_up_naming_key_and_value(env: dict[str, str], fragment: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, environ=env)
    assert fragment in str(err.value)


def test_bad_value_in_file_names_the_file(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("[listener]\nmax_associations = 0\n")
    with pytest.raises(
        ConfigError, match=r"listener.max_associations = 0 \(from .*config.toml\): must be between"
    ):
        load_config(path, environ={})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().listener.port = 1  # type: ignore[misc]


def test_config_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(None, {}) is None
    (tmp_path / "config.toml").write_text("")
    assert resolve_config_path(None, {}) == Path("config.toml")
    assert resolve_config_path(None, {"SCREENER_CONFIG": "/etc/s.toml"}) == Path("/etc/s.toml")
    assert resolve_config_path("/x.toml", {"SCREENER_CONFIG": "/etc/s.toml"}) == Path("/x.toml")


@pytest.mark.parametrize("exe", [SCREENER, TRAINER])
def test_both_clis_take_config_and_exit_2_with_the_key_named(tmp_path: Path, exe: Path):
    path = tmp_path / "c.toml"
    path.write_text('[listener]\nport = "eleven"\n')
    res = subprocess.run([str(exe), "--config", str(path), "config"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "listener.port = 'eleven'" in res.stderr
    path.write_text("[listener]\nport = 4000\n")
    res = subprocess.run([str(exe), "config", "--config", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert '"port": 4000' in res.stdout


def test_config_toml_parses_as_toml():
    tomllib.loads((REPO / "config.toml").read_text())
