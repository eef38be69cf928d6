"""Python logging, bridged once into the plugin's tab of the QGIS log panel."""

from __future__ import annotations

import logging

from qgis.core import Qgis, QgsMessageLog

TAB = "RS Buildings"
LOGGER_NAME = "rs_qgis_plugin"

_LEVELS = ((logging.ERROR, Qgis.Critical), (logging.WARNING, Qgis.Warning),
           (logging.INFO, Qgis.Info))


class QgsLogHandler(logging.Handler):
    """Sends records to ``QgsMessageLog`` (thread-safe: QGIS queues messages from tasks)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = next((q for py, q in _LEVELS if record.levelno >= py), Qgis.Info)
            QgsMessageLog.logMessage(self.format(record), TAB, level, notifyUser=False)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def setup_logging() -> logging.Logger:
    """Installs the handler on the plugin's logger (and the core's, which is its child) once."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, QgsLogHandler) for h in logger.handlers):
        handler = QgsLogHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
