"""cryowae's napari plugin (npe2): readers, sample data and the restore/sample dock widget.

Installed as ``cryowae.plugins``; napari finds it through the ``napari.manifest`` entry
point and ``napari.yaml``. Importing this package imports neither napari nor Qt: the
reader, the sample data and the display helpers are plain numpy, and only
``_widget`` (loaded by napari when the dock widget is opened) touches Qt.
"""

from __future__ import annotations

__all__: list[str] = []
