"""Stage-2 / caption fine-tuning of BLIP-2 OPT: the loss against transformers, freezing, optimiser
groups and schedule, gradient checkpointing, bf16 on CPU, learning on a generated caption set, VQA
validation, the configs, and the HF export loading in transformers."""
import json
import math
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from blip2 import Blip2OPT
from blip2.data.captions import CaptionDataset, collate
from blip2.export import export_checkpoint, main as export_main
from blip2.losses.caption_lm import IGNORE_INDEX, caption_loss, caption_tokens, prompt_length, with_prompt
from blip2.models.finetune import Blip2OPTFinetune
from blip2.optim import vit_layer_lr_scale
from core.config import instantiate_from_config
from core.optim import param_groups
from core.schedules import LinearWarmupCosine
from tests._util import rel_err
from tests.blip2_fixtures import (IMAGE_SIZE, load_reference, make_tiny_blip2_folder, one_torch_thread,
                                  tiny_blip2_config, tiny_pixels)

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
PROMPT = "a photo of"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_blip2_folder(tmp_path_factory.mktemp("tiny"), "image_tokens", seed=1)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available|LitLogger|max_epochs).*")
        yield


def squares(root, n, seed):
    """n images of a coloured square on a noisy white background, captioned by colour (JSONL)."""
    rng, rows = np.random.default_rng(seed), []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        img = 255 - rng.integers(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
        s = int(rng.integers(14, 22))
        x, y = rng.integers(2, IMAGE_SIZE - s - 1, 2)
        img[y:y + s, x:x + s] = COLOURS[name]
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {name} square on a white background"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "captions.jsonl"


def make_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      num_sanity_val_steps=0, **kwargs)


class Record(pl.Callback):
    """Collects ``after_batch(module, outputs)`` after every training batch and the gradient dtypes."""

    def __init__(self, after_batch):
        self.after_batch, self.seen, self.grad_dtypes = after_batch, [], set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append(self.after_batch(module, outputs))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grad_dtypes |= {p.grad.dtype for g in optimizer.param_groups for p in g["params"] if p.grad is not None}


def loader(source, mode="train", batch_size=8):
    ds = CaptionDataset(str(source), mode=mode, image_size=IMAGE_SIZE)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=mode == "train", collate_fn=collate,
                                       generator=torch.Generator().manual_seed(0))


# ---- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_loss_equals_transformers(folder, prompt):
    model, ref = Blip2OPT.from_pretrained(folder), load_reference(folder)
    texts = with_prompt(prompt, ["a cat sitting on a couch", "two dogs"])
    tokens = caption_tokens(model.tokenizer, texts, prompt_length(model.tokenizer, prompt), max_length=32)
    pixels = tiny_pixels(2, seed=3)
    ours = caption_loss(model, pixels, tokens)
    # transformers: Q <image> ids in front of the text; its labels cover [image ids; text], shifted inside
    q = ref.config.num_query_tokens
    image_ids = torch.full((2, q), ref.config.image_token_index)
    out = ref(pixel_values=pixels, input_ids=torch.cat([image_ids, tokens.input_ids], 1),
              attention_mask=torch.cat([torch.ones(2, q, dtype=torch.long), tokens.attention_mask], 1),
              labels=torch.cat([torch.full((2, q), IGNORE_INDEX), tokens.labels], 1))
    assert rel_err(ours, out.loss) <= 1e-6


