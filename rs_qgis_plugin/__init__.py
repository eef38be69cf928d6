"""QGIS plugin: building masks from aerial imagery, computed on a Spark cluster over SSH.

QGIS imports this package and calls :func:`classFactory`; everything QGIS-specific is imported
from there on, so :mod:`rs_qgis_plugin.core` and :mod:`rs_qgis_plugin.logic` stay importable
without QGIS.
"""


def classFactory(iface):  # noqa: N802 - the name QGIS looks for
    from rs_qgis_plugin.plugin import RsBuildingsPlugin

    return RsBuildingsPlugin(iface)
