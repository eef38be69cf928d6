"""Renders imagery with a building mask over it to a PNG, with QGIS's own map renderer (headless).

    QT_QPA_PLATFORM=offscreen .venv-qgis/bin/python scripts/render_overlay.py IMAGE MASK OUT.png
        [--title TEXT] [--size 1024]

Runs on Debian's QGIS (the plugin venv). The mask is drawn as the plugin draws it: background
transparent, buildings in translucent red with their outline.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("mask")
    parser.add_argument("out", help="picture to write (.png or .jpg)")
    parser.add_argument("--size", type=int, default=1024, help="longest side of the picture in px")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # QGIS would otherwise leave .aux.xml statistics beside the user's rasters.
    os.environ["GDAL_PAM_ENABLED"] = "NO"

    from qgis.core import (QgsApplication, QgsMapRendererParallelJob, QgsMapSettings,
                           QgsPalettedRasterRenderer, QgsRasterLayer)
    from qgis.PyQt.QtCore import QSize, Qt
    from qgis.PyQt.QtGui import QColor, QFont, QPainter

    app = QgsApplication([], False)
    app.initQgis()
    try:
        image = QgsRasterLayer(args.image, "imagery")
        mask = QgsRasterLayer(args.mask, "buildings")
        for layer, path in ((image, args.image), (mask, args.mask)):
            if not layer.isValid():
                print(f"render_overlay: {path}: QGIS cannot open it", file=sys.stderr)
                return 1
        mask.setRenderer(QgsPalettedRasterRenderer(mask.dataProvider(), 1, [
            QgsPalettedRasterRenderer.Class(0, QColor(0, 0, 0, 0), "background"),
            QgsPalettedRasterRenderer.Class(255, QColor(255, 32, 32, 140), "building"),
        ]))
        extent = image.extent()
        ratio = extent.height() / extent.width() if extent.width() else 1.0
        width = args.size if ratio <= 1 else int(args.size / ratio)
        height = int(width * ratio)
        settings = QgsMapSettings()
        settings.setLayers([mask, image])  # first is drawn on top
        settings.setDestinationCrs(image.crs())
        settings.setExtent(extent)
        settings.setOutputSize(QSize(width, height))
        settings.setBackgroundColor(QColor("white"))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        picture = job.renderedImage()
        if args.title:
            painter = QPainter(picture)
            painter.setFont(QFont("Sans", max(10, width // 60)))
            painter.fillRect(0, 0, width, max(24, width // 30), QColor(255, 255, 255, 200))
            painter.setPen(QColor("black"))
            painter.drawText(8, 0, width - 16, max(24, width // 30), int(Qt.AlignVCenter), args.title)
            painter.end()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if not picture.save(args.out, None, 85):  # format from the suffix (.png, .jpg)
            print(f"render_overlay: cannot write {args.out}", file=sys.stderr)
            return 1
        print(f"render_overlay: wrote {args.out} ({width}x{height}, CRS {image.crs().authid() or 'none'})")
        return 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    # QGIS 3.22 can crash while tearing down (exitQgis) after a headless render; the picture is
    # already saved and flushed, so leave without the teardown.
    os._exit(main())
