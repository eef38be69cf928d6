"""The plugin object QGIS loads: toolbar button, menu entry, the dock, the Processing provider,
and reattaching to the jobs a previous session left running.

Quitting QGIS leaves the jobs running on the cluster. QGIS 3.22's ``QgisApp::fileExit`` cancels
the active tasks flagged ``CancelWithoutPrompt`` without asking (it asks "try canceling these
active tasks?" about any other, and then stays open), so the tasks that only read from the
cluster (watching, looking up, downloading) carry that flag, and a watch task's ``cancel()``
only stops watching. Then, on ``aboutToQuit`` (the event loop has ended, Python has not), the
controller waits for those tasks to leave Python; ``unload`` does the same when the plugin is
disabled or reloaded.
"""

from __future__ import annotations

from typing import Any

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from rs_qgis_plugin.core.errors import RsPluginError
from rs_qgis_plugin.log import get_logger, setup_logging

MENU = "&RS Buildings"


def tr(text: str) -> str:
    return QCoreApplication.translate("RsBuildingsPlugin", text)


class RsBuildingsPlugin:
    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.log = setup_logging()
        self.action: QAction | None = None
        self.dock: Any = None
        self.controller: Any = None
        self.provider: Any = None
        self._quit_hooked = False

    def initProcessing(self) -> None:  # noqa: N802 - QGIS's name
        from rs_qgis_plugin.processing_provider import RsProvider

        if self.provider is None:
            self.provider = RsProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        from rs_qgis_plugin.controller import JobController
        from rs_qgis_plugin.dock import RunDock
        from rs_qgis_plugin.results import resource_path

        self.initProcessing()
        self.controller = JobController(self.iface)
        self.dock = RunDock(self.iface, self.controller, self.iface.mainWindow())
        self.dock.hide()
        self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        try:
            icon = QIcon(str(resource_path("icon.svg")))
        except RsPluginError:
            icon = QIcon()
        self.action = QAction(icon, tr("RS Buildings: masks from the cluster"),
                              self.iface.mainWindow())
        self.action.setCheckable(True)
        self.action.setObjectName("rsBuildingsAction")
        self.action.toggled.connect(self.dock.setUserVisible)
        self.dock.visibilityChanged.connect(self.action.setChecked)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(tr(MENU), self.action)
        QgsApplication.instance().aboutToQuit.connect(self._quitting)
        self._quit_hooked = True
        # Jobs the last session started keep running on the cluster: follow or fetch them.
        self.controller.reattach()
        get_logger("plugin").info("loaded; %d job(s) remembered", len(self.controller.records()))

    def _quitting(self) -> None:
        """QGIS is quitting: detach from the jobs (they keep running) before Python ends."""
        if self.controller is not None:
            self.controller.shutdown()
            get_logger("plugin").info("QGIS closing; the jobs keep running on the cluster")

    def unload(self) -> None:
        if self._quit_hooked:
            try:
                QgsApplication.instance().aboutToQuit.disconnect(self._quitting)
            except TypeError:
                pass
            self._quit_hooked = False
        if self.controller is not None:
            self.controller.shutdown()
        if self.action is not None:
            self.iface.removePluginMenu(tr(MENU), self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.dock is not None:
            self.dock.disconnect_project()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        self.controller = None
