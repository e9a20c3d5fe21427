"""Model code: CATR, CPTR (timm ViT encoder) and their parts (one concept per file)."""

from .catr import CATR, CATRConfig, build_catr
from .cptr import CPTR, CPTRConfig, build_cptr

__all__ = ["CATR", "CATRConfig", "build_catr", "CPTR", "CPTRConfig", "build_cptr"]
