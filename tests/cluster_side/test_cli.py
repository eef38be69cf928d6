"""The CLI: instant --help without heavy imports, JSON-lines progress events from a real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rs_cluster.progress import parse_event
from tests import devdata

HEAVY = ("tensorflow", "horovod", "pyspark", "petastorm", "rasterio")


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom rs_cluster import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "prepare" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.spark
def test_prepare_writes_json_lines_progress_events(tmp_path):
    images, masks = devdata.link_pairs(tmp_path / "in", {
        "xiamen_robosat_z18": devdata.first_files("xiamen_robosat_z18", 3)})
    events = tmp_path / "events.jsonl"
    proc = subprocess.run([sys.executable, "-m", "rs_cluster", "--quiet", "--events", str(events),
                           "prepare", "--images", str(images), "--masks", str(masks),
                           "--output", str(tmp_path / "out"), "--split", "1,0,0", "--master", "local[1]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    parsed = [parse_event(line) for line in events.read_text().splitlines()]
    assert all(e["stage"] == "prepare" for e in parsed)
    kinds = [e["event"] for e in parsed]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    progress = [e for e in parsed if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 12
    assert progress[-1]["rasters_done"] == 3
    assert parsed[-1]["tiles"] == {"train": 12, "val": 0, "test": 0}
    assert json.loads(json.dumps(parsed))  # every event is plain JSON
