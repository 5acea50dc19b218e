"""cxr-lora helpers: data preparation, offline stand-ins, training, sampling, evaluation."""

__version__ = "0.1.0"

from .core.errors import CxrError  # noqa: E402,F401

