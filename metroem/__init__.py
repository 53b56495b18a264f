"""metroem: train multi-stage pyramid aligners for serial-section electron microscopy."""

from metroem.errors import MetroemError

__version__ = "0.1.0"

__all__ = ["MetroemError", "__version__"]
