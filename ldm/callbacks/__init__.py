"""Lightning callbacks of ``main.py`` for latent diffusion: class images for prior preservation
(``class_images``), sample grids (``image_logger``) and the inference export (``export``); all
images come from ``ldm.txt2img``. Checkpointing and RNG seeding live in ``core.callbacks``."""
