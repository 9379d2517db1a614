"""Every setting is documented in .env.example and the README (a fixed point)."""

from __future__ import annotations

from pathlib import Path

import pytest

from esprelay.config import Settings
from esprelay.providers.base import ProviderSettings
from esprelay.providers.registry import get_kind, registered, variable

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("document", [".env.example", "README.md"])
def test_every_setting_is_documented(document: str) -> None:
    text = (ROOT / document).read_text(encoding="utf-8")
    missing = [f"ESPRELAY_{name.upper()}" for name in Settings.model_fields]
    for name in registered():  # each provider's own settings, ESPRELAY_<KIND>_*
        kind = get_kind(name)
        own = vars(kind.settings).get("__annotations__", {})
        missing += [
            variable(kind, field)
            for field in kind.settings.model_fields
            if field in own or field not in ProviderSettings.model_fields
        ]
    # Every kind's common settings (rate limits), documented once for all.
    missing += [f"ESPRELAY_<KIND>_{field.upper()}" for field in ProviderSettings.model_fields]
    missing = [v for v in missing if v not in text]
    assert missing == [], f"{document} does not mention {missing}"


def test_quick_start_is_exactly_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    assert [line for line in block.splitlines() if line.strip()] == ["make run", "make test"]
