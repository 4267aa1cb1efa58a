"""Settings: built from a mapping of GATEWAY_* variables and flags, typed and validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    DEFAULT_CALLBACK_TIMEOUT_S,
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    Settings,
)
from gateway.errors import ConfigError


def test_defaults_without_any_variable() -> None:
    """An empty environment gives the documented defaults."""
    settings = Settings.from_env({})
    assert settings.host == DEFAULT_HOST == "127.0.0.1"
    assert settings.port == DEFAULT_PORT == 8080
    assert settings.data_dir == Path(DEFAULT_DATA_DIR)
    assert settings.default_callback_timeout_s == DEFAULT_CALLBACK_TIMEOUT_S == 86_400
    assert settings.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 1_048_576
    assert settings.public_url is None
    assert settings.db is None


def test_reads_gateway_variables_from_the_given_mapping() -> None:
    """Every GATEWAY_* variable lands in its typed field."""
    settings = Settings.from_env(
        {
            "GATEWAY_HOST": "0.0.0.0",
            "GATEWAY_PORT": "9000",
            "GATEWAY_DATA_DIR": "/srv/gateway",
            "GATEWAY_PUBLIC_URL": "https://ci.example.com",
            "GATEWAY_ADMIN_TOKEN": "gw_admin",
            "GATEWAY_SECRET_KEY": "s3cret",
            "GATEWAY_SWEEP_INTERVAL_S": "0.25",
            "GATEWAY_CONFIRM_TIMEOUT_S": "30",
            "GATEWAY_RUNNER_HEARTBEAT_TIMEOUT_S": "120",
            "GATEWAY_DEFAULT_CALLBACK_TIMEOUT_S": "3600",
            "GATEWAY_MAX_BODY_BYTES": "2048",
            "GATEWAY_RETENTION_DAYS": "7",
            "UNRELATED": "ignored",
        }
    )
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.data_dir == Path("/srv/gateway")
    assert settings.public_url == "https://ci.example.com"
    assert settings.admin_token == "gw_admin"
    assert settings.secret_key == "s3cret"
    assert settings.sweep_interval_s == 0.25
    assert settings.confirm_timeout_s == 30
    assert settings.runner_heartbeat_timeout_s == 120
    assert settings.default_callback_timeout_s == 3600
    assert settings.max_body_bytes == 2048
    assert settings.retention_days == 7


def test_a_given_mapping_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_env(mapping) reads only that mapping, not os.environ."""
    monkeypatch.setenv("GATEWAY_PORT", "1234")
    assert Settings.from_env({}).port == DEFAULT_PORT
    assert Settings.from_env().port == 1234


def test_empty_variables_count_as_unset() -> None:
    """GATEWAY_PORT= (empty) falls back to the default instead of failing."""
    assert Settings.from_env({"GATEWAY_PORT": "", "GATEWAY_HOST": ""}).port == DEFAULT_PORT


def test_flags_win_over_variables() -> None:
    """A keyword override (a command-line flag) beats the variable; None means not given."""
    env = {"GATEWAY_PORT": "9000", "GATEWAY_HOST": "10.0.0.1", "GATEWAY_DATA_DIR": "/env"}
    settings = Settings.from_env(env, port=9100, host=None, data_dir="/flag")
    assert settings.port == 9100
    assert settings.host == "10.0.0.1"
    assert settings.data_dir == Path("/flag")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_PORT", "eighty"),
        ("GATEWAY_PORT", "80.5"),
        ("GATEWAY_SWEEP_INTERVAL_S", "fast"),
        ("GATEWAY_CONFIRM_TIMEOUT_S", "1m"),
        ("GATEWAY_MAX_BODY_BYTES", "1MiB"),
        ("GATEWAY_RETENTION_DAYS", "0x"),
        ("GATEWAY_DEFAULT_CALLBACK_TIMEOUT_S", "1e3"),
    ],
)
def test_bad_numbers_raise_config_error_naming_the_variable(variable: str, value: str) -> None:
    """A non-number is refused at start, and the message says which variable."""
    with pytest.raises(ConfigError) as error:
        Settings.from_env({variable: value})
    assert variable in str(error.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_PORT", "0"),
        ("GATEWAY_PORT", "65536"),
        ("GATEWAY_PORT", "-1"),
        ("GATEWAY_SWEEP_INTERVAL_S", "0"),
        ("GATEWAY_SWEEP_INTERVAL_S", "-0.5"),
        ("GATEWAY_SWEEP_INTERVAL_S", "nan"),
        ("GATEWAY_SWEEP_INTERVAL_S", "inf"),
        ("GATEWAY_CONFIRM_TIMEOUT_S", "0"),
        ("GATEWAY_RUNNER_HEARTBEAT_TIMEOUT_S", "-5"),
        ("GATEWAY_DEFAULT_CALLBACK_TIMEOUT_S", "0"),
        ("GATEWAY_MAX_BODY_BYTES", "0"),
        ("GATEWAY_RETENTION_DAYS", "-1"),
    ],
)
def test_out_of_range_values_raise_config_error_naming_the_variable(
    variable: str, value: str
) -> None:
    """Zero, negative, NaN or infinite intervals and sizes are refused, naming the variable."""
    with pytest.raises(ConfigError) as error:
        Settings.from_env({variable: value})
    assert variable in str(error.value)


