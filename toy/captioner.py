"""The toy world's BLIP-2 captioner, as trained: ViT, Q-Former and OPT-style decoder trained from
scratch on the coloured shapes of ``toy.shapes``, in two stages as BLIP-2 builds on a pretrained
image encoder, with a byte-level BPE trained here on the training captions. Reading images with the
trained captioner is ``toy.judge``.

    python -m toy.captioner tokenizer --out models/toy/blip2-tokenizer   # the caption tokenizer

1. The image encoder (``ToyViTPretrain``, configs/toy/vit.yaml): the ViT with a linear head per
   attribute on its CLS output, trained on attribute labels (``ToyAttributes``), as ViTs were
   pretrained on labelled images before CLIP. PyTorch's default initialisation and lr 3e-3: from
   the N(0, 0.02) start at lr 1e-3 it learns colour and background but stays at chance between
   circle and square (measured once: shape 0.67-0.70 on held-out scenes after 1,500 steps).
2. The captioner (``ToyBlip2Finetune``, configs/toy/blip2.yaml, ``prompt`` ""): the ViT of stage 1
   frozen (``ln_vision`` trains, as in BLIP-2), the Q-Former and decoder from BERT-style
   initialisation, trained on the loss of bos + caption + "\\n" after the queries
   (``blip2.losses.caption_lm``) on ``ToyCaptions``.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from blip2.config import normalize_config, vision_args
from blip2.data.captions import MODES
from blip2 import Blip2OPT
from blip2.modules.eva_vit import EvaViT
from blip2.processors import CLIP_MEAN, CLIP_STD, Blip2ImageProcessor
from blip2.models.finetune import Blip2OPTFinetune
from core.cli import ArgumentParser, run_cli
from core.optim import build_optimizer, param_groups, with_step_schedule
from core.weights import CheckpointError, load_state_dict, load_strict
from toy.shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, SHAPES, render, scene_of

# the classes of each attribute, in label order (ToyAttributes, ToyViTPretrain's heads)
ATTRIBUTE_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(BACKGROUNDS)}
VIT_PREFIX = "vit."  # ToyViTPretrain's ViT in its checkpoints
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0, 1, 2, 3
IMAGE_TOKEN = "<image>"


# ---- the tokenizer -------------------------------------------------------------------------------
def caption_corpus(num: int = 2000, seed: int = 0) -> list[str]:
    """Full captions of the first ``num`` training scenes, each ended by "\\n" (the caption end)."""
    captions = [scene_of("train", seed, i).caption() + "\n" for i in range(num)]
    words = set(" ".join(captions).split())
    missing = (set(COLOURS) | set(SHAPES) | set(BACKGROUNDS)) - words
    if missing:
        raise ValueError(f"{num} training captions miss the attribute words {sorted(missing)}: use more")
    return captions


def train_tokenizer(out: str | os.PathLike, num: int = 2000, seed: int = 0, vocab_size: int = 512) -> Any:
    """Train an OPT-style byte-level BPE on the training captions and save it as an HF folder.

    Ids 0-3 are ``<s> <pad> </s> <unk>``; bos = eos = ``</s>`` (added in front, as OPT's tokenizer
    does), pad ``<pad>``; ``<image>`` is the last id (the visual prompt's placeholder). BPE merges
    stop once every caption word is one token, so the vocabulary is far below ``vocab_size``.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(caption_corpus(num, seed), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.save_model(str(out))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 64}))
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tokenizer.save_pretrained(str(out))
    return AutoTokenizer.from_pretrained(str(out), local_files_only=True)


