"""metroem: train multi-stage pyramid aligners for serial-section electron microscopy."""

from metroem.errors import MetroemError

__version__ = "0.2.0"

__all__ = ["MetroemError", "__version__", "load_aligner"]


def __getattr__(name: str):
    # Lazy: `import metroem` stays light; torch and the model code load on first use.
    if name == "load_aligner":
        from metroem.aligner import load_aligner

        return load_aligner
    raise AttributeError(f"module 'metroem' has no attribute {name!r}")
