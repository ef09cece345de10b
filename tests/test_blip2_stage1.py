"""BLIP-2 stage 1 (the network ``blip2.modules.blip2_qformer``, the system ``blip2.models.stage1``, the
losses ``blip2.losses.stage1``): features and ITM scores against transformers'
``Blip2ForImageTextRetrieval`` on the same random weights; each loss against a plain computation
(loops over pairs and tokens; ITG through transformers' Q-Former with a mask built by loops);
hard-negative sampling; the UniLM mask; frozen ViT; training; the retrieval script."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.schedules import LinearWarmupCosine
from blip2.losses.stage1 import sample_negatives, stage1_losses, unilm_mask
from blip2.models.stage1 import Blip2Stage1
from blip2.modules.blip2_qformer import Blip2Qformer
from core.weights import CheckpointError
from tests._util import randomize_, rel_err
from tests.blip2_fixtures import CLIP_MEAN, CLIP_STD, one_torch_thread

WORDS = ("a photo of cat dog dogs sitting on couch two playing in the snow man riding bike down street "
         "bowl fruit wooden table red car").split()
TEXTS = ["a photo of a cat sitting on a couch", "two dogs playing in the snow",
         "a man riding a bike down the street of the snow on a couch", "a bowl of fruit"]
IMAGE_SIZE, QUERIES, EMBED, MAX_TXT = 28, 4, 16, 12
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=7)
EPS = 0.1  # label smoothing


def qformer_config(vocab_size: int, dropout: float = 0.1) -> dict:
    return dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                max_position_embeddings=32, vocab_size=vocab_size, use_qformer_text_input=True,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


@torch.no_grad()
def randomize_all_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``randomize_`` with every LayerNorm weight near one: BERT's ``LayerNorm.weight`` names escape its
    lower-case "norm" test, and weights near zero would make all queries alike (max = mean over queries)."""
    randomize_(module, seed=seed)
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm) and m.weight.abs().mean() < 0.5:
            m.weight.add_(1.0)
    return module


