"""MedSegAgent node: instructive medical image segmentation as a DICOM service.

The distribution installs the project's folders under this one namespace:
``medsegagent.node`` (the service), ``medsegagent.dicom`` (DICOM data) and
``medsegagent.models`` (registry, routing, inference).
"""

import ipaddress
from importlib.resources import files

__version__ = "0.1.0"


def registry_path() -> str:
    """Path of the registry shipped with the package (``registry.yaml``)."""
    return str(files(__name__) / "registry.yaml")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is this machine's loopback interface.

    Only ``localhost`` is taken by name: any other name may resolve anywhere.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