def test_labels_mask_prompt_and_padding(folder):
    tok = Blip2OPT.from_pretrained(folder).tokenizer
    n = prompt_length(tok, PROMPT)
    tokens = caption_tokens(tok, with_prompt(PROMPT, ["two dogs", "a cat sitting on a couch"]), n, max_length=32)
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert tokens.input_ids[0, 0] == tok.bos_token_id and (tokens.labels[:, :n] == IGNORE_INDEX).all()
    caption = tok(" two dogs\n", add_special_tokens=False)["input_ids"]
    assert tokens.labels[0, n:n + len(caption)].tolist() == caption and caption[-1] == newline
    assert (tokens.labels[0, n + len(caption):] == IGNORE_INDEX).all() and tokens.attention_mask[0, -1] == 0
    no_prompt = caption_tokens(tok, ["two dogs"], prompt_length(tok, ""), max_length=32)
    assert no_prompt.labels[0, 0] == tok.bos_token_id  # LAVIS: without a prompt the bos is a target
    assert caption_tokens(tok, ["two dogs"] * 2, 0, max_length=4).input_ids.shape[1] == 4


def test_random_init_from_config(folder):
    pretrained = Blip2OPT.from_pretrained(folder)
    config = tiny_blip2_config(len(pretrained.tokenizer), pretrained.image_token_index).to_dict()
    module = Blip2OPTFinetune(config=OmegaConf.create(config), tokenizer=str(folder))
    shapes = {k: v.shape for k, v in module.model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in pretrained.state_dict().items()}
    assert module.blip2_config["text_config"]["vocab_size"] == len(pretrained.tokenizer)
    with pytest.raises(ValueError, match="exactly one of"):
        Blip2OPTFinetune(pretrained=str(folder), config=config)


# ---- freezing, optimiser, schedule ------------------------------------------------------------------
@pytest.mark.parametrize("vit, qformer, llm", [(True, False, True), (False, False, True), (True, True, False)])
def test_freeze_flags(folder, tmp_path, vit, qformer, llm):
    module = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=vit, freeze_qformer=qformer, freeze_llm=llm,
                              prompt=PROMPT, learning_rate=1e-3, weight_decay=0.0)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    make_trainer(max_steps=1, max_epochs=1).fit(module, loader(squares(tmp_path, 8, 0)))
    frozen = {"vision_model.embeddings": vit, "vision_model.encoder": vit, "vision_model.post_layernorm": False,
              "query_tokens": qformer, "qformer": qformer, "language_projection": False, "language_model": llm}
    for name, p in module.model.named_parameters():
        is_frozen = next(f for prefix, f in frozen.items() if name.startswith(prefix))
        assert p.requires_grad != is_frozen, name
        assert torch.equal(p, before[name]) == is_frozen, name  # one AdamW step moves every trained tensor
    module.train()
    assert all(not m.training for part in module.frozen_parts for m in part.modules())
    assert module.model.language_projection.training


def test_param_groups_decay_and_layer_scales(folder):
    model = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=False, vit_layer_decay=0.5).model
    groups = param_groups(model.named_parameters(), weight_decay=0.05, lr_scale=vit_layer_lr_scale(model, 0.5))
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 2 ViT blocks: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, ln_vision and the rest 1
    expect = {"vision_model.embeddings.patch_embedding.weight": (0.125, 0.05),
              "vision_model.embeddings.class_embedding": (0.125, 0.05),
              "vision_model.encoder.layers.0.self_attn.qkv.weight": (0.25, 0.05),
              "vision_model.encoder.layers.1.mlp.fc1.bias": (0.5, 0.0),
              "vision_model.post_layernorm.weight": (1.0, 0.0), "query_tokens": (1.0, 0.05),
              "qformer.layernorm.bias": (1.0, 0.0), "language_projection.weight": (1.0, 0.05)}
    for name, (scale, decay) in expect.items():
        assert (where[id(named[name])]["lr_scale"], where[id(named[name])]["weight_decay"]) == (scale, decay), name
    assert "language_model.lm_head.weight" not in {n for n, p in named.items() if id(p) in where}  # OPT frozen


