"""Lightning callbacks of ``main.py``: checkpoints and RNG seeding (``checkpointing``), class-image
sampling (``regularization``) and sample grids (``image_logger``)."""
