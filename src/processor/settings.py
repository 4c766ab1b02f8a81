"""The one typed settings object, read from ``PROCESSOR_*`` environment variables.

Built once at start-up by :func:`load_settings` and passed down; nothing reads the
environment after that. Every setting can also come from a file: ``PROCESSOR_X_FILE``
names a file whose content (stripped) is the value of ``PROCESSOR_X``, which keeps
secrets out of the environment and out of process listings.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyUrl, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "PROCESSOR_"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class SettingsError(Exception):
    """Invalid configuration; the message names each variable and what is wrong."""


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every setting of the service, its tools and the gateway (see docs/configuration.md)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    # Connections
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    db_pool_min: PositiveInt = 2
    db_pool_max: PositiveInt = 8
    db_command_timeout_s: PositiveFloat = 60.0

    # Stream contract and consumer group
    stream: str = Field("teltonika:records", min_length=1)
    group: str = Field("processor", min_length=1)
    consumer: str = Field(default_factory=_default_consumer_name, min_length=1)
    dead_letter_stream: str = Field("teltonika:records:dead", min_length=1)
    max_deliveries: PositiveInt = 5
    claim_idle_ms: PositiveInt = 60_000
    read_count: PositiveInt = 2_000
    read_block_ms: PositiveInt = 500
    max_entry_bytes: PositiveInt = 65_536
    max_io_elements: PositiveInt = 512

    # Batching and backpressure
    batch_max_size: PositiveInt = 5_000
    batch_max_age_ms: PositiveInt = 100
    queue_max_batches: PositiveInt = 2
    write_concurrency: PositiveInt = 2
    state_capacity: PositiveInt = 100_000
    retry_initial_s: PositiveFloat = 0.2
    retry_max_s: PositiveFloat = 10.0

    # Storage layout of positions
    timescale: Literal["auto", "on", "off"] = "auto"
    chunk_interval: str = "1 day"
    compression_after: str | None = "7 days"
    partitions_ahead: NonNegativeInt = 3
    partition_interval_days: PositiveInt = 1

    # Attributes
    default_device_model: str = "FMB920"
    mapping_reload_s: PositiveFloat = 5.0

    # Domain
    domain_enabled: bool = True
    domain_tick_s: PositiveFloat = 5.0
    domain_shards: Annotated[int, Field(ge=1, le=1024)] = 16
    domain_lease_ttl_ms: Annotated[int, Field(ge=1000)] = 10_000
    domain_batch_s: PositiveFloat = 0.5

    # Observability and lifecycle
    http_host: str = "0.0.0.0"  # noqa: S104 - metrics and probes must be reachable by the scraper
    http_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout_s: PositiveFloat = 15.0

    # Live channel and gateway
    live_prefix: str = "live"
    gateway_host: str = "127.0.0.1"
    gateway_port: Annotated[int, Field(ge=0, le=65535)] = 8765
    # NoDecode: a comma-separated list, split by the validator below, not JSON.
    gateway_allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()
    gateway_alerts_token: SecretStr | None = None
    gateway_client_queue: PositiveInt = 64
    gateway_max_message_bytes: PositiveInt = 65_536
    gateway_max_connections: PositiveInt = 20_000
    gateway_ping_interval_s: PositiveFloat = 20.0
    gateway_write_limit_bytes: PositiveInt = 262_144
    gateway_connect_rate_per_s: PositiveFloat = 20.0
    gateway_connect_burst: PositiveInt = 200
    gateway_subscribe_rate_per_s: PositiveFloat = 5.0
    gateway_subscribe_burst: PositiveInt = 20
    gateway_max_subscriptions: PositiveInt = 16
    gateway_compression: bool = True
    gateway_reuse_port: bool = False
    gateway_socket_send_buffer_bytes: PositiveInt = 262_144

    # Domain events (outbox → webhooks)
    directus_url: AnyUrl | None = None
    webhook_routes: dict[str, str] = Field(default_factory=dict)
    webhook_token: SecretStr | None = None
    webhook_timeout_s: PositiveFloat = 5.0
    webhook_max_attempts: PositiveInt = 10
    webhook_backoff_initial_s: PositiveFloat = 1.0
    webhook_backoff_max_s: PositiveFloat = 300.0
    dispatch_enabled: bool = True

    # Analytics export
    export_group: str = Field("analytics", min_length=1)
    export_max_rows: PositiveInt = 100_000
    export_max_age_s: PositiveFloat = 60.0
    export_workers: NonNegativeInt = 0
    export_read_count: PositiveInt = 10_000

    @field_validator("gateway_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def database_dsn(self) -> str:
        """The PostgreSQL DSN in clear, for the driver only; never log it."""
        return self.database_url.get_secret_value()

    def redis_dsn(self) -> str:
        """The Redis URL in clear, for the client only; never log it."""
        return self.redis_url.get_secret_value()


def _file_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Values given as ``PROCESSOR_X_FILE=path``: read the file, keyed by field name."""
    overrides: dict[str, str] = {}
    for key, path in environ.items():
        if not (key.startswith(ENV_PREFIX) and key.endswith("_FILE")):
            continue
        name = key[len(ENV_PREFIX) : -len("_FILE")].lower()
        if name not in Settings.model_fields:
            continue
        try:
            overrides[name] = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"{key}: cannot read {path!r}: {exc.strerror}") from exc
    return overrides


def _describe(error: Mapping[str, Any]) -> str:
    field = str(error["loc"][0]) if error["loc"] else "settings"
    variable = f"{ENV_PREFIX}{field.upper()}"
    got = error.get("input")
    shown = "" if isinstance(got, dict | SecretStr) or "url" in field else f" (got {got!r})"
    return f"{variable}: {error['msg']}{shown}"


def _describe_source(exc: SourceError) -> str:
    """Name the variable behind a pydantic-settings parse error (its message names the field)."""
    match = re.search(r'field "(\w+)"', str(exc))
    variable = f"{ENV_PREFIX}{match.group(1).upper()}" if match else "settings"
    return f"{variable}: cannot parse the value (JSON expected for this setting)"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment (and ``.env``), plus explicit overrides.

    Overrides come from CLI flags; ``None`` means "not given". Raises
    :class:`SettingsError` naming every invalid variable.
    """
    values: dict[str, Any] = _file_overrides(os.environ)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except SourceError as exc:  # a value pydantic-settings could not parse (JSON fields)
        raise SettingsError(f"invalid configuration:\n  {_describe_source(exc)}") from exc
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from exc