def test_schedule_is_lavis_linear_warmup_cosine():
    f = LinearWarmupCosine(1000, f_start=1e-8 / 1e-5, f_min=0.0, max_epochs=5)  # lr 1e-5, warm-up from 1e-8

    def s(epoch, step):
        return 1e-5 * f(step, epoch)

    assert s(0, 0) == pytest.approx(1e-8, rel=1e-12) and s(0, 500) == pytest.approx(1e-8 + (1e-5 - 1e-8) / 2)
    assert s(0, 1000) == s(0, 4000) == 1e-5  # the rest of epoch 0 at the peak
    assert s(1, 5000) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert s(4, 9999) == pytest.approx(1e-5 * 0.5 * (1 + math.cos(4 * math.pi / 5)))
    with pytest.raises(ValueError, match="max_epochs"):
        LinearWarmupCosine(10, max_epochs=-1)
    with pytest.raises(ValueError, match="one of max_steps"):
        LinearWarmupCosine(10)


def test_trainer_applies_schedule_per_step(folder, tmp_path):
    schedule = {"target": "core.schedules.LinearWarmupCosine",
                "params": {"warm_up_steps": 4, "f_start": 1e-5 / 1e-3, "f_min": 1e-4 / 1e-3}}  # per epoch
    module = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=False, learning_rate=1e-3, scheduler_config=schedule,
                              vit_layer_decay=0.5, prompt=PROMPT)
    record = Record(lambda m, _: (m.current_epoch, m.global_step,
                                  {g["lr_scale"]: g["lr"] for g in m.trainer.optimizers[0].param_groups}))
    make_trainer(max_epochs=3, callbacks=[record]).fit(module, loader(squares(tmp_path, 16, 0)))  # 2 steps an epoch
    seen = record.seen
    assert len(seen) == 6
    for epoch, step, lrs in seen:
        lr = module.learning_rate * module.schedule(step - 1, epoch)  # set before the step that global_step now counts
        assert lrs == {scale: pytest.approx(lr * scale) for scale in lrs}
    assert seen[0][2][1.0] == pytest.approx(1e-5, rel=1e-12) and seen[-1][2][1.0] == pytest.approx(1e-4 + 0.9e-3 * 0.25)


# ---- gradient checkpointing and precision -----------------------------------------------------------
def grads(module, tokens, pixels):
    module.model.zero_grad()
    loss = caption_loss(module.model, pixels, tokens)
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_recomputes_and_matches(folder):
    plain = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=False, freeze_llm=False, prompt=PROMPT)
    ckpt = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=False, freeze_llm=False, prompt=PROMPT,
                            gradient_checkpointing=True)
    tokens = caption_tokens(plain.model.tokenizer, with_prompt(PROMPT, ["two dogs", "a cat"]), plain.prompt_len)
    pixels = tiny_pixels(2)
    calls = []
    for block in (ckpt.model.vision_model.encoder.layers[0], ckpt.model.language_model.decoder.layers[1]):
        block.register_forward_pre_hook(lambda *a: calls.append(1))  # (recomputation may stop early)
    (loss_a, grads_a), (loss_b, grads_b) = grads(plain, tokens, pixels), grads(ckpt, tokens, pixels)
    assert len(calls) == 4  # each hooked block ran twice: forward, and again in backward
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(rel_err(grads_b[k], grads_a[k]) <= 1e-6 for k in grads_a)


