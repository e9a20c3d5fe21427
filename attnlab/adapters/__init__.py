"""Foreign captioners through the seam: your own model (:func:`wrap`), Hugging Face models."""

from .wrap import WrappedCaptioner, wrap

__all__ = ["WrappedCaptioner", "wrap"]
