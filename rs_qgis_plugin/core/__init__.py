"""The plugin's QGIS-free core: job spec, connection profile, remote commands, progress and status
parsing, the SSH client and file transfers.

Nothing here imports ``qgis`` or Qt (a test proves it), and ``paramiko`` is imported only by
:mod:`rs_qgis_plugin.core.ssh` and the modules that open connections, so plain pytest runs it all.
"""