def test_bf16_mixed_on_cpu_keeps_qformer_fp32(folder, tmp_path):
    module = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=True, frozen_dtype="bf16", prompt=PROMPT,
                              learning_rate=1e-3)
    dtypes = {n: p.dtype for n, p in module.model.named_parameters()}
    assert dtypes["language_model.model.decoder.layers.0.fc1.weight"] == torch.bfloat16
    assert dtypes["vision_model.encoder.layers.0.mlp.fc1.weight"] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items() if n.startswith(("qformer", "query_tokens")))
    assert dtypes["vision_model.post_layernorm.weight"] == dtypes["language_projection.weight"] == torch.float32
    fp32 = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=True, prompt=PROMPT)
    tokens = caption_tokens(fp32.model.tokenizer, with_prompt(PROMPT, ["two dogs", "a cat"]), fp32.prompt_len)
    pixels = tiny_pixels(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_loss = caption_loss(module.model, pixels, tokens)
    assert half_loss.dtype == torch.float32 and rel_err(half_loss, caption_loss(fp32.model, pixels, tokens)) < 2e-2
    record = Record(lambda _, outputs: outputs["loss"].item())
    make_trainer(max_steps=3, max_epochs=1, precision="bf16-mixed", callbacks=[record]).fit(
        module, loader(squares(tmp_path, 24, 0)))
    assert len(record.seen) == 3 and all(math.isfinite(x) for x in record.seen)
    assert record.grad_dtypes == {torch.float32}  # fp32 master weights and gradients under bf16 autocast


# ---- learning ------------------------------------------------------------------------------------
def caption_accuracy(module, source):
    """(exact-match rate, BLEU-4, CIDEr) of the validation loop on a held-out set."""
    batch = collate([CaptionDataset(str(source), mode="eval", image_size=IMAGE_SIZE)[i] for i in range(16)])
    captions = module.model.generate(batch["image"], prompt=PROMPT, **module.generation)
    exact = np.mean([c == refs[0] for c, refs in zip(captions, batch["references"])])
    metrics = make_trainer().validate(module, loader(source, "eval"), verbose=False)[0]
    return exact, metrics["val/bleu4"], metrics["val/cider"]


def test_finetuning_learns_captions(folder, tmp_path):
    """A random tiny model, trained end to end (its random OPT is no language model to freeze) for 200
    steps on coloured squares, captions held-out squares by colour."""
    train, held_out = squares(tmp_path / "train", 64, seed=0), squares(tmp_path / "test", 16, seed=1)
    module = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=False, freeze_llm=False, prompt=PROMPT,
                              max_txt_len=48, learning_rate=1e-3, weight_decay=0.0,
                              generation={"num_beams": 1, "max_new_tokens": 40, "min_new_tokens": 0})
    before = caption_accuracy(module, held_out)
    make_trainer(max_steps=200, max_epochs=25).fit(module, loader(train))
    after = caption_accuracy(module, held_out)
    print(f"exact match / BLEU-4 / CIDEr: before {before}, after {after}")
    assert before[0] == 0.0 and before[1] < 0.01 and before[2] < 0.1
    assert after[0] >= 0.5 and after[1] >= 0.6 and after[2] >= 3.0


def test_vqa_validation_scores_answers(folder, tmp_path):
    module = Blip2OPTFinetune(pretrained=str(folder), vqa_generation={"num_beams": 2, "max_new_tokens": 3})
    image = tiny_pixels(2)
    answer = module.model.answer(image[:1], ["what is it"], **module.vqa_generation)[0]
    batch = {"image": image, "image_id": ["a", "b"], "question": ["what is it", "what is it"],
             "answers": [[answer] * 3 + ["x"] * 7, ["x"] * 10]}
    metrics = make_trainer().validate(module, torch.utils.data.DataLoader([batch], batch_size=None), verbose=False)[0]
    assert metrics["val/vqa_accuracy"] == pytest.approx(0.5 * 0.9)  # 3 of 10 humans: 0.9; none: 0


