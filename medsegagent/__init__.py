"""MedSegAgent node: instructive medical image segmentation as a DICOM service.

The distribution installs the project's folders under this one namespace:
``medsegagent.node`` (the service), ``medsegagent.dicom`` (DICOM data) and
``medsegagent.models`` (registry, routing, inference).
"""

from importlib.resources import files

__version__ = "0.1.0"


def registry_path() -> str:
    """Path of the registry shipped with the package (``registry.yaml``)."""
    return str(files(__name__) / "registry.yaml")
