"""The operator docs stay true to the code: every setting is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from processor.settings import ENV_PREFIX, Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_in_the_configuration_reference(name: str) -> None:
    reference = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert f"`{ENV_PREFIX}{name.upper()}`" in reference


def test_every_documented_setting_exists() -> None:
    reference = (DOCS / "configuration.md").read_text(encoding="utf-8")
    documented = {
        word.strip("`|").removeprefix(ENV_PREFIX).lower()
        for word in reference.split()
        if word.startswith(f"`{ENV_PREFIX}") and not word.rstrip("`|").endswith("_FILE")
    }
    documented = {name for name in documented if name.isidentifier()}
    documented -= {"test_database_url", "test_redis_url"}  # the test suite's own variables
    assert documented <= set(Settings.model_fields)
