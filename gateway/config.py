"""Configuration: one frozen object built at the edge from `GATEWAY_*` variables and flags.

Nothing reads the environment at import time; `Settings.from_env` is called by the CLI (or a
test) and the result is passed to `create_app`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_DATA_DIR = "./gateway-data"
DEFAULT_SWEEP_INTERVAL_S = 1.0
DEFAULT_CONFIRM_TIMEOUT_S = 60
DEFAULT_RUNNER_HEARTBEAT_TIMEOUT_S = 300
DEFAULT_CALLBACK_TIMEOUT_S = 86_400
DEFAULT_MAX_BODY_BYTES = 1_048_576
DEFAULT_RETENTION_DAYS = 30
DEFAULT_WEBHOOK_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,36000"
DEFAULT_WEBHOOK_TIMEOUT_S = 15.0
DEFAULT_WEBHOOK_DISABLE_AFTER_S = 5 * 86_400
DEFAULT_WEBHOOK_CONCURRENCY = 32
DEFAULT_WEBHOOK_ENDPOINT_CONCURRENCY = 4
DEFAULT_WEBHOOK_INLINE_BYTES = 262_144
DEFAULT_MAX_ARTIFACT_BYTES = 10_485_760
DEFAULT_ARTIFACT_URL_TTL_S = 7 * 86_400
SWEEP_BATCH_SIZE = 1000
DEFAULT_DB_POOL_SIZE = 10


@dataclass(frozen=True)
class Settings:
    """Everything `gateway serve` needs to know, typed and validated."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    db: str | None = None
    db_pool_size: int = DEFAULT_DB_POOL_SIZE
    public_url: str | None = None
    admin_token: str | None = None
    secret_key: str | None = None
    metrics_token: str | None = None
    sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S
    confirm_timeout_s: int = DEFAULT_CONFIRM_TIMEOUT_S
    runner_heartbeat_timeout_s: int = DEFAULT_RUNNER_HEARTBEAT_TIMEOUT_S
    default_callback_timeout_s: int = DEFAULT_CALLBACK_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retention_days: int = DEFAULT_RETENTION_DAYS
    webhook_secret: str | None = None
    webhook_retry_schedule: str = DEFAULT_WEBHOOK_RETRY_SCHEDULE
    webhook_timeout_s: float = DEFAULT_WEBHOOK_TIMEOUT_S
    webhook_allow_nets: str | None = None
    webhook_disable_after_s: int = DEFAULT_WEBHOOK_DISABLE_AFTER_S
    webhook_concurrency: int = DEFAULT_WEBHOOK_CONCURRENCY
    webhook_endpoint_concurrency: int = DEFAULT_WEBHOOK_ENDPOINT_CONCURRENCY
    webhook_inline_bytes: int = DEFAULT_WEBHOOK_INLINE_BYTES
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    artifact_url_ttl_s: int = DEFAULT_ARTIFACT_URL_TTL_S

    @property
    def base_url(self) -> str:
        """Where continue URLs point: `GATEWAY_PUBLIC_URL`, else the listening address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "localhost" if self.host in ("0.0.0.0", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def postgres_dsn(self) -> str | None:
        """`db` when it names a PostgreSQL database (`postgresql://` or `postgres://`)."""
        if self.db is not None and self.db.startswith(("postgresql://", "postgres://")):
            return self.db
        return None

    @property
    def sqlite_path(self) -> Path:
        """The embedded database file (`sqlite:///path` in `db`, else inside the data dir)."""
        if self.db is None:
            return self.data_dir / "gateway.sqlite3"
        if self.db.startswith("sqlite:///"):
            return Path(self.db.removeprefix("sqlite:///"))
        raise ConfigError(f"unsupported database URL scheme: {self.db.split(':', 1)[0]}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `GATEWAY_*` variables; keyword overrides (flags) win.

        Raises ConfigError naming the variable when a value has the wrong type.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(f"GATEWAY_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(field.name, field.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError when a value is out of range."""
        if not 0 < self.port < 65536:
            raise ConfigError("GATEWAY_PORT must be between 1 and 65535")
        for name in (
            "sweep_interval_s",
            "confirm_timeout_s",
            "runner_heartbeat_timeout_s",
            "default_callback_timeout_s",
            "max_body_bytes",
            "retention_days",
            "webhook_timeout_s",
            "webhook_disable_after_s",
            "webhook_concurrency",
            "webhook_endpoint_concurrency",
            "max_artifact_bytes",
            "artifact_url_ttl_s",
            "db_pool_size",
        ):
            if not 0 < getattr(self, name) < math.inf:  # also refuses NaN
                raise ConfigError(f"GATEWAY_{name.upper()} must be positive and finite")
        if self.webhook_inline_bytes < 0:
            raise ConfigError("GATEWAY_WEBHOOK_INLINE_BYTES must be 0 (never inline) or more")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError("GATEWAY_PUBLIC_URL must start with http:// or https://")
        if self.postgres_dsn is None:
            self.sqlite_path  # noqa: B018 - raises on an unsupported scheme
        self.retry_schedule  # noqa: B018 - raises on a bad schedule
        self.allow_nets  # noqa: B018 - raises on a bad CIDR

    @property
    def retry_schedule(self) -> tuple[float, ...]:
        """Seconds to wait before each retry of a webhook delivery."""
        try:
            delays = tuple(float(p) for p in self.webhook_retry_schedule.split(",") if p.strip())
        except ValueError:
            delays = (-1.0,)
        if not all(0 <= d < math.inf for d in delays):
            raise ConfigError(
                "GATEWAY_WEBHOOK_RETRY_SCHEDULE must be comma-separated non-negative seconds"
            )
        return delays

    @property
    def allow_nets(self) -> tuple[Any, ...]:
        """`GATEWAY_WEBHOOK_ALLOW_NETS` as networks."""
        from gateway.webhooks.guard import parse_networks

        try:
            return parse_networks(self.webhook_allow_nets)
        except ValueError as exc:
            raise ConfigError(f"GATEWAY_WEBHOOK_ALLOW_NETS: {exc}") from None


def _convert(name: str, annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"GATEWAY_{name.upper()} must be a number, got {raw!r}") from None
    return raw
