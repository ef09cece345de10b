"""BLIP-2's training losses: ``stage1`` (ITC, ITM and ITG, the Q-Former's three stage-1 objectives,
``itg_loss`` being its text decoder's loss) and ``caption_lm`` (the caption language-modelling loss
through OPT of stage 2 and caption fine-tuning, ``opt_lm_loss`` / ``caption_loss``)."""
