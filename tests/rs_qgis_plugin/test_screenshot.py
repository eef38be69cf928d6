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
