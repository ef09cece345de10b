"""BLIP-2 stage 1 under DDP: 2 CPU processes (gloo), each with B of the 2B pairs and the same
weights. The all-gathered ITC loss averaged over the ranks equals the single-process loss on all
2B pairs, and so do the parameter gradients once averaged over the ranks (what DDP does); ITM
draws its hard negatives from the whole global batch, the other rank's pairs included."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from blip2.losses.stage1 import itc_similarities, itm_labels, sample_negatives, stage1_losses
from tests._util import rel_err
from tests.test_blip2_stage1 import IMAGE_SIZE, TEXTS, tiny_system, write_bert_vocab

WORLD, LOCAL, DRAWS = 2, 2, 100
KEY_BIAS = "attention.key.bias"  # the key projection's bias of a self- or cross-attention layer


def batch() -> tuple[torch.Tensor, list[str]]:
    pixels = torch.randn(WORLD * LOCAL, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    return pixels, TEXTS[:WORLD * LOCAL]


def itc_step(model, pixels: torch.Tensor, texts: list[str]) -> tuple[float, dict[str, torch.Tensor]]:
    """ITC loss of one step of the network ``model`` and the gradients it sends to the trainable
    parameters (those of a ``Blip2Stage1``: the ViT blocks are frozen)."""
    out = stage1_losses(model, pixels, texts)
    out.loss_itc.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = tiny_system(Path(tmp) / "bert", dropout=0.0).model
    pixels, texts = batch()
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
    torch.manual_seed(100 + rank)
    out, grads = itc_step(model, pixels[mine], texts[mine])
    for g in grads.values():
        dist.all_reduce(g)
        g /= WORLD
    with torch.no_grad():  # ITM on the drawn pairs, rebuilt from the full batch without collectives
        image, (ids, mask) = model.image_embeds(pixels), model.tokenize(texts)
        ni, nt = out.neg_image_idx, out.neg_text_idx
        logits = model.itm_logits_from_embeds(torch.cat([image[mine], image[ni], image[mine]]),
                                              torch.cat([ids[mine], ids[mine], ids[nt]]),
                                              torch.cat([mask[mine], mask[mine], mask[nt]]))
        itm = F.cross_entropy(logits, itm_labels(LOCAL, logits.device))
        sim_i2t, sim_t2i = itc_similarities(model.image_features(pixels[mine]), model.text_features(texts[mine]),
                                            model.temperature())
        draws = torch.stack([sample_negatives(s) for _ in range(DRAWS) for s in (sim_i2t, sim_t2i)])
    torch.save({"loss_itc": out.loss_itc.item(), "loss_itm": out.loss_itm.item(), "itm_rebuilt": itm.item(),
                "grads": grads, "draws": draws}, Path(tmp) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage1_ddp")
    write_bert_vocab(tmp / "bert")
    # fork: the children reuse this process' imports (spawn would import torch and lightning twice more);
    # each sets one torch thread first, as DataLoader workers do
    mp.start_processes(_worker, args=(free_port(), str(tmp)), nprocs=WORLD, join=True, start_method="fork")
    return tmp, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_gathered_itc_loss_and_gradients_equal_the_single_process_ones(ranks):
    tmp, results = ranks
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out, grads = itc_step(tiny_system(tmp / "bert", dropout=0.0).model, *batch())
    torch.set_num_threads(previous)
    mean_loss = sum(r["loss_itc"] for r in results) / WORLD
    assert abs(mean_loss - out.loss_itc.item()) <= 1e-5 * out.loss_itc.item()
    assert all(r["grads"].keys() == grads.keys() for r in results) and "qformer.layernorm.weight" in grads
    flat = [torch.cat([g[n].flatten() for n in sorted(grads)]) for g in (results[0]["grads"], grads)]
    assert rel_err(*flat) <= 1e-5
    # per tensor too, looser (sums with cancellation, e.g. biases), except the attention key biases
    ddp = results[0]["grads"]
    bad = [n for n, g in grads.items() if not n.endswith(KEY_BIAS)
           and (ddp[n] - g).abs().max() > 1e-4 * g.abs().max() + 1e-8]
    assert not bad
    # The attention key biases: softmax is invariant to a constant added to all of a query's logits, and
    # q_i . b_k is such a constant, so d loss / d key.bias = 0 analytically; both sides hold float
    # round-off only, and its relative difference means nothing. On the scale of the gradient of the
    # layer's key projection (key.weight, whose true gradient is not zero) both must be zero, and equal.
    key_biases = [n for n in grads if n.endswith(KEY_BIAS)]
    assert len(key_biases) == 5  # self-attention of 3 layers, cross-attention of layers 0 and 2
    for name in key_biases:
        scale = grads[name.removesuffix("bias") + "weight"].abs().max()
        assert scale > 0 and grads[name].abs().max() <= 1e-5 * scale and ddp[name].abs().max() <= 1e-5 * scale
        assert (ddp[name] - grads[name]).abs().max() <= 1e-5 * scale
    assert all(torch.equal(results[0]["grads"][n], results[1]["grads"][n]) for n in grads)


def test_hard_negatives_come_from_the_whole_global_batch(ranks):
    _, results = ranks
    for rank, r in enumerate(results):
        own = set(range(rank * LOCAL, (rank + 1) * LOCAL))
        positives = torch.arange(LOCAL) + rank * LOCAL
        assert not (r["draws"] == positives).any()
        assert set(r["draws"].flatten().tolist()) - own  # the other rank's pairs are drawn too
        assert abs(r["loss_itm"] - r["itm_rebuilt"]) <= 1e-5 * r["itm_rebuilt"]

