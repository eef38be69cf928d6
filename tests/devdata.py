"""The real dev imagery in ``../shared/data/dev`` (or ``$RS_DEV_DATA``), for tests and benchmarks.

It is read in place, never copied into the repository: tests link the files they need into a
temporary folder so each test sees exactly the rasters it chose.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV_DATA = Path(os.environ.get("RS_DEV_DATA", REPO.parent / "shared" / "data" / "dev"))


def subset(name: str) -> Path:
    path = DEV_DATA / name
    if not (path / "images").is_dir():
        raise FileNotFoundError(f"dev data subset {path} is missing; set RS_DEV_DATA to the dev set")
    return path


def link_pairs(dest: Path, picks: dict[str, list[str]]) -> tuple[Path, Path]:
    """Symlinks chosen pairs ``{subset: [file names]}`` into ``dest/images`` and ``dest/masks``."""
    images, masks = dest / "images", dest / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for name, files in picks.items():
        src = subset(name)
        for f in files:
            (images / f).symlink_to(src / "images" / f)
            (masks / f).symlink_to(src / "gt" / f)
    return images, masks


def first_files(name: str, count: int) -> list[str]:
    return sorted(p.name for p in (subset(name) / "images").iterdir() if p.is_file())[:count]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 and mtime of every file under ``folder`` (following links): proves nothing changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            real = p.resolve()
            out[str(p)] = hashlib.sha256(real.read_bytes()).hexdigest() + f"@{real.stat().st_mtime_ns}"
    return out
