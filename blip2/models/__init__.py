"""BLIP-2's Lightning systems, thin wrappers that train a network of ``blip2.modules`` (as
``self.model``): ``stage1.Blip2Stage1`` (the Q-Former with ITC + ITM + ITG) and
``finetune.Blip2OPTFinetune`` (stage-2 pre-training and caption fine-tuning of ``Blip2OPT``)."""
