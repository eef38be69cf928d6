"""Fixtures every tier shares. Kept free of heavy imports: the QGIS venv loads it too."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The repository's own packages win over anything installed (the plugin is not pip-installed).
for p in (REPO, REPO / "cluster_side"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