# ---- configs and export ----------------------------------------------------------------------------
def test_coco_config_runs_on_tiny_inputs(folder, tmp_path):
    source = squares(tmp_path / "data", 8, seed=0)
    entries = [{"filepath": "", "filename": r["image"], "split": "train" if i < 6 else "val",
                "sentences": [{"raw": r["caption"]}]}
               for i, r in enumerate(map(json.loads, source.read_text().splitlines()))]
    (tmp_path / "data" / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    cfg = OmegaConf.load("configs/blip2/finetune_caption_coco.yaml")
    schedule = cfg.model.params.scheduler_config.params
    assert (cfg.model.base_learning_rate, schedule.warm_up_steps, cfg.model.base_learning_rate * schedule.f_start,
            schedule.f_min, cfg.model.params.weight_decay, cfg.lightning.trainer.max_epochs,
            cfg.coco.image_size) == (1e-5, 1000, pytest.approx(1e-8), 0.0, 0.05, 5, 364)
    cfg.merge_with_dotlist([f"coco.annotations={tmp_path}/data/dataset_coco.json", f"coco.image_root={tmp_path}/data",
                            f"coco.image_size={IMAGE_SIZE}", f"model.params.pretrained={folder}",
                            "data.params.batch_size=2", "data.params.num_workers=0",
                            "model.params.generation.max_new_tokens=4"])
    module, data = instantiate_from_config(cfg.model), instantiate_from_config(cfg.data)
    trainer = make_trainer(max_epochs=1, max_steps=2, precision=cfg.lightning.trainer.precision)
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert trainer.global_step == 2 and {"val/bleu4", "val/cider"} <= set(metrics)
    stage2 = OmegaConf.load("configs/blip2/pretrain_stage2.yaml")
    stage2.merge_with_dotlist([f"stage2.init={folder}"])
    module2 = instantiate_from_config(stage2.model)
    assert module2.prompt == "" and not any(p.requires_grad for p in module2.model.language_model.parameters())


@pytest.mark.parametrize("base,overlay,key", [
    ("finetune_caption_coco", "finetune_caption_coco_opt6.7b", "model.params.pretrained"),
    ("pretrain_stage2", "pretrain_stage2_opt6.7b", "stage2.init"),
])
def test_opt_6_7b_overlays_set_only_keys_of_their_base(base, overlay, key):
    def leaves(cfg, prefix=""):  # the dotted keys of a config's values
        return {leaf for k, v in cfg.items()
                for leaf in (leaves(v, f"{prefix}{k}.") if OmegaConf.is_dict(v) else [f"{prefix}{k}"])}

    base_cfg = OmegaConf.load(f"configs/blip2/{base}.yaml")
    over = OmegaConf.load(f"configs/blip2/{overlay}.yaml")
    assert leaves(over) == {key} and key in leaves(base_cfg)
    merged = OmegaConf.merge(base_cfg, over)
    assert OmegaConf.select(merged, key) == "models/blip2-opt-6.7b"
    assert merged.model.params.pretrained == "models/blip2-opt-6.7b"


def test_export_loads_in_blip2_and_transformers(folder, tmp_path):
    module = Blip2OPTFinetune(pretrained=str(folder), freeze_vit=False, prompt=PROMPT, learning_rate=1e-2)
    trainer = make_trainer(max_steps=2, max_epochs=1)
    trainer.fit(module, loader(squares(tmp_path / "data", 16, 0)))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    out = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "hf", tokenizer=folder)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    ours, ref = Blip2OPT.from_pretrained(out), load_reference(out)
    trained = module.model.eval()
    assert ours.generation_defaults["eos_token_id"] == trained.eos_token_id == ref.generation_config.eos_token_id
    direct = Blip2OPT.from_pretrained(tmp_path / "last.ckpt")  # the checkpoint names its tokenizer folder
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert not torch.equal(trained.qformer.layernorm.weight, Blip2OPT.from_pretrained(folder).qformer.layernorm.weight)
    for key, value in trained.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ids, mask = ours.tokenize([PROMPT, "two dogs"], 2)
    pixels = tiny_pixels(2, seed=5)
    q = ref.config.num_query_tokens
    with torch.no_grad():
        image_ids = torch.full((2, q), ref.config.image_token_index)
        expected = ref(pixel_values=pixels, input_ids=torch.cat([image_ids, ids], 1),
                       attention_mask=torch.cat([torch.ones(2, q, dtype=mask.dtype), mask], 1)).logits
        logits, trained_logits = ours(pixels, ids, mask), trained(pixels, ids, mask)
    valid = torch.cat([torch.ones(2, q, dtype=torch.bool), mask.bool()], 1)
    assert rel_err(logits[valid], expected[valid]) <= 1e-5 and torch.equal(logits, trained_logits)
    shutil.rmtree(out)
    assert export_main(["--ckpt", str(tmp_path / "none.ckpt"), "--tokenizer", str(folder), "--out", str(out)]) == 2


