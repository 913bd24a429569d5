"""Built-in register maps (`profile:` in a device): one YAML file per instrument family here."""

from __future__ import annotations

from pathlib import Path

PROFILE_DIR = Path(__file__).parent


def names() -> list[str]:
    """Names of the built-in profiles (file names without `.yaml`)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
