"""Settings: read once from PROCESSOR_* variables, errors name the variable, secrets stay hidden."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from processor.settings import Settings, SettingsError, load_settings

SECRET = "s3cr3t-pa55"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PROCESSOR_* variable from the caller, and no .env in the working directory."""
    for key in list(os.environ):
        if key.startswith("PROCESSOR_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def error_for(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


def test_defaults_load_without_any_variable() -> None:
    settings = load_settings()
    assert settings.stream == "teltonika:records"
    assert settings.dead_letter_stream == "teltonika:records:dead"
    assert settings.max_entry_bytes == 65_536


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("PROCESSOR_BATCH_MAX_SIZE", "abc", "valid integer"),
        ("PROCESSOR_BATCH_MAX_SIZE", "-5", "greater than 0"),
        ("PROCESSOR_BATCH_MAX_SIZE", "0", "greater than 0"),
        ("PROCESSOR_LOG_FORMAT", "xml", "'json' or 'console'"),
        ("PROCESSOR_LOG_LEVEL", "loud", "'debug'"),
        ("PROCESSOR_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("PROCESSOR_RETRY_MAX_S", "soon", "valid number"),
        ("PROCESSOR_DOMAIN_ENABLED", "maybe", "valid boolean"),
        ("PROCESSOR_STREAM", "", "at least 1 character"),
    ],
)
def test_invalid_value_names_the_variable_and_the_problem(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, complaint: str
) -> None:
    message = error_for(monkeypatch, **{variable: value})
    assert variable in message
    assert complaint in message


def test_every_invalid_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_for(monkeypatch, PROCESSOR_BATCH_MAX_SIZE="abc", PROCESSOR_LOG_FORMAT="xml")
    assert "PROCESSOR_BATCH_MAX_SIZE" in message
    assert "PROCESSOR_LOG_FORMAT" in message


def test_invalid_override_is_named_like_its_variable() -> None:
    with pytest.raises(SettingsError, match="PROCESSOR_READ_COUNT"):
        load_settings(read_count=-1)


def test_overrides_win_and_none_means_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSOR_STREAM", "from-env")
    assert load_settings(stream="from-flag").stream == "from-flag"
    assert load_settings(stream=None).stream == "from-env"


def test_dotenv_file_is_read_and_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("PROCESSOR_BATCH_MAX_SIZE=42\nPROCESSOR_GROUP=dotenv\n")
    monkeypatch.setenv("PROCESSOR_GROUP", "env")
    settings = load_settings()
    assert settings.batch_max_size == 42
    assert settings.group == "env"


def test_file_variable_supplies_a_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"postgresql://app:{SECRET}@db.internal:5432/race"
    (tmp_path / "db_url").write_text(url + "\n")
    (tmp_path / "token").write_text(SECRET)
    monkeypatch.setenv("PROCESSOR_DATABASE_URL_FILE", str(tmp_path / "db_url"))
    monkeypatch.setenv("PROCESSOR_WEBHOOK_TOKEN_FILE", str(tmp_path / "token"))
    settings = load_settings()
    assert settings.database_dsn() == url
    assert settings.webhook_token is not None
    assert settings.webhook_token.get_secret_value() == SECRET


def test_unreadable_file_variable_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = error_for(monkeypatch, PROCESSOR_REDIS_URL_FILE=str(tmp_path / "missing"))
    assert "PROCESSOR_REDIS_URL_FILE" in message
    assert "missing" in message


def secret_settings() -> Settings:
    return load_settings(
        database_url=f"postgresql://app:{SECRET}@db:5432/race",
        redis_url=f"redis://:{SECRET}@redis:6379/0",
        gateway_alerts_token=SECRET,
        webhook_token=SECRET,
    )


def test_secrets_never_appear_in_repr_or_str() -> None:
    settings = secret_settings()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in settings.model_dump_json()
    assert SECRET in settings.redis_dsn()


def test_invalid_url_message_does_not_echo_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_for(monkeypatch, PROCESSOR_DIRECTUS_URL=f"not a url {SECRET}")
    assert "PROCESSOR_DIRECTUS_URL" in message
    assert SECRET not in message


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.stream = "other"  # type: ignore[misc]


def test_allowed_origins_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSOR_GATEWAY_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    assert load_settings().gateway_allowed_origins == ("https://a.example", "https://b.example")


def test_unparseable_json_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_for(monkeypatch, PROCESSOR_WEBHOOK_ROUTES="not json")
    assert "PROCESSOR_WEBHOOK_ROUTES" in message


def test_json_setting_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCESSOR_WEBHOOK_ROUTES", '{"timing.recorded": "https://x.example/hook"}')
    assert load_settings().webhook_routes == {"timing.recorded": "https://x.example/hook"}
