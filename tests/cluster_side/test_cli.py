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


def test_following_a_job_that_ended_shows_its_events_and_end_at_once_without_heavy_imports(
        tmp_path):
    """``job events --follow`` on a login host starts at once (none of the stages' libraries),
    and for a job that already ended prints what it did and how it ended, then exits."""
    job = tmp_path / "ws" / "jobs" / "ended1"
    job.mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({"schema_version": 1, "job_id": "ended1", "steps": [
        {"stage": "predict", "params": {"model": "inputs/m", "input": "inputs/i",
                                        "output": "outputs/o"}}]}))
    (job / "status.json").write_text(json.dumps({
        "schema_version": 1, "job_id": "ended1", "state": "failed", "pid": None,
        "message": "predict failed: \x1b[31mno model\x1b[0m"}))
    envelope = {"v": 1, "time": "2026-01-01T00:00:00+00:00"}
    (job / "events.jsonl").write_text("".join(json.dumps({**envelope, **e}) + "\n" for e in [
        {"stage": "job", "event": "start", "total": 1, "unit": "steps", "message": "ended1"},
        {"stage": "predict", "event": "warning", "message": "no GPU"},
        {"stage": "job", "event": "finish", "message": "predict failed", "state": "failed"},
    ]) + '{"v": 1, "stage": "job", "event": "cut sh')  # a last line a full disk cut short
    code = ("import sys\nfrom rs_cluster import cli\n"
            f"code = cli.main(['job', 'events', '--workspace', {str(tmp_path / 'ws')!r}, "
            "'ended1', '--follow'])\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])\nsys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "[job] ended1", "[predict] warning: no GPU", "[job] predict failed",
        "job ended1 failed: predict failed:  [31mno model [0m", "[]"]
