"""The built-in models that ship inside this package, so an analyst with no labels can predict.

``--model builtin`` (predict) and ``--init-model builtin`` (train, to fine-tune it) name the
default one; ``builtin:NAME`` names another. Each is an ordinary model folder (``model.json`` and
the weights file written by ``rs-cluster train``) under ``rs_cluster/builtin_models/``, resolved on
every host that runs rs-cluster: drivers, executors and Horovod workers each find the copy of their
own installation, so nothing is copied between hosts and no store is needed for it.
"""

from __future__ import annotations

import re
from pathlib import Path

from rs_cluster.errors import ConfigError

PREFIX = "builtin"
DEFAULT = "buildings-v1"
FOLDER = Path(__file__).with_name("builtin_models")
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")


def names() -> list[str]:
    """The built-in models this installation holds."""
    if not FOLDER.is_dir():
        return []
    return sorted(p.name for p in FOLDER.iterdir() if (p / "model.json").is_file())


def name_of(ref: str) -> str | None:
    """The built-in model a ``--model`` value names (``builtin`` or ``builtin:NAME``), or None for
    a folder or URL. An unknown or malformed name is refused, listing what there is."""
    if ref != PREFIX and not ref.startswith(PREFIX + ":"):
        return None
    name = ref.partition(":")[2] or DEFAULT
    if not _NAME.match(name) or name not in names():
        have = ", ".join(f"{PREFIX}:{n}" for n in names()) or "none in this installation"
        raise ConfigError(f"{ref}: no such built-in model (built in: {have})")
    return name


def resolve(ref: str) -> str:
    """``ref`` itself, or for a built-in model the folder of this host's copy."""
    name = name_of(ref)
    return ref if name is None else str(FOLDER / name)
