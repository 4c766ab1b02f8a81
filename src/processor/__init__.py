"""Race telemetry processor."""

__version__ = "0.1.0"
