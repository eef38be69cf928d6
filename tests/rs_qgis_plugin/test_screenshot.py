"""QGIS desktop under Xvfb with the plugin installed from the zip ``make package`` builds: the
imagery with the mask overlay is rendered and saved to ``build/qgis_screenshot.png``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from qgis.PyQt.QtGui import QColor, QImage

from tests import devdata

pytestmark = [pytest.mark.qgis, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TILES = ["z18_x217066_y112683.tif", "z18_x217067_y112683.tif", "z18_x217068_y112683.tif",
         "z18_x217069_y112683.tif"]  # a row of neighbouring Xiamen tiles


def magenta_share(png: Path) -> float:
    """Share of the map's drawn (not white background) pixels where the mask's colour
    (#ff28c8 at 60 % over the imagery) dominates."""
    image = QImage(str(png))
    hits = total = 0
    for y in range(0, image.height(), 4):
        for x in range(0, image.width(), 4):
            c = QColor(image.pixel(x, y))
            if min(c.red(), c.green(), c.blue()) >= 250:
                continue
            total += 1
            hits += c.red() > 150 and c.blue() > 110 and c.green() < 0.75 * min(c.red(), c.blue())
    return hits / max(total, 1)


@pytest.mark.skipif(not (shutil.which("qgis") and shutil.which("xvfb-run")),
                    reason="QGIS desktop or xvfb-run not installed")
def test_qgis_desktop_shows_the_mask_over_the_imagery():
    subprocess.run(["make", "-s", "package"], cwd=REPO, check=True, timeout=120)
    data = devdata.subset("xiamen_robosat_z18")
    out = REPO / "build" / "qgis_screenshot.png"
    pairs = [a for t in TILES for a in ("--pair", str(data / "images" / t), str(data / "gt" / t))]
    proc = subprocess.run(["/usr/bin/python3", str(REPO / "scripts" / "qgis_screenshot.py"),
                           "--zip", str(REPO / "build" / "rs_qgis_plugin.zip"), *pairs,
                           "--out", str(out), "--timeout", "150"],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(out.with_suffix(".json").read_text())
    assert state["plugin_loaded"]
    # each mask on its image's grid, in the plugin's overlay style
    assert [m["extent"] for m in state["layers"]] == [i["extent"] for i in state["images"]]
    assert {m["crs"] for m in state["layers"]} == {"EPSG:3857"}
    assert {m["renderer"] for m in state["layers"]} == {"singlebandpseudocolor"}
    map_png = out.with_name("qgis_screenshot_map.png")
    window = QImage(str(out))
    assert (window.width(), window.height()) >= (1200, 800)
    # the reference masks cover about a fifth of these tiles: the overlay must show
    assert 0.08 < magenta_share(map_png) < 0.6


def run_training_job(workspace: Path, pairs: int = 4) -> Path:
    """A real, tiny prepare + train job run by the cluster's job runner on this machine (no
    SSH: only its events and previews are wanted); returns its folder once it ended."""
    import time

    data = devdata.subset("xiamen_robosat_z18")
    job = workspace / "jobs" / "train-shot"
    for name in devdata.first_files("xiamen_robosat_z18", pairs):
        for kind, folder in (("images", "images"), ("masks", "gt")):
            target = job / "inputs" / "train" / kind / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / folder / name, target)
    (job / "job.json").write_text(json.dumps({
        "schema_version": 1, "job_id": "train-shot", "name": "train shot", "steps": [
            {"stage": "prepare", "params": {"images": "inputs/train/images",
                                            "masks": "inputs/train/masks",
                                            "output": "outputs/dataset", "tile_size": 128,
                                            "split": [0.5, 0.5, 0.0]}},
            {"stage": "train", "params": {"data": "outputs/dataset", "model_dir": "outputs/model",
                                          "epochs": 3, "batch_size": 4, "steps_per_epoch": 2,
                                          "validation_steps": 1, "arch": "unet2019",
                                          "base_filters": 4, "patience": 0}}]}))
    rs_cluster = [str(REPO / ".venv" / "bin" / "rs-cluster"), "job"]
    subprocess.run([*rs_cluster, "submit", "--workspace", str(workspace), str(job)], check=True,
                   capture_output=True, timeout=120)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = json.loads((job / "status.json").read_text())
        if status["state"] not in ("queued", "running"):
            assert status["state"] == "succeeded", status["message"]
            return job
        time.sleep(1)
    raise AssertionError("the training job did not end within 300 s")


@pytest.mark.skipif(not (shutil.which("qgis") and shutil.which("xvfb-run")),
                    reason="QGIS desktop or xvfb-run not installed")
def test_qgis_desktop_shows_a_training_jobs_chart_and_preview(tmp_path):
    """The Jobs tab's Training tab in the real desktop, replaying a real job's events and its
    newest preview: build/qgis_training.png (the README's picture is made the same way from a
    longer job)."""
    subprocess.run(["make", "-s", "package"], cwd=REPO, check=True, timeout=120)
    job = run_training_job(tmp_path / "ws")
    previews = sorted((job / "previews").glob("epoch-*.png"))
    assert [p.name for p in previews] == ["epoch-0001.png", "epoch-0002.png", "epoch-0003.png"]
    data = devdata.subset("xiamen_robosat_z18")
    out = REPO / "build" / "qgis_training.png"
    proc = subprocess.run(["/usr/bin/python3", str(REPO / "scripts" / "qgis_screenshot.py"),
                           "--zip", str(REPO / "build" / "rs_qgis_plugin.zip"),
                           "--pair", str(data / "images" / TILES[0]), str(data / "gt" / TILES[0]),
                           "--training", str(job / "events.jsonl"), "--preview",
                           str(previews[-1]), "--out", str(out), "--timeout", "150"],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(out.with_suffix(".json").read_text())
    assert state["training"] == {"epochs": 3, "preview": True}
    assert QImage(str(out)).width() >= 1200


@pytest.mark.skipif(not shutil.which("qgis_process.bin") and not shutil.which("qgis_process"),
                    reason="qgis_process not installed")
def test_qgis_process_lists_the_algorithms_of_the_installed_zip(tmp_path):
    """Debian's ``qgis_process`` wrapper passes ``--noversioncheck``, which qgis_process
    refuses; its ``.bin`` is the program itself."""
    subprocess.run(["make", "-s", "package"], cwd=REPO, check=True, timeout=120)
    profile = tmp_path / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    subprocess.run(["/usr/bin/python3", "-m", "zipfile", "-e",
                    str(REPO / "build" / "rs_qgis_plugin.zip"), str(plugins)], check=True)
    (profile / "QGIS").mkdir()
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nrs_qgis_plugin=true\n")
    exe = shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    env = {"PATH": "/usr/bin:/bin", "QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp_path),
           "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path), "GDAL_PAM_ENABLED": "NO"}
    out = subprocess.run([exe, "list"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for alg in ("rs_buildings:train", "rs_buildings:predict", "rs_buildings:evaluate"):
        assert alg in out.stdout
