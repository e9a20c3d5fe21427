"""Model code: CATR and its parts (one concept per file)."""

from .catr import CATR, CATRConfig, build_catr

__all__ = ["CATR", "CATRConfig", "build_catr"]
