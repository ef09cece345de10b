"""The three stage-1 objectives of BLIP-2 (Li et al. 2023, arXiv 2301.12597, Sec. 3.2, Fig. 2) as
pure functions over features, and ``stage1_losses``, which computes all three for the network
``blip2.modules.blip2_qformer.Blip2Qformer`` (the system ``blip2.models.stage1.Blip2Stage1`` trains it).

Notation: B pairs on this process (rank r of W), Q queries, T text tokens, E = embed_dim.
z_i^q: normalised projected output of query q for image i, [B, Q, E]; t_j: normalised projected
[CLS] output of text j, [B, E]; tau: the learnable temperature.

1. ITC: s(i, j) = max_q <z_i^q, t_j> / tau over the W*B pairs of the global batch, cross-entropy
   with label smoothing image->text and text->image, averaged.
2. ITM: for each text one negative image, for each image one negative text, drawn with probability
   softmax(s) + 1e-4 (the positive excluded); 3B pairs (pos, neg image, neg text) -> 2-way head.
3. ITG: next-token cross-entropy (label smoothing) under the UniLM mask (queries see queries, text
   sees all queries and the text before it).

Under DDP the features are all-gathered with :func:`gather`, whose backward pass hands each rank
the gradient every rank's loss sends to its own slice; with DDP's averaging of parameter gradients
a step then equals the single-process step on the global batch. (LAVIS gathers ITC features
without gradient, so each rank back-propagates only through its local features; the loss value is
the same.) Every rank must hold the same batch size, as in LAVIS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import einsum, rearrange

NEGATIVE_FLOOR = 1e-4  # LAVIS adds it to the softmax weights, so every non-positive can be drawn


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: sum the gradients of every rank, keep this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, size = world()
        local = grad.shape[0] // size
        return grad[rank * local:(rank + 1) * local]


def gather(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on every rank -> [W*B, ...] in rank order (differentiable; see the module notes)."""
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)


def local_targets(batch: int, device: torch.device) -> torch.Tensor:
    """Global indices of this rank's pairs: r*B + [0, B)."""
    return torch.arange(batch, device=device) + world()[0] * batch


def itc_similarities(image_feats: torch.Tensor, text_feats: torch.Tensor,
                     temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_i2t, s_t2i), each [B, W*B]: local images against all texts, local texts against all images."""
    text_all, image_all = gather(text_feats), gather(image_feats)  # (W*B, E), (W*B, Q, E)
    sim_i2t = einsum(image_feats, text_all, "b q e, n e -> b n q").amax(-1) / temp  # (B, W*B)
    sim_t2i = einsum(text_feats, image_all, "b e, n q e -> b n q").amax(-1) / temp  # (B, W*B)
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE with label smoothing; the positives are this rank's global indices."""
    targets = local_targets(sim_i2t.shape[0], sim_i2t.device)
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def sample_negatives(sim: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One global column index per row of ``sim`` [B, W*B], drawn with probability proportional to
    softmax(sim) + 1e-4 and never the row's own positive: the hard negatives of ITM."""
    weights = F.softmax(sim.float(), dim=1) + NEGATIVE_FLOOR
    rows = torch.arange(sim.shape[0], device=sim.device)
    weights[rows, local_targets(sim.shape[0], sim.device)] = 0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)


def itm_labels(batch: int, device: torch.device) -> torch.Tensor:
    """1 for the B positive pairs, 0 for the 2B negatives (pos, neg image, neg text order)."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(2 * batch, dtype=torch.long, device=device)])


def padding_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Bi-directional self-attention over [queries; text]: [B, 1, 1, Q+T] bool, True = attend."""
    keys = torch.cat([text_mask.new_ones(text_mask.shape[0], num_queries), text_mask], dim=1).bool()
    return rearrange(keys, "b n -> b 1 1 n")


def unilm_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """UniLM self-attention mask for ITG: [B, 1, Q+T, Q+T] bool, True = attend. Queries attend to
    the queries only; text token i attends to every query and to the non-padding tokens j <= i."""
    n = num_queries + text_mask.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool, device=text_mask.device).tril()  # (Q+T, Q+T)
    allowed[:, :num_queries] = True
    return allowed & padding_mask(num_queries, text_mask)


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """ITG: the Q-Former text decoder's next-token cross-entropy with label smoothing; the logits at
    text position k [B, T, V] predict ``labels[:, k+1]`` (-100 = ignored), mean over those tokens."""
    return F.cross_entropy(rearrange(logits[:, :-1], "b t v -> (b t) v"), labels[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


@dataclass
class Stage1Output:
    """The losses of one step and the hard negatives drawn for ITM (global indices)."""

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    neg_image_idx: torch.Tensor  # (B,) the negative image of each local text
    neg_text_idx: torch.Tensor  # (B,) the negative text of each local image


def itm_loss(model: Any, image: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, sim_i2t: torch.Tensor,
             sim_t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITM of ``model`` over 3B pairs (pos, neg image, neg text), negatives drawn from the whole
    global batch: (loss, negative image of each text, negative text of each image)."""
    neg_image, neg_text = sample_negatives(sim_t2i), sample_negatives(sim_i2t)  # (B,), (B,)
    images = torch.cat([image, gather(image)[neg_image], image])  # (3B, 1+N, D_img)
    ids = torch.cat([input_ids, input_ids, gather(input_ids)[neg_text]])  # (3B, T)
    masks = torch.cat([mask, mask, gather(mask)[neg_text]])  # (3B, T)
    logits = model.itm_logits_from_embeds(images, ids, masks)  # (3B, 2)
    return F.cross_entropy(logits, itm_labels(image.shape[0], logits.device)), neg_image, neg_text


def stage1_losses(model: Any, pixel_values: torch.Tensor, texts: Sequence[str],
                  label_smoothing: float = 0.1) -> Stage1Output:
    """ITC + ITM + ITG of ``model`` (a ``Blip2Qformer``) on images [B, 3, s, s] and their captions."""
    q = model.num_queries
    image = model.image_embeds(pixel_values)  # (B, 1+N, D_img)
    input_ids, mask = model.tokenize(texts)  # (B, T)
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = model.tokenizer.bos_token_id  # [DEC] replaces [CLS]
    # one UniLM pass: the queries never see the text, so their outputs are ITC's image features
    hidden = model.qformer(model.queries(image.shape[0]), image, model.embeddings(dec_ids),
                           unilm_mask(q, mask))  # (B, Q+T, D)
    sim_i2t, sim_t2i = itc_similarities(model.project_queries(hidden[:, :q]),
                                        model.text_features_from_ids(input_ids, mask), model.temperature())
    loss_itc = itc_loss(sim_i2t, sim_t2i, label_smoothing)
    loss_itm, neg_image, neg_text = itm_loss(model, image, input_ids, mask, sim_i2t, sim_t2i)
    logits = model.lm_head(hidden[:, q:], model.embeddings.word_embeddings.weight)  # (B, T, V)
    loss_itg = itg_loss(logits, dec_ids.masked_fill(mask == 0, -100), label_smoothing)
    return Stage1Output(loss_itc + loss_itm + loss_itg, loss_itc, loss_itm, loss_itg, neg_image, neg_text)
