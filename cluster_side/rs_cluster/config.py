"""What every stage config shares: building a frozen dataclass from a dict, unknown keys refused."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from rs_cluster.errors import ConfigError


def check_keys(cls: type, data: dict[str, Any], stage: str) -> dict[str, Any]:
    """A copy of ``data`` once every key is a field of ``cls``; else a ConfigError naming them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{stage}: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return dict(data)
