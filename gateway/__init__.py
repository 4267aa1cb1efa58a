"""gateway: an async-job callback gateway for CI."""

__version__ = "0.1.0"
