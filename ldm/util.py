"""CompVis config targets: ``ldm.util.instantiate_from_config`` (the configs and scripts of
the CompVis and DreamBooth-Stable-Diffusion repositories name it); the code lives in ``core.config``."""
from core.config import get_obj_from_str, instantiate_from_config  # noqa: F401
