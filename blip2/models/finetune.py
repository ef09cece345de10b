"""Stage-2 pre-training and caption fine-tuning of BLIP-2 OPT: the Lightning system around the
network ``blip2.Blip2OPT`` (``self.model``).

Li et al. 2023 (arXiv 2301.12597): stage 2 (Sec. 3.3) trains the Q-Former, its queries and the
projection with the ViT and OPT frozen, on L = the language-modelling loss of the caption
(``blip2.losses.caption_lm.caption_loss``); caption fine-tuning (Sec. 4.2, Table 7: AdamW, lr 1e-5, 5 epochs, 364 px)
trains the ViT too, with OPT frozen and the prompt "a photo of". The parts frozen here follow the
config: ``freeze_vit`` (patch/position embeddings and blocks; ``ln_vision`` stays trainable, as in
LAVIS), ``freeze_qformer`` (Q-Former and queries), ``freeze_llm`` (OPT); the projection always trains.
Frozen parts get ``requires_grad_(False)`` and stay in eval mode, and may be stored in half
precision (``frozen_dtype``, as LAVIS keeps OPT and a frozen ViT in fp16); trainable parts and the
Q-Former stay fp32 and Lightning's precision setting (e.g. ``bf16-mixed``) sets the compute dtype.

Validation generates captions (beam 5, 30 / at least 8 new tokens, prompt as configured) and logs
BLEU-4 and CIDEr (``blip2.metrics``); batches with ``answers`` (VQA) are answered with the
"Question: {} Answer:" template and score VQA accuracy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from blip2.config import normalize_config
from blip2.loading import TOKENIZER_ENTRY, build_blip2_opt
from blip2.losses.caption_lm import caption_loss, caption_tokens, prompt_length, with_prompt
from blip2.metrics import caption_scores, vqa_accuracy
from blip2.modules.blip2_opt import VQA_TEMPLATE, Blip2OPT
from blip2.optim import vit_layer_lr_scale
from core.config import DTYPES, instantiate_from_config
from core.optim import build_optimizer, check_optimizer, param_groups, set_lr
from core.lean import make_lean, restore_from_module
from core.weights import read_json

CAPTION_GENERATION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
VQA_GENERATION = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def load_model(pretrained: str | None, config: Mapping | None, tokenizer: str | None) -> tuple[Blip2OPT, dict]:
    """(model, its normalised ``Blip2Config`` dict): a Hub HF folder, or random weights of ``config``
    (a ``Blip2Config`` dict or the ``target``/``params`` of a function returning one) with the
    tokenizer of the folder ``tokenizer``. On the meta device (``blip2.loading`` builds the system
    there) no weights are read."""
    if (pretrained is None) == (config is None):
        raise ValueError("Blip2OPTFinetune: give exactly one of 'pretrained' (an HF folder) or 'config'")
    if pretrained is not None:
        model = Blip2OPT.from_pretrained(pretrained, device=torch.get_default_device())
        return model, normalize_config(read_json(Path(pretrained) / "config.json"))
    config = _plain(config)
    config = instantiate_from_config(config) if "target" in config else config
    return build_blip2_opt(config, tokenizer), normalize_config(config)


def frozen_modules(model: Blip2OPT, freeze_vit: bool, freeze_qformer: bool, freeze_llm: bool) -> list[nn.Module]:
    """The parts to freeze (``ln_vision`` = ``vision_model.post_layernorm`` is never among them)."""
    vision = [model.vision_model.embeddings, model.vision_model.encoder] if freeze_vit else []
    return vision + ([model.qformer] if freeze_qformer else []) + ([model.language_model] if freeze_llm else [])


class Blip2OPTFinetune(pl.LightningModule):
    """BLIP-2 OPT trained with the prompt-masked language-modelling loss (stage 2 / caption fine-tuning).

    Batches: ``{"image": [B, 3, s, s], "text_input": [B captions]}`` for training; for validation
    ``{"image", "image_id", "references"}`` (captions) or ``{"image", "question", "answers"}`` (VQA).
    Optimiser: AdamW (betas 0.9 / ``beta2``), no decay on biases and norms, optional layer-wise lr
    decay of the ViT (``blip2.optim``), groups and AdamW (``optimizer``: ``adamw`` or ``adamw8bit``) from
    ``core.optim``.
    ``learning_rate`` is the peak lr (main.py sets it from ``base_learning_rate``). ``scheduler_config``:
    ``{target, params}`` of an lr multiplier f(step, epoch) of ``core.schedules``, the vocabulary of
    every system (LAVIS's warm-up + per-epoch cosine is ``LinearWarmupCosine`` with ``f_start`` =
    warmup_lr / lr and ``f_min`` = min_lr / lr; without ``max_steps`` / ``max_epochs`` it takes the
    trainer's ``max_epochs``); None keeps the peak lr. It is applied before every optimizer step.
    ``compile``: ``torch.compile`` the ViT, the Q-Former and the language model's training forward
    (the decoding loop calls OPT's layers directly and stays eager).
    """

    def __init__(self, pretrained: str | None = None, config: Mapping | None = None, tokenizer: str | None = None,
                 freeze_vit: bool = True, freeze_qformer: bool = False, freeze_llm: bool = True,
                 frozen_dtype: str = "fp32", gradient_checkpointing: bool = False, prompt: str = "",
                 max_txt_len: int = 32, learning_rate: float = 1e-4,
                 scheduler_config: Mapping[str, Any] | None = None, weight_decay: float = 0.05,
                 beta2: float = 0.999, vit_layer_decay: float = 1.0, generation: Mapping | None = None,
                 vqa_generation: Mapping | None = None, vqa_template: str = VQA_TEMPLATE,
                 optimizer: str = "adamw", compile: bool = False):
        super().__init__()
        self.optimizer_name = check_optimizer(optimizer)
        if frozen_dtype not in DTYPES:
            raise ValueError(f"frozen_dtype={frozen_dtype!r}: expected one of {sorted(DTYPES)}")
        self.model, self.blip2_config = load_model(pretrained, config, tokenizer)
        if self.model.tokenizer is None:
            raise ValueError(f"{pretrained or tokenizer}: the model needs a tokenizer (tokenizer files in the folder)")
        self.tokenizer_folder = str(Path(pretrained or tokenizer).resolve())
        # lean checkpoints refer to the Hugging Face folder the frozen weights came from (core.lean)
        self.base_path = str(Path(pretrained).resolve()) if pretrained and Path(pretrained).is_dir() else None
        self.frozen_parts = frozen_modules(self.model, freeze_vit, freeze_qformer, freeze_llm)
        self.set_trainable(DTYPES[frozen_dtype], freeze_qformer)
        self.model.vision_model.gradient_checkpointing = gradient_checkpointing
        self.model.language_model.decoder.gradient_checkpointing = gradient_checkpointing
        if compile:  # in place (nn.Module.compile): the parameters and checkpoint keys stay as they are
            for part in (self.model.vision_model, self.model.qformer, self.model.language_model):
                part.compile()
        self.prompt, self.max_txt_len = prompt, max_txt_len
        self.prompt_len = prompt_length(self.model.tokenizer, prompt)
        self.learning_rate, self.scheduler_config = learning_rate, _plain(scheduler_config or {}) or None
        self.weight_decay, self.beta2, self.vit_layer_decay = weight_decay, beta2, vit_layer_decay
        self.generation = {**CAPTION_GENERATION, **_plain(generation or {})}
        self.vqa_generation = {**VQA_GENERATION, **_plain(vqa_generation or {})}
        self.vqa_template = vqa_template
        self._captions: dict[str, str] = {}
        self._references: dict[str, list[str]] = {}
        self._vqa: dict[str, float] = {}  # accuracy by image and question

    # ---- parts ----------------------------------------------------------------------------------
    def set_trainable(self, dtype: torch.dtype, freeze_queries: bool) -> None:
        """``requires_grad_(False)``, eval mode and ``dtype`` for the frozen parts; the rest trains in fp32."""
        self.model.requires_grad_(True)
        self.model.float()
        for part in self.frozen_parts:
            part.requires_grad_(False).eval().to(dtype)
        self.model.query_tokens.requires_grad_(not freeze_queries)
        self.model.qformer.float()

    def train(self, mode: bool = True) -> "Blip2OPTFinetune":
        """Lightning's ``train()`` reaches every submodule; frozen parts stay in eval mode."""
        super().train(mode)
        for part in self.frozen_parts:
            part.eval()
        return self

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """L = LM loss of ``prompt + caption + "\\n"`` given the visual prompt, prompt tokens masked."""
        texts = with_prompt(self.prompt, batch["text_input"])
        tokens = caption_tokens(self.model.tokenizer, texts, self.prompt_len, self.max_txt_len)
        loss = caption_loss(self.model, batch["image"], tokens)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=len(texts))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable groups; ``on_train_batch_start`` sets each step's lr."""
        if self.learning_rate <= 0:
            raise ValueError(f"Blip2OPTFinetune: expected a learning rate > 0, got {self.learning_rate}")
        self.schedule = self.build_schedule()
        groups = param_groups(self.model.named_parameters(), self.weight_decay,
                              lr_scale=vit_layer_lr_scale(self.model, self.vit_layer_decay))
        return build_optimizer(groups, self.learning_rate, betas=(0.9, self.beta2), name=self.optimizer_name)

    def build_schedule(self) -> Callable[[int, int], float]:
        """f(step, epoch) from ``scheduler_config`` (a per-epoch cosine runs over the trainer's epochs)."""
        if self.scheduler_config is None:
            return lambda step, epoch: 1.0
        params = dict(self.scheduler_config.get("params") or {})
        if params.get("max_steps") is None and params.get("max_epochs") is None:
            params["max_epochs"] = self.trainer.max_epochs
        return instantiate_from_config({"target": self.scheduler_config["target"], "params": params})

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """lr of this step = schedule(epoch, step) times each group's ``lr_scale`` (LAVIS sets it per iteration)."""
        lr = self.learning_rate * self.schedule(self.global_step, self.current_epoch)
        for optimizer in self.trainer.optimizers:
            set_lr(optimizer, lr)
        self.log("train/lr", lr, on_step=True, batch_size=1)

    # ---- validation -----------------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if "answers" in batch:
            answers = self.model.answer(batch["image"], batch["question"], self.vqa_template, **self.vqa_generation)
            keys = [f"{i}\t{q}" for i, q in zip(batch["image_id"], batch["question"])]
            self._vqa.update({k: vqa_accuracy(a, gts) for k, a, gts in zip(keys, answers, batch["answers"])})
            return
        captions = self.model.generate(batch["image"], prompt=self.prompt or None, **self.generation)
        self._captions.update(zip(batch["image_id"], captions))
        self._references.update(zip(batch["image_id"], batch["references"]))

    def on_validation_epoch_end(self) -> None:
        """Corpus metrics over every rank's outputs (gathered), logged the same on every rank."""
        captions, references, vqa = _gathered((self._captions, self._references, self._vqa))
        if captions:
            scores = caption_scores(captions, references)
            self.log_dict({"val/bleu4": scores["bleu4"], "val/cider": scores["cider"]}, batch_size=len(captions))
        if vqa:
            self.log("val/vqa_accuracy", sum(vqa.values()) / len(vqa), batch_size=len(vqa))
        self._captions, self._references, self._vqa = {}, {}, {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Self-describing checkpoints: the ``Blip2Config`` of ``state_dict``'s ``model.*`` weights and
        the folder of the tokenizer (``blip2.loading`` reads both)."""
        checkpoint["blip2_config"] = self.blip2_config
        checkpoint[TOKENIZER_ENTRY] = self.tokenizer_folder
        if self.base_path is not None:  # lean: the frozen ViT / OPT (/ Q-Former) stay in the base folder
            make_lean(checkpoint, self, self.base_path)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A lean checkpoint's frozen weights are this model's own, once its ``pretrained`` folder (a moved
        one given by ``model.params.pretrained``) is checked to hold the content it was trained from."""
        source = str(getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        restore_from_module(checkpoint, self, self.base_path, source, "model.params.pretrained")


def _gathered(parts: tuple[dict, ...]) -> tuple[dict, ...]:
    """The union of every rank's dicts (captions, references, VQA scores); the inputs when not
    distributed. Keys make the padding repeats of the sharded sampler count once."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return parts
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, parts)
    return tuple({k: v for rank in everyone for k, v in rank[i].items()} for i in range(len(parts)))