def test_a_nan_flag_is_refused_too() -> None:
    """Flags go through the same validation as variables."""
    with pytest.raises(ConfigError, match="GATEWAY_SWEEP_INTERVAL_S"):
        Settings.from_env({}, sweep_interval_s=float("nan"))


@pytest.mark.parametrize("url", ["ci.example.com", "ftp://ci.example.com", "//ci.example.com"])
def test_public_url_must_be_http(url: str) -> None:
    """GATEWAY_PUBLIC_URL needs an http(s) scheme."""
    with pytest.raises(ConfigError, match="GATEWAY_PUBLIC_URL"):
        Settings.from_env({"GATEWAY_PUBLIC_URL": url})


@pytest.mark.parametrize(
    ("env", "base_url"),
    [
        ({}, "http://127.0.0.1:8080"),
        ({"GATEWAY_PORT": "9000"}, "http://127.0.0.1:9000"),
        ({"GATEWAY_HOST": "gw.internal"}, "http://gw.internal:8080"),
        ({"GATEWAY_HOST": "0.0.0.0"}, "http://localhost:8080"),
        ({"GATEWAY_HOST": "::"}, "http://localhost:8080"),
        ({"GATEWAY_HOST": "::1"}, "http://[::1]:8080"),
        ({"GATEWAY_HOST": "fd00::5", "GATEWAY_PORT": "81"}, "http://[fd00::5]:81"),
        ({"GATEWAY_PUBLIC_URL": "https://ci.example.com"}, "https://ci.example.com"),
        ({"GATEWAY_PUBLIC_URL": "https://ci.example.com/"}, "https://ci.example.com"),
        ({"GATEWAY_PUBLIC_URL": "https://ci.example.com/gw/"}, "https://ci.example.com/gw"),
        (
            {"GATEWAY_PUBLIC_URL": "https://lb.example.com", "GATEWAY_HOST": "0.0.0.0"},
            "https://lb.example.com",
        ),
    ],
)
def test_base_url_rules(env: dict[str, str], base_url: str) -> None:
    """public_url wins (without a trailing slash); 0.0.0.0 becomes localhost; IPv6 is bracketed."""
    assert Settings.from_env(env).base_url == base_url


def test_sqlite_path_defaults_to_the_data_dir() -> None:
    """Without GATEWAY_DB the database is a file inside the data dir."""
    settings = Settings.from_env({"GATEWAY_DATA_DIR": "/srv/gw"})
    assert settings.sqlite_path.parent == Path("/srv/gw")
    assert settings.sqlite_path.suffix.startswith(".sqlite")


@pytest.mark.parametrize(
    ("db", "path"),
    [
        ("sqlite:///gateway.db", Path("gateway.db")),
        ("sqlite:///data/gateway.db", Path("data/gateway.db")),
        ("sqlite:////var/lib/gateway/db.sqlite3", Path("/var/lib/gateway/db.sqlite3")),
    ],
)
def test_sqlite_url_names_the_file(db: str, path: Path) -> None:
    """sqlite:///relative and sqlite:////absolute, as SQLAlchemy spells them."""
    settings = Settings.from_env({"GATEWAY_DB": db, "GATEWAY_DATA_DIR": "/elsewhere"})
    assert settings.sqlite_path == path


@pytest.mark.parametrize("db", ["mysql://root@localhost/gw", "sqlite://gateway.db", "gateway.db"])
def test_unsupported_database_urls_are_refused_at_start(db: str) -> None:
    """A database URL the gateway cannot use fails configuration, not the first request."""
    with pytest.raises(ConfigError):
        Settings.from_env({"GATEWAY_DB": db})


def test_settings_are_frozen() -> None:
    """Configuration is one immutable object."""
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