def test_checkpoints_are_lean_and_complete_from_the_base_folder(folder, tmp_path):
    """Stage 2 / fine-tuning checkpoints hold what trains; the frozen ViT and OPT come back from the
    pretrained folder (exactly: not the bf16 copies training used), checked by content on every read."""
    from safetensors.torch import load_file, save_file

    from core.lean import BASE_KEY, file_sha256
    from core.weights import CheckpointError, load_checkpoint

    base = tmp_path / "base"
    shutil.copytree(folder, base)
    module = Blip2OPTFinetune(pretrained=str(base), freeze_vit=True, prompt=PROMPT, learning_rate=1e-2,
                              frozen_dtype="bf16")
    data = loader(squares(tmp_path / "data", 16, 0))
    trainer = make_trainer(max_steps=2, max_epochs=1, precision="bf16-mixed")
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert any(k.startswith("model.language_model.") for k in frozen) and not frozen & set(ckpt["state_dict"])
    assert set(ckpt["state_dict"]) | frozen == set(module.state_dict())
    assert ckpt[BASE_KEY]["path"] == str(base.resolve()) and ckpt[BASE_KEY]["sha256"] == file_sha256(base)
    assert set(ckpt[BASE_KEY]["keys"]) == frozen

    trained, start = module.model.state_dict(), Blip2OPT.from_pretrained(base).state_dict()
    direct = Blip2OPT.from_pretrained(tmp_path / "last.ckpt").state_dict()
    for key, value in direct.items():
        expected = start[key] if f"model.{key}" in frozen else trained[key].float()
        assert torch.equal(value, expected), key

    fresh = Blip2OPTFinetune(pretrained=str(base), freeze_vit=True, prompt=PROMPT, learning_rate=1e-2,
                             frozen_dtype="bf16")
    resumed = make_trainer(max_steps=3, max_epochs=2, precision="bf16-mixed")
    resumed.fit(fresh, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.global_step == 3

    moved = Path(shutil.copytree(base, tmp_path / "moved"))
    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in weights if k.startswith("language_model."))
    weights[key] = weights[key] + 1
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="base weights .*base have changed"):
        Blip2OPT.from_pretrained(tmp_path / "last.ckpt")
    again = Blip2OPT.from_pretrained(tmp_path / "last.ckpt", base=moved).state_dict()  # --base_weights
    assert all(torch.equal(value, again[key]) for key, value in direct.items())
    changed = Blip2OPTFinetune(pretrained=str(base), freeze_vit=True, prompt=PROMPT)
    with pytest.raises(CheckpointError, match="have changed"):
        make_trainer(max_steps=3, max_epochs=2, precision="bf16-mixed").fit(changed, data, ckpt_path=str(tmp_path / "last.ckpt"))


def test_checkpoint_size_counts_what_stage_2_trains():
    """benchmarks/checkpoint_size.py (the README's figure): the trained part is the Q-Former, its queries,
    the projection and ln_vision; the lean checkpoint keeps those and their two AdamW moments only."""
    from benchmarks.checkpoint_size import sizes
    from blip2.config import blip2_opt

    model = Blip2OPT.from_config(blip2_opt("2.7b"), device="meta")
    trained = [p for n, p in model.named_parameters()
               if n.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm."))]
    s = sizes("2.7b")
    assert s["trained"] == sum(p.numel() for p in trained)
    assert s["params"] == sum(p.numel() for p in model.parameters())
    assert s["lean"] == 12 * s["trained"] and s["full_fp32"] - s["lean"] == 4 * (s["params"] - s["trained"])
