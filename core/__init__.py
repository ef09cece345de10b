"""The shared training core of both model packages (``ldm`` and ``blip2``), which import it and
which it never imports: configs and ``instantiate_from_config`` (``config``), weight files
(``weights``), images (``images``), the resumable data module (``data``), checkpointing
callbacks (``callbacks``), optimizers (``optim``), learning-rate schedules (``schedules``) and
the trainer behind ``main.py`` (``trainer``)."""