# ---- the data set --------------------------------------------------------------------------------
class ToyCaptions(Dataset):
    """``num`` shapes of a split as BLIP-2 caption items (``blip2.data.captions`` batches).

    ``mode="train"``: ``{"image": (3, s, s) CLIP-normalised, "text_input": full caption}``;
    ``mode="eval"``: ``{"image", "image_id": "split/seed/index", "references": [full caption]}``.
    No augmentation: the procedural scenes already vary position, size and rotation.
    """

    def __init__(self, split: str = "train", num: int = 10000, mode: str = "train", seed: int = 0,
                 image_size: int = 32, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if num < 1:
            raise ValueError(f"num={num}: expected at least one item")
        scene_of(split, seed, 0)  # checks the split's name
        self.split, self.num, self.mode, self.seed, self.image_size = split, num, mode, seed, image_size
        self.processor = Blip2ImageProcessor(image_size, mean, std)

    def __len__(self) -> int:
        return self.num

    def scene_and_image(self, i: int) -> tuple[Any, torch.Tensor]:
        """Item ``i``'s scene and its image (3, s, s), CLIP-normalised."""
        if not 0 <= i < self.num:
            raise IndexError(f"index {i} out of range for {self.num} items")
        scene = scene_of(self.split, self.seed, i)
        return scene, self.processor([render(scene, self.image_size)])[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene, image = self.scene_and_image(i)
        if self.mode == "train":
            return {"image": image, "text_input": scene.caption()}
        return {"image": image, "image_id": f"{self.split}/{self.seed}/{i}", "references": [scene.caption()]}


class ToyAttributes(Dataset):
    """``num`` scenes of a split as ``{"image": (3, s, s) CLIP-normalised, "labels": (3,) int64}``, the
    labels indexing ``ATTRIBUTE_VALUES`` in ``ATTRIBUTES`` order (the image encoder's pretraining)."""

    def __init__(self, split: str = "train", num: int = 10000, seed: int = 0, image_size: int = 32,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.scenes = ToyCaptions(split, num, "train", seed, image_size, mean, std)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene, image = self.scenes.scene_and_image(i)
        labels = [ATTRIBUTE_VALUES[a].index(getattr(scene, a)) for a in ATTRIBUTES]
        return {"image": image, "labels": torch.tensor(labels)}


# ---- the model -----------------------------------------------------------------------------------
@torch.no_grad()
def init_weights(model: Blip2OPT, std: float = 0.02) -> Blip2OPT:
    """BERT / OPT initialisation of a random ``Blip2OPT``: N(0, std) linear and embedding weights,
    queries, class and position embeddings; zero biases; unit layer norms. (PyTorch's defaults give
    N(0, 1) token embeddings, so logits of std ~ sqrt(D) through the tied head, and zero queries,
    which stay identical to one another.)"""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()
        if isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    vision = model.vision_model.embeddings
    for p in (model.query_tokens, vision.class_embedding, vision.position_embedding):
        p.normal_(0.0, std)
    return model


class ToyViTPretrain(pl.LightningModule):
    """Stage 1 of the toy captioner: the ViT of ``vision_config`` (a BLIP-2 ``vision_config``, as in
    configs/toy/blip2.yaml) with a linear head per attribute on its CLS output (after ``ln_vision``),
    trained on the sum of the attributes' cross-entropies. PyTorch's default initialisation (class
    and position embeddings zero). AdamW (``weight_decay``), ``scheduler_config``: a per-step lr
    multiplier of ``core.schedules``. Validation logs each attribute's accuracy (``val/acc_<attr>``).
    Its checkpoints hold the ViT as ``vit.*`` (``load_pretrained_vit`` reads them)."""

    def __init__(self, vision_config: Mapping[str, Any], learning_rate: float = 3e-3, weight_decay: float = 0.0,
                 scheduler_config: Mapping[str, Any] | None = None):
        super().__init__()
        self.vit = EvaViT(**vision_args(normalize_config({"vision_config": dict(vision_config)})))
        width = self.vit.post_layernorm.normalized_shape[0]
        self.heads = nn.ModuleDict({a: nn.Linear(width, len(ATTRIBUTE_VALUES[a])) for a in ATTRIBUTES})
        self.learning_rate, self.weight_decay, self.scheduler_config = learning_rate, weight_decay, scheduler_config

    def logits(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = self.vit(image)[:, 0]  # (B, D)
        return {a: head(cls) for a, head in self.heads.items()}  # a: (B, classes)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.logits(batch["image"])
        loss = sum(F.cross_entropy(logits[a], batch["labels"][:, k]) for k, a in enumerate(ATTRIBUTES))
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=len(batch["labels"]))
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        logits = self.logits(batch["image"])
        for k, a in enumerate(ATTRIBUTES):
            hits = (logits[a].argmax(-1) == batch["labels"][:, k]).float().mean()
            self.log(f"val/acc_{a}", hits, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        opt = build_optimizer(param_groups(self.named_parameters(), self.weight_decay), self.learning_rate)
        return with_step_schedule(opt, self.scheduler_config)


def load_pretrained_vit(model: Blip2OPT, path: str | os.PathLike) -> None:
    """``model.vision_model`` from a ``ToyViTPretrain`` checkpoint (its ``vit.*``; every key and
    shape checked: a mismatch names the file and the key)."""
    state = load_state_dict(path)
    vit = {k[len(VIT_PREFIX):]: v for k, v in state.items() if k.startswith(VIT_PREFIX)}
    if not vit:
        raise CheckpointError(f"{path}: no {VIT_PREFIX}* tensors: expected a checkpoint of configs/toy/vit.yaml "
                              "(toy.captioner.ToyViTPretrain)")
    load_strict(model.vision_model, vit, str(path), layout="the toy captioner's ViT")


class ToyBlip2Finetune(Blip2OPTFinetune):
    """``Blip2OPTFinetune`` of a model built from ``config``, started from ``init_weights``, its ViT
    from ``vision_checkpoint`` (a ``ToyViTPretrain`` checkpoint) when given. A frozen ViT
    (``freeze_vit``) of a new model needs one: a random frozen encoder would see nothing."""

    def __init__(self, init_std: float = 0.02, vision_checkpoint: str | os.PathLike | None = None, **kwargs: Any):
        if kwargs.get("pretrained") is not None and vision_checkpoint is not None:
            raise ValueError(f"model.params.vision_checkpoint={vision_checkpoint!r} with pretrained="
                             f"{kwargs['pretrained']!r}: the pretrained folder has its own ViT; give one of them")
        if kwargs.get("pretrained") is None and vision_checkpoint is None and kwargs.get("freeze_vit", True):
            raise ValueError("model.params.vision_checkpoint (toy.vit): the frozen ViT needs a checkpoint of "
                             "configs/toy/vit.yaml (python main.py --base configs/toy/vit.yaml -t)")
        super().__init__(**kwargs)
        if kwargs.get("pretrained") is None:
            init_weights(self.model, init_std)
            if vision_checkpoint is not None:
                load_pretrained_vit(self.model, vision_checkpoint)


def run(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m toy.captioner",
                                description="The toy BLIP-2 captioner's caption tokenizer.")
    sub = p.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train the caption tokenizer on the training captions")
    tok.add_argument("--out", default="models/toy/blip2-tokenizer")
    opt = p.parse_args(argv)
    print(f"{opt.out}: {len(train_tokenizer(opt.out))} tokens")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m toy.captioner``: bad input is one line on stderr and exit status 2."""
    return run_cli("python -m toy.captioner", run, argv)


if __name__ == "__main__":
    sys.exit(main())