def write_bert_vocab(folder: Path) -> Path:
    """A tiny uncased WordPiece vocabulary in the bert-base-uncased folder layout (no [DEC] yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_system(tokenizer: Path, seed: int = 0, randomize: bool = True, dropout: float = 0.1,
                **kwargs) -> Blip2Stage1:
    """A tiny stage-1 system (vocabulary: the tiny BERT words + [DEC]), its network at ``.model``;
    ``randomize``: every parameter random (parity tests), else the model's own initialisation
    (training tests)."""
    torch.manual_seed(seed)
    system = Blip2Stage1(VISION, qformer_config(len(WORDS) + 6, dropout), num_query_tokens=QUERIES,
                         embed_dim=EMBED, max_txt_len=MAX_TXT, tokenizer=str(tokenizer), **kwargs)
    if randomize:
        randomize_all_(system.model, seed)
        system.model.temp.data.fill_(0.11)
    return system


def make_retrieval_folder(path: Path, tokenizer_src: Path, seed: int = 3) -> Path:
    """A random transformers ``Blip2ForImageTextRetrieval`` saved as a Hub folder with its BERT
    tokenizer ([DEC] added) and preprocessor config."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval

    tok = AutoTokenizer.from_pretrained(str(tokenizer_src), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    config = Blip2Config(vision_config=VISION, qformer_config=qformer_config(len(tok)), num_query_tokens=QUERIES,
                         image_text_hidden_size=EMBED, image_token_index=None)
    torch.manual_seed(seed)
    ref = randomize_all_(Blip2ForImageTextRetrieval(config).eval(), seed)
    ref.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "do_resize": True, "do_normalize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_convert_rgb": True, "resample": 3,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The Hub folder, transformers' model from it, ours from it (ITG head randomised), pixels and ids."""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    tmp = tmp_path_factory.mktemp("stage1")
    vocab = write_bert_vocab(tmp / "bert")
    folder = make_retrieval_folder(tmp / "itm", vocab)
    ref = Blip2ForImageTextRetrieval.from_pretrained(str(folder)).eval()
    ours = Blip2Qformer.from_pretrained(folder, max_txt_len=MAX_TXT)
    randomize_all_(ours.lm_head, 5)
    ours.temp.data.fill_(0.11)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=MAX_TXT, return_tensors="pt")
    pixels = torch.randn(len(TEXTS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    out = stage1_losses(ours, pixels, TEXTS)
    return dict(tmp=tmp, vocab=vocab, folder=folder, ref=ref, ours=ours, tok=tok, ids=enc["input_ids"],
                mask=enc["attention_mask"], pixels=pixels, out=out)


def smoothed_nll(logits: list[float], target: int, eps: float = EPS) -> float:
    """Label-smoothed cross-entropy of one row, written out: (1-eps) * -log p_y + eps * mean_v -log p_v."""
    top = max(logits)
    log_z = top + math.log(sum(math.exp(v - top) for v in logits))
    logp = [v - log_z for v in logits]
    return (1 - eps) * -logp[target] + eps * -sum(logp) / len(logp)


# ---- features and scores against transformers ------------------------------------------------------
@torch.no_grad()
def test_features_similarity_and_itm_match_transformers(world):
    ref, ours, ids, mask, pixels = world["ref"], world["ours"], world["ids"], world["mask"], world["pixels"]
    itc = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    assert rel_err(ours.image_features(pixels), itc.image_embeds) <= 1e-5
    assert rel_err(ours.text_features(TEXTS), itc.text_embeds) <= 1e-5
    similarity = ours.similarity(ours.image_features(pixels), ours.text_features(TEXTS))
    assert rel_err(similarity, itc.logits_per_image) <= 1e-5
    itm = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    assert rel_err(ours.itm_logits_from_embeds(ours.image_embeds(pixels), ids, mask), itm.logits_per_image) <= 1e-5
    assert rel_err(ours.itm_score(pixels, TEXTS), itm.logits_per_image.softmax(-1)[:, 1]) <= 1e-5


def test_tokenizer_adds_dec_pads_and_truncates(world):
    ours, vocab = world["ours"], world["vocab"]
    ids, mask = ours.tokenize(TEXTS)
    assert ids.shape == (len(TEXTS), MAX_TXT) and ours.tokenizer.bos_token == "[DEC]"
    assert (ids[:, 0] == ours.tokenizer.cls_token_id).all() and mask[2].all() and not mask[3].all()
    fresh = tiny_system(vocab).model
    assert fresh.tokenizer.bos_token_id == len(WORDS) + 5  # appended after the vocabulary, as LAVIS


# ---- losses against plain computations -----------------------------------------------------------
@torch.no_grad()
def test_itc_loss_matches_a_plain_computation(world):
    ref, out = world["ref"], world["out"]
    feats = ref(pixel_values=world["pixels"], input_ids=world["ids"], attention_mask=world["mask"])
    z, t, temp, n = feats.image_embeds.tolist(), feats.text_embeds.tolist(), 0.11, len(TEXTS)
    s = [[max(sum(a * b for a, b in zip(zq, t[j])) for zq in z[i]) / temp for j in range(n)] for i in range(n)]
    i2t = sum(smoothed_nll(s[i], i) for i in range(n)) / n
    t2i = sum(smoothed_nll([s[i][j] for i in range(n)], j) for j in range(n)) / n
    assert abs(out.loss_itc.item() - (i2t + t2i) / 2) <= 1e-5 * (i2t + t2i)


@torch.no_grad()
def test_itm_loss_matches_transformers_on_the_drawn_pairs(world):
    ref, out, ids, mask, pixels = world["ref"], world["out"], world["ids"], world["mask"], world["pixels"]
    neg_img, neg_txt = out.neg_image_idx, out.neg_text_idx
    n = len(TEXTS)
    assert all(neg_img[i] != i and neg_txt[i] != i for i in range(n))
    logits = ref(pixel_values=torch.cat([pixels, pixels[neg_img], pixels]),
                 input_ids=torch.cat([ids, ids, ids[neg_txt]]), attention_mask=torch.cat([mask, mask, mask[neg_txt]]),
                 use_image_text_matching_head=True).logits_per_image.tolist()
    labels = [1] * n + [0] * (2 * n)
    expected = sum(smoothed_nll(row, y, eps=0.0) for row, y in zip(logits, labels)) / (3 * n)
    assert abs(out.loss_itm.item() - expected) <= 1e-5 * expected


def plain_unilm_additive_mask(mask: torch.Tensor, q: int) -> torch.Tensor:
    b, t = mask.shape
    out = torch.full((b, 1, q + t, q + t), torch.finfo(torch.float32).min)
    for k in range(b):
        for i in range(q + t):
            for j in range(q + t):
                if j < q or (i >= q and j <= i and mask[k, j - q]):
                    out[k, 0, i, j] = 0.0
    return out


@torch.no_grad()
def test_itg_loss_matches_a_plain_computation(world):
    ref, ours, out, ids, mask = world["ref"], world["ours"], world["out"], world["ids"], world["mask"]
    dec = ids.clone()
    dec[:, 0] = world["tok"].convert_tokens_to_ids("[DEC]")
    image = ref.vision_model(pixel_values=world["pixels"]).last_hidden_state
    embeds = ref.embeddings(input_ids=dec, query_embeds=ref.query_tokens.expand(len(TEXTS), -1, -1))
    hidden = ref.qformer(query_embeds=embeds, query_length=QUERIES, encoder_hidden_states=image,
                         attention_mask=plain_unilm_additive_mask(mask, QUERIES)).last_hidden_state[:, QUERIES:]
    head = ours.lm_head
    x = F.layer_norm(F.gelu(hidden @ head.dense.weight.T + head.dense.bias), (24,), head.LayerNorm.weight,
                     head.LayerNorm.bias, 1e-12)
    logits = (x @ ref.embeddings.word_embeddings.weight.T + head.bias).tolist()
    terms = [smoothed_nll(logits[b][k], int(dec[b, k + 1])) for b in range(len(TEXTS)) for k in range(MAX_TXT - 1)
             if mask[b, k + 1]]
    expected = sum(terms) / len(terms)
    assert abs(out.loss_itg.item() - expected) <= 1e-5 * expected
    assert abs(out.loss.item() - (out.loss_itc + out.loss_itm + out.loss_itg).item()) <= 1e-6


# ---- hard negatives, UniLM mask ---------------------------------------------------------------------
def test_hard_negatives_follow_the_similarities_and_skip_the_positive():
    sim = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 2
    weights = F.softmax(sim, dim=1) + 1e-4
    weights.fill_diagonal_(0)
    expected = weights / weights.sum(1, keepdim=True)
    gen, draws = torch.Generator().manual_seed(0), 3000
    counts = torch.zeros(4, 4)
    for _ in range(draws):
        counts[torch.arange(4), sample_negatives(sim, gen)] += 1
    assert counts.diagonal().sum() == 0
    assert (counts / draws - expected).abs().max() < 0.03


def test_unilm_mask_pattern():
    got = unilm_mask(2, torch.tensor([[1, 1, 0]]))
    expected = torch.tensor([[1, 1, 0, 0, 0],  # queries: the queries only
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],  # text: all queries, causal text, no padding
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert got.shape == (1, 1, 5, 5) and torch.equal(got[0, 0], expected)


@torch.no_grad()
def test_itg_pass_is_causal_and_queries_ignore_the_text(world):
    ours, pixels = world["ours"], world["pixels"][:1]
    image = ours.image_embeds(pixels)
    ids_a, mask = ours.tokenize(["a photo of a cat"])
    ids_b = ids_a.clone()
    ids_b[0, 4] = ids_a[0, 2]  # change one later token
    run = [ours.qformer(ours.queries(1), image, ours.embeddings(i), unilm_mask(QUERIES, mask)) for i in (ids_a, ids_b)]
    assert torch.equal(run[0][:, :QUERIES + 4], run[1][:, :QUERIES + 4]) and not torch.equal(run[0], run[1])
    assert rel_err(ours.project_queries(run[0][:, :QUERIES]), ours.image_features(pixels)) <= 1e-6


# ---- frozen ViT, optimisation ---------------------------------------------------------------------
def test_gradients_reach_the_qformer_and_ln_vision_but_not_the_vit_blocks(world):
    model = tiny_system(world["vocab"]).train()
    net = model.model
    assert not net.vision_model.training and net.qformer.training
    stage1_losses(net, world["pixels"], TEXTS).loss.backward()
    ln_vision = set(map(id, net.vision_model.post_layernorm.parameters()))
    frozen = [p for p in net.vision_model.parameters() if id(p) not in ln_vision]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    trainable = [p for _, p in model.named_trainable_parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters()} - {id(p) for p in frozen}
    groups = model.configure_optimizers().param_groups
    assert sum(len(g["params"]) for g in groups) == len(trainable) and groups[0]["betas"] == (0.9, 0.98)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and all(p.ndim < 2 for p in groups[1]["params"])


def test_a_few_steps_reduce_the_losses(world):
    model = tiny_system(world["vocab"], seed=1, randomize=False, dropout=0.0, learning_rate=5e-3).train()
    opt = model.configure_optimizers()
    history = []
    for _ in range(30):
        out = stage1_losses(model.model, world["pixels"], TEXTS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append([out.loss_itc.item(), out.loss_itm.item(), out.loss_itg.item()])
    first, last = np.mean(history[:3], axis=0), np.mean(history[-3:], axis=0)
    # ITM first learns its 1:2 label prior (it needs ~100 steps more to match pairs: too slow here)
    assert last[0] < 0.8 * first[0] and last[1] < first[1] and last[2] < 0.5 * first[2], (first, last)


def test_trainer_steps_with_the_schedule_and_keep_the_vit(world):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    schedule = {"target": "core.schedules.LinearWarmupCosine",
                "params": {"warm_up_steps": 2, "max_steps": 4, "f_start": 0.01, "f_min": 0.1}}
    model = tiny_system(world["vocab"], seed=2, scheduler_config=schedule)
    net = model.model
    vit, qformer = ({k: v.clone() for k, v in part.state_dict().items()} for part in (net.vision_model.encoder,
                                                                                       net.qformer))
    items = [{"image": world["pixels"][i], "text_input": TEXTS[i]} for i in range(len(TEXTS))]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(items, batch_size=2))
    assert all(torch.equal(v, net.vision_model.encoder.state_dict()[k]) for k, v in vit.items())
    assert any(not torch.equal(v, net.qformer.state_dict()[k]) for k, v in qformer.items())
    assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], 1e-4 * LinearWarmupCosine(2, 4, 0.01, 0.1)(3))
    assert {"train/loss_itc", "train/loss_itm", "train/loss_itg", "train/temp"} <= set(trainer.callback_metrics)


def test_lr_schedule_warms_up_then_follows_the_cosine():
    f = LinearWarmupCosine(warm_up_steps=5000, max_steps=250000, f_start=0.01, f_min=0.1)
    assert f(0) == 0.01 and math.isclose(f(2500), 0.505) and f(250000) == f(300000) == pytest.approx(0.1)
    values = [f(n) for n in range(5000, 250001, 5000)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[0] > 0.99
    with pytest.raises(ValueError, match="warm_up_steps"):
        LinearWarmupCosine(warm_up_steps=10, max_steps=10)


# ---- initial weights: EVA ViT from a BLIP-2 folder, Q-Former from BERT --------------------------------
@torch.no_grad()
def test_qformer_starts_from_bert_as_blip2_does(world, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=32)
    bert = randomize_all_(BertForMaskedLM(config).eval(), 9)
    bert.bert.embeddings.token_type_embeddings.weight.zero_()  # BLIP-2's Q-Former has no token types
    bert.save_pretrained(str(tmp_path / "bert"))
    model = tiny_system(world["vocab"], randomize=False, bert_weights=str(tmp_path / "bert")).model.eval()
    ids, mask = model.tokenize(TEXTS)
    expected = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_err(model.text_hidden(ids, mask), expected) <= 1e-5
    logits = model.lm_head(model.text_hidden(ids, mask), model.embeddings.word_embeddings.weight)
    assert rel_err(logits[..., :config.vocab_size], bert(input_ids=ids, attention_mask=mask).logits) <= 1e-5
    layer = model.qformer.encoder.layer[1]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert torch.equal(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)
    fresh = tiny_system(world["vocab"], randomize=False).model  # same seed: the cross-attention is not BERT's
    assert torch.equal(model.qformer.encoder.layer[0].crossattention.attention.key.weight,
                       fresh.qformer.encoder.layer[0].crossattention.attention.key.weight)
    with pytest.raises(CheckpointError, match="not a BertForMaskedLM"):
        tiny_system(world["vocab"], randomize=False, bert_weights=str(world["folder"]))


def test_vit_starts_from_a_blip2_folder(world, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.blip2_fixtures import make_tiny_blip2_folder

    folder = make_tiny_blip2_folder(tmp_path / "opt", layout="prepend")
    model = tiny_system(world["vocab"], randomize=False, vision_weights=str(folder)).model
    saved = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith("vision_model.")}
    ours = model.state_dict()
    assert saved and all(torch.equal(ours[k], v) for k, v in saved.items())
    (tmp_path / "odd").mkdir()
    save_file({"vision_model.odd": torch.zeros(1)}, str(tmp_path / "odd" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vision_model layout: missing .*unexpected keys 1 \(vision_model.odd"):
        tiny_system(world["vocab"], randomize=False, vision_weights=str(tmp_path / "odd"))


def test_stage1_config_builds_the_paper_model():
    from omegaconf import OmegaConf
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    from core.config import get_obj_from_str, instantiate_from_config

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/blip2/pretrain_stage1.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
        ref = Blip2ForImageTextRetrieval(Blip2Config(
            qformer_config={"vocab_size": 30523, "use_qformer_text_input": True}, num_query_tokens=32))
    assert isinstance(model, Blip2Stage1)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: v for k, v in shapes.items() if not k.startswith(("temp", "lm_head."))} == expected
    assert shapes["vision_model.embeddings.position_embedding"] == (1, 257, 1408)
    assert shapes["query_tokens"] == (1, 32, 768)
    assert shapes["lm_head.bias"] == (30523,) and shapes["vision_projection.weight"] == (256, 768)
    assert model.model.max_txt_len == 32 and model.freeze_vit and model.betas == (0.9, 0.98)
    schedule = instantiate_from_config(cfg.model.params.scheduler_config)
    assert schedule(0) == 0.01 and schedule(250000) == pytest.approx(0.1) and schedule.warm_up_steps == 5000
    trainer = cfg.lightning.trainer
    assert cfg.data.params.batch_size * trainer.devices * trainer.accumulate_grad_batches == 1680
    assert trainer.max_steps == 250000 and cfg.model.base_learning_rate == 1e-4
    for target in (cfg.data.target, cfg.data.params.train.target):
        get_obj_from_str(target)
    # benchmarks/checkpoint_size.py --stage1 (the README's figure): lean keeps what the optimizer trains
    from benchmarks.checkpoint_size import stage1_sizes

    sizes, trained = stage1_sizes(), sum(p.numel() for _, p in model.named_trainable_parameters())
    assert sizes["trained"] == trained and sizes["params"] == sum(p.numel() for p in model.parameters())
    assert sizes["lean"] == 12 * trained and sizes["full_fp32"] - sizes["lean"] == 4 * (sizes["params"] - trained)


# ---- loading and bad input --------------------------------------------------------------------------
def test_folder_keys_are_matched_strictly(world, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extra"
    folder.mkdir()
    for f in world["folder"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "surprise.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys 1 \(surprise.weight\)"):
        Blip2Qformer.from_pretrained(folder)
    state.pop("itm_head.weight")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys 1 \(itm_head.weight\)"):
        Blip2Qformer.from_pretrained(folder)


def test_bad_tokenizer_and_config_are_one_line_errors(world, tmp_path):
    with pytest.raises(ValueError, match="expected a folder with BERT tokenizer files"):
        tiny_system(tmp_path / "nothing")
    with pytest.raises(ValueError, match="qformer_config.vocab_size is 8"):
        Blip2Qformer(VISION, qformer_config(8), num_query_tokens=QUERIES, tokenizer=str(world["vocab"]))
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        Blip2Qformer(VISION, {**qformer_config(40), "use_qformer_text_input": False})


# ---- the retrieval script ----------------------------------------------------------------------------
def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def parse_table(text: str, section: str) -> dict[str, list[tuple[str, float, str]]]:
    """``{row name: [(entry, itc, itm), ...]}`` of one section of the script's output."""
    lines = text.split(section + "\n", 1)[1].splitlines()
    rows, name = {}, None
    for line in lines:
        if not line.startswith("  "):
            if line.endswith("-> image") or line.endswith("-> text"):
                break
            name = line
            rows[name] = []
            continue
        parts = line.split(None, 5)
        rows[name].append((parts[5], float(parts[2]), parts[4]))
    return rows


def test_retrieve_script_ranks_like_the_model(world, tmp_path, capsys):
    from scripts.retrieve import main

    paths = write_images(tmp_path / "imgs", 3)
    texts = TEXTS[:3]
    assert main(["--model", str(world["folder"]), "--images", str(tmp_path / "imgs"), "--texts", *texts,
                 "--itm_top_k", "2", "--max_txt_len", str(MAX_TXT), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    ours = world["ours"]
    from blip2.processors import Blip2ImageProcessor
    from core.images import load_rgb

    with torch.no_grad():
        pixels = Blip2ImageProcessor.from_folder(world["folder"])([load_rgb(p) for p in paths])
        itc = ours.similarity(ours.image_features(pixels), ours.text_features(texts))
        probs = torch.stack([ours.itm_score(pixels, [t] * 3) for t in texts], dim=1)  # (image, text)
    i2t = parse_table(printed, "image -> text")
    for i, p in enumerate(paths):
        top2 = itc[i].argsort(descending=True)[:2].tolist()
        expected = sorted(top2, key=lambda j: -probs[i, j]) + itc[i].argsort(descending=True)[2:].tolist()
        assert [e[0] for e in i2t[str(p)]] == [texts[j] for j in expected]
        assert [e[1] for e in i2t[str(p)]] == pytest.approx([itc[i, j].item() for j in expected], abs=1e-4)
        assert [e[2] for e in i2t[str(p)]][2] == "-"
    t2i = parse_table(printed, "text -> image")
    assert [e[0] for e in t2i[texts[0]]][2:] == [str(paths[k]) for k in itc[:, 0].argsort(descending=True)[2:].tolist()]


@pytest.mark.parametrize("target", ["blip2.modules.blip2_qformer.Blip2Qformer", "blip2.models.stage1.Blip2Stage1"])
def test_retrieve_script_with_config_and_checkpoint(world, tmp_path, capsys, target):
    """The network's own weights, or a Lightning checkpoint of the system (``model.*``) with its
    training config, whose start weights (absent here) are not read."""
    from omegaconf import OmegaConf

    from scripts.retrieve import main

    system = tiny_system(world["vocab"], seed=4).eval()
    model = system.model
    system_config = target.endswith("Blip2Stage1")
    torch.save({"state_dict": (system if system_config else model).state_dict()}, tmp_path / "last.ckpt")
    start = {"vision_weights": str(tmp_path / "absent"), "bert_weights": str(tmp_path / "absent")}
    OmegaConf.save({"model": {"target": target, "params": {
        "vision_config": VISION, "qformer_config": qformer_config(len(WORDS) + 6), "num_query_tokens": QUERIES,
        "embed_dim": EMBED, "max_txt_len": MAX_TXT, "tokenizer": str(world["vocab"]),
        **(start if system_config else {})}}}, tmp_path / "m.yaml")
    paths = write_images(tmp_path / "imgs", 2)
    assert main(["--config", str(tmp_path / "m.yaml"), "--ckpt", str(tmp_path / "last.ckpt"), "--images",
                 *map(str, paths), "--texts", *TEXTS[:2], "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    from blip2.processors import Blip2ImageProcessor
    from core.images import load_rgb

    with torch.no_grad():
        pixels = Blip2ImageProcessor(IMAGE_SIZE)([load_rgb(p) for p in paths])
        itc = model.similarity(model.image_features(pixels), model.text_features(TEXTS[:2]))
    got = parse_table(printed, "image -> text")[str(paths[0])]
    assert [e[1] for e in got] == pytest.approx(sorted(itc[0].tolist(), reverse=True), abs=1e-4)
    assert main(["--config", str(tmp_path / "m.yaml"), "--images", str(paths[0]), "--texts", "x"]) == 2
    assert "--config needs --ckpt" in capsys.readouterr().err


# ---- lean checkpoints through main.py: resume exact, every reader completes them from the ViT folder ---------
STAGE1_CONFIG = Path(__file__).resolve().parents[1] / "configs/blip2/pretrain_stage1.yaml"


def stage1_main(tmp: Path, name: str, steps: int, *extra: str) -> int:
    """``main.py`` on the stage-1 recipe, sized down (the overlay ``tiny.yaml``), in process."""
    from core.trainer import main

    run = run_folder(tmp, name)
    start = ["-r", str(run)] if run else ["--base", str(STAGE1_CONFIG), str(tmp / "tiny.yaml"), "-n", name]
    return main([*start, "-t", "--no-test", "-l", str(tmp / "logs"), f"lightning.trainer.max_steps={steps}", *extra])


def run_folder(tmp: Path, name: str) -> Path | None:
    return next((p for p in (tmp / "logs").glob(f"*_{name}") if p.is_dir()), None)


@pytest.fixture(scope="module")
def lean_runs(world, tmp_path_factory):
    """Stage 1 from a BLIP-2 folder's ViT: 4 steps at once, and 2 steps then resumed to 4."""
    from omegaconf import OmegaConf

    from tests.blip2_fixtures import make_tiny_blip2_folder
    from tests.test_blip2_finetune import squares

    tmp = tmp_path_factory.mktemp("stage1_lean")
    base = make_tiny_blip2_folder(tmp / "vit", layout="prepend")
    captions = squares(tmp / "data", 6, seed=0)
    OmegaConf.save({
        "stage1": {"captions": str(captions), "image_root": str(captions.parent), "tokenizer": str(world["vocab"]),
                   "vision_weights": str(base), "image_size": IMAGE_SIZE},
        "model": {"params": {"vision_config": VISION, "qformer_config": qformer_config(len(WORDS) + 6),
                             "num_query_tokens": QUERIES, "embed_dim": EMBED, "max_txt_len": MAX_TXT,
                             "scheduler_config": {"params": {"warm_up_steps": 2, "max_steps": 4}}}},
        "data": {"params": {"batch_size": 2, "num_workers": 0}},
        "lightning": {"checkpoint": {"every_n_steps": 100},
                      "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32",
                                  "log_every_n_steps": 1}}}, tmp / "tiny.yaml")
    assert stage1_main(tmp, "whole", 4) == 0
    assert stage1_main(tmp, "split", 2) == 0
    assert stage1_main(tmp, "split", 4) == 0  # resumed mid-epoch (6 pairs, batch 2)
    return dict(tmp=tmp, base=base, runs={n: run_folder(tmp, n) for n in ("whole", "split")})


def test_stage1_checkpoints_are_lean_and_resume_exactly(lean_runs):
    from core.lean import BASE_KEY, file_sha256
    from core.weights import load_checkpoint

    whole, split = (load_checkpoint(lean_runs["runs"][n] / "checkpoints" / "last.ckpt") for n in ("whole", "split"))
    assert whole["global_step"] == split["global_step"] == 4
    frozen = set(whole[BASE_KEY]["keys"])
    assert frozen and all(k.startswith("model.vision_model.") for k in frozen) and not frozen & set(whole["state_dict"])
    assert "model.vision_model.post_layernorm.weight" in whole["state_dict"]  # ln_vision trains: kept
    assert whole[BASE_KEY]["path"] == str(lean_runs["base"].resolve())
    assert whole[BASE_KEY]["sha256"] == file_sha256(lean_runs["base"])
    assert set(whole["state_dict"]) == set(split["state_dict"])
    assert all(torch.equal(v, split["state_dict"][k]) for k, v in whole["state_dict"].items())
    [a], [b] = whole["optimizer_states"], split["optimizer_states"]
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][i][m], b["state"][i][m]) for i in a["state"] for m in a["state"][i])
    assert whole["lr_schedulers"] == split["lr_schedulers"]
    first = load_checkpoint(next((lean_runs["runs"]["split"] / "checkpoints").glob("step-000002.ckpt")))
    assert any(not torch.equal(v, whole["state_dict"][k]) for k, v in first["state_dict"].items())  # it trained on


def test_readers_complete_a_lean_stage1_checkpoint_from_its_vit_folder(lean_runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from blip2.loading import load_blip2
    from core.weights import load_checkpoint
    from scripts.retrieve import main as retrieve

    run, base = lean_runs["runs"]["whole"], lean_runs["base"]
    ckpt, [config] = run / "checkpoints" / "last.ckpt", sorted((run / "configs").glob("*-project.yaml"))
    model, _ = load_blip2(ckpt, config, network=Blip2Qformer)
    saved, vit = load_checkpoint(ckpt)["state_dict"], load_file(str(base / "model.safetensors"))
    for key, value in model.state_dict().items():
        expected = saved.get(f"model.{key}", vit.get(key))
        assert expected is not None and torch.equal(value, expected), key
    paths = write_images(tmp_path / "imgs", 2)
    args = ["--config", str(config), "--ckpt", str(ckpt), "--images", *map(str, paths), "--texts", *TEXTS[:2]]
    assert retrieve([*args, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out

    moved = base.with_name("vit_moved")
    base.rename(moved)
    try:
        assert retrieve(args) == 2
        assert "vit are not there (moved or deleted?)" in capsys.readouterr().err
        assert retrieve([*args, "--base_weights", str(moved)]) == 0 and capsys.readouterr().out == printed
        assert stage1_main(lean_runs["tmp"], "whole", 5) == 2  # the run's folder has moved: one line
        assert "vit: not a folder" in capsys.readouterr().err
        weights = load_file(str(moved / "model.safetensors"))
        weights["vision_model.embeddings.class_embedding"] += 1
        save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
        assert retrieve([*args, "--base_weights", str(moved)]) == 2
        assert "are not those it was trained from" in capsys.readouterr().err
        assert stage1_main(lean_runs["tmp"], "whole", 5, f"stage1.vision_weights={moved}") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "are not those it was trained from" in err[-1], err
    finally:
        moved.rename(base)
