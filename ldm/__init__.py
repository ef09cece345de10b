"""Latent diffusion (Stable Diffusion v1) and DreamBooth on it, in the CompVis layout.

The CompVis convention holds: ``ldm.modules`` are plain ``nn.Module`` networks (UNet, encoders,
attention, EMA), ``ldm.models`` are Lightning systems (``DDPM``, ``LatentDiffusion``, ``DreamBooth``,
``AutoencoderKLTraining``) and the samplers (``ldm.models.diffusion.{ddim,plms}``). One exception,
kept because configs pin its path: ``ldm.models.autoencoder.AutoencoderKL`` is a plain network
(the frozen first stage), while its training system is ``ldm.models.autoencoder_training``.

Around them: ``ldm.compat`` (the one adapter of CompVis-only config parameters), ``ldm.loading``
(the one loader: config plus an sd-v1 file, an export or a Lightning checkpoint), ``ldm.txt2img``
(the one text-to-image path), ``ldm.export`` (slim inference checkpoints), ``ldm.callbacks`` and
``ldm.data``. Shared machinery comes from ``core``; ``ldm`` never imports ``blip2``.
"""
