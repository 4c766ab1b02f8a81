"""The `processor` command: help lists what exists, bad configuration exits 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from processor.cli import COMMANDS, _available, cli, settings_or_exit


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    env.update(extra)
    return env


def test_help_lists_every_available_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line]
    assert listed == sorted(name for name in COMMANDS if _available(name))
    assert "run" in listed


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_console_entry_point_prints_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "processor", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: processor" in done.stdout


def test_settings_or_exit_prints_the_problem_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROCESSOR_BATCH_MAX_SIZE", "abc")
    with pytest.raises(SystemExit) as caught:
        settings_or_exit()
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "PROCESSOR_BATCH_MAX_SIZE" in err
    assert "Traceback" not in err


def test_settings_or_exit_returns_settings_with_overrides(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert settings_or_exit(stream="other", group=None).stream == "other"


def test_run_with_invalid_configuration_exits_2_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "processor", "run"],
        capture_output=True,
        text=True,
        env=clean_env(PROCESSOR_BATCH_MAX_SIZE="abc", PROCESSOR_LOG_FORMAT="xml"),
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "PROCESSOR_BATCH_MAX_SIZE" in done.stderr
    assert "PROCESSOR_LOG_FORMAT" in done.stderr
    assert "Traceback" not in done.stderr
