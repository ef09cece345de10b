"""BLIP-2's networks, plain ``nn.Module``s named after the Hugging Face checkpoints they load:
``eva_vit`` (EVA ViT-g), ``qformer`` (the Q-Former), ``opt`` (OPT with a KV cache), ``blip2_opt``
(``Blip2OPT``, the captioner) and ``blip2_qformer`` (``Blip2Qformer``, the stage-1 network). The
Lightning systems that train them are in ``blip2.models``."""
