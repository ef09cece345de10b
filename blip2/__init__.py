"""BLIP-2 OPT, written from the paper (arXiv 2301.12597) and loading the Hub's HF-format weights."""
from blip2.modules.blip2_opt import Blip2OPT

__all__ = ["Blip2OPT"]
