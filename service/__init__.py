"""kdguard: serve a distilled student model with its teacher beside it."""

__version__ = "0.1.0"
