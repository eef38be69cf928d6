#!/usr/bin/env python3
"""Starts QGIS desktop under Xvfb with the plugin installed from its zip, puts imagery and masks
on the map through the plugin's own result loader, and saves screenshots.

    python3 scripts/qgis_screenshot.py --zip build/rs_qgis_plugin.zip \
        --pair IMAGE.tif MASK.tif [--pair ...] --out build/qgis_screenshot.png

Writes ``--out`` (the whole QGIS window: map, layer tree, the plugin's dock), ``<out>_map.png``
(the map canvas alone) and ``<out>.json`` (what was loaded, for tests). Nothing outside a
temporary QGIS profile folder is changed; GDAL is kept from writing ``.aux.xml`` next to the
input rasters. Exit status 0 when the screenshots were written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Runs inside QGIS (``qgis --code``), in its GUI thread, once the window and plugins are up.
INNER = r'''
import json, shutil, traceback
from pathlib import Path
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface, plugins

CONFIG = json.loads(Path(__CONFIG__).read_text())
state = {"plugin_loaded": False, "layers": [], "error": None}


def finish(code=0):
    Path(CONFIG["result"]).write_text(json.dumps(state, indent=1))
    QgsProject.instance().setDirty(False)
    QgsApplication.instance().exit(code)


def capture():
    try:
        canvas = iface.mapCanvas()
        canvas.saveAsImage(CONFIG["map_png"])
        iface.mainWindow().grab().save(CONFIG["window_png"])
        finish(0)
    except Exception:
        state["error"] = traceback.format_exc()
        finish(1)


def run():
    try:
        plugin = plugins.get("rs_qgis_plugin")
        state["plugin_loaded"] = plugin is not None and plugin.controller is not None
        if not state["plugin_loaded"]:
            raise RuntimeError("the plugin is not loaded: " + ", ".join(plugins))
        from rs_qgis_plugin.logic import JobRecord

        project = QgsProject.instance()
        extent = QgsRectangle()
        images = []
        for i, (image, mask) in enumerate(CONFIG["pairs"]):
            layer = QgsRasterLayer(image, Path(image).stem, "gdal")
            project.addMapLayer(layer)
            images.append(layer)
            extent.combineExtentWith(layer.extent())
        # the masks as a finished job's download would hold them: <stem>_mask.tif
        job_dir = Path(CONFIG["job_dir"]) / "outputs" / "masks"
        job_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for image, mask in CONFIG["pairs"]:
            target = job_dir / (Path(image).stem + "_mask.tif")
            shutil.copyfile(mask, target)
            files.append(str(target))
        record = JobRecord("screenshot-job", CONFIG["title"], "demo", "predict", state="succeeded")
        loaded = plugin.controller.load(record, files)
        state["layers"] = [{"name": l.name(), "crs": l.crs().authid(),
                            "extent": l.extent().toString(2), "renderer": l.renderer().type()}
                           for l in loaded]
        state["images"] = [{"name": l.name(), "crs": l.crs().authid(),
                            "extent": l.extent().toString(2)} for l in images]
        dock = plugin.dock
        dock.setUserVisible(True)
        for layer in images:
            dock.set_imagery(layer)
        dock.name.setText(CONFIG["title"])
        if CONFIG.get("training"):
            show_training(plugin, dock)
        iface.mainWindow().resize(1600, 1000)
        canvas = iface.mapCanvas()
        canvas.setDestinationCrs(images[0].crs())
        canvas.setExtent(extent.buffered(extent.width() * 0.02))
        canvas.refreshAllLayers()
        canvas.mapCanvasRefreshed.connect(lambda: QTimer.singleShot(1500, capture))
        QTimer.singleShot(30000, capture)  # in case the refresh signal came before connecting
    except Exception:
        state["error"] = traceback.format_exc()
        finish(1)


def show_training(plugin, dock):
    """A real training job's recorded events and newest preview, in the Jobs tab's Training tab."""
    from qgis.PyQt.QtWidgets import QTabWidget
    from rs_qgis_plugin.core.protocol import parse_event
    from rs_qgis_plugin.logic import JobRecord

    lines = Path(CONFIG["training"]).read_text().splitlines()
    events = [parse_event(line) for line in lines if line.strip()]
    ends = [e for e in events if e.event == "finish" and e.stage == "train"]
    fields = ends[-1].extra if ends else {}
    started = events[0].time if events else None
    finished = events[-1].time if ends else None
    record = JobRecord("train-screenshot", CONFIG["training_title"], "cluster", "train",
                       state="succeeded" if ends else "running", stage="train",
                       progress=100.0 if ends else 50.0, started=started, finished=finished,
                       message=ends[-1].message if ends else "",
                       verdict=fields.get("verdict") or "",
                       verdict_reason=fields.get("verdict_reason") or "",
                       advice=fields.get("advice") or "",
                       best_val_iou=fields.get("best_val_iou"),
                       best_epoch=fields.get("best_epoch"))
    plugin.controller.show_recorded_training(record, events, CONFIG.get("preview"))
    panel = dock.jobs_panel
    tabs = panel.parent()
    while tabs is not None and not isinstance(tabs, QTabWidget):
        tabs = tabs.parent()
    if tabs is not None:
        tabs.setCurrentWidget(panel)
    for row in range(panel.table.rowCount()):
        if panel.table.item(row, 0).data(0x0100) == record.job_id:
            panel.table.selectRow(row)
    panel.tabs.setCurrentWidget(panel.training)
    dock.setMinimumWidth(640)
    state["training"] = {"epochs": len(panel.training.chart.points()["val_iou"]),
                         "preview": not panel.training.preview.pixmap().isNull()}


QTimer.singleShot(3000, run)
'''


def install_plugin(zip_path: Path, profiles: Path) -> Path:
    profile = profiles / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(plugins)
    ini = profile / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    # The plugin enabled as "Manage plugins" would leave it; no first-run or news distractions.
    ini.write_text("[PythonPlugins]\nrs_qgis_plugin=true\n\n"
                   "[core]\nNewsFeed\\httpsfeedqgisorg\\disabled=true\n\n"
                   "[qgis]\ncheckVersion=false\nshowTips322=false\nallowVersionCheck=false\n"
                   "askToSaveProjectChanges=false\n")
    return plugins / "rs_qgis_plugin"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, required=True, help="the plugin zip (make package)")
    ap.add_argument("--pair", nargs=2, action="append", metavar=("IMAGE", "MASK"), required=True)
    ap.add_argument("--out", type=Path, required=True, help="PNG of the QGIS window")
    ap.add_argument("--title", default="Xiamen buildings")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--training", type=Path, metavar="EVENTS",
                    help="a training job's events.jsonl: shown in the Jobs tab's Training tab")
    ap.add_argument("--preview", type=Path, metavar="PNG", help="that job's newest preview")
    ap.add_argument("--training-title", default="Xiamen roofs, first model")
    ap.add_argument("--keep", action="store_true", help="keep the temporary QGIS profile")
    args = ap.parse_args(argv)
    if not shutil.which("xvfb-run") or not shutil.which("qgis"):
        print("needs qgis and xvfb-run (apt install qgis xvfb)", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rs-qgis-screenshot-"))
    try:
        plugin_dir = install_plugin(args.zip.resolve(), work)
        if not (plugin_dir / "metadata.txt").exists():
            print(f"{args.zip} holds no rs_qgis_plugin/metadata.txt", file=sys.stderr)
            return 2
        # QGIS reads the rasters through links in the temporary folder: any sidecar file GDAL
        # might write lands there, never next to the originals.
        links = work / "data"
        links.mkdir()
        pairs = []
        for i, (image, mask) in enumerate(args.pair):
            li, lm = links / "images" / Path(image).name, links / "masks" / Path(mask).name
            for link, target in ((li, image), (lm, mask)):
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(target).resolve())
            pairs.append((str(li), str(lm)))
        out = args.out.resolve()
        result = out.with_suffix(".json")
        result.unlink(missing_ok=True)
        config = {"pairs": pairs, "title": args.title, "job_dir": str(work / "job"),
                  "result": str(result), "window_png": str(out),
                  "map_png": str(out.with_name(out.stem + "_map.png")),
                  "training": str(args.training.resolve()) if args.training else None,
                  "preview": str(args.preview.resolve()) if args.preview else None,
                  "training_title": args.training_title}
        (work / "config.json").write_text(json.dumps(config))
        code = work / "startup.py"
        code.write_text(INNER.replace("__CONFIG__", repr(str(work / "config.json"))))
        # QGIS embeds the system Python: it must not find another python3 (pyenv, a venv)
        # first on the PATH, nor inherit PYTHONHOME/PYTHONPATH meant for that one.
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PATH="/usr/bin:/bin:/usr/sbin:/sbin", GDAL_PAM_ENABLED="NO",
                   QT_QPA_PLATFORM="xcb", XDG_RUNTIME_DIR=str(work / "runtime"))
        (work / "runtime").mkdir(mode=0o700)
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--profiles-path",
               str(work), "--nologo", "--noversioncheck", "--code", str(code)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-3000:]
            tail = tail.decode("utf-8", "replace") if isinstance(tail, bytes) else tail
            print(f"QGIS did not finish within {args.timeout:g} s:\n{tail}", file=sys.stderr)
            return 1
        if not result.exists():
            print(f"QGIS exited ({proc.returncode}) without a result:\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        state = json.loads(result.read_text())
        if state.get("error"):
            print(state["error"], file=sys.stderr)
            return 1
        print(f"screenshot: {out}\nmap: {config['map_png']}")
        return 0
    finally:
        if args.keep:
            print(f"QGIS profile kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
