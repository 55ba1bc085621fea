"""wsgate: a real-time event gateway."""

__version__ = "0.1.0"
