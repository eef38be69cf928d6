"""QGIS plugin: building masks from aerial imagery, computed on a Spark cluster over SSH."""
