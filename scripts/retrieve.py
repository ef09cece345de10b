"""Image-text retrieval with a BLIP-2 stage-1 model: rank the texts for each image and the images
for each text by ITC similarity (max over queries of the cosine), optionally re-ranking the top
``--itm_top_k`` of each list by the ITM match probability (as BLIP-2 retrieval re-ranks with ITM).

    python scripts/retrieve.py --model models/blip2-itm-vit-g --images photos/ --texts "a dog" "a red car"
    python scripts/retrieve.py --config configs/blip2/pretrain_stage1.yaml --ckpt logs/run/checkpoints/last.ckpt \
        --images a.jpg list.txt --texts_file captions.txt --itm_top_k 5
    python scripts/retrieve.py --lavis blip2_pretrained.pth --vit eva_vit_g.pth --tokenizer models/bert-base-uncased \
        --images photos/ --texts "a dog" "a red car"

The model (``blip2.loading.load_blip2``): a Hugging Face folder (``--model``); ``--config`` with
``--ckpt``: a yaml whose ``model`` builds a ``Blip2Qformer`` or the stage-1 system ``Blip2Stage1``
(e.g. the config ``main.py`` saved in the run folder) and its weights or Lightning checkpoint (a
lean one is completed from the ViT folder it names, ``--base_weights`` when that folder moved);
``--lavis`` LAVIS's stage-1 file with ``--vit`` the EVA ViT-g file (unless it holds its own ViT),
into BLIP-2's stage-1 architecture sized from the files with the BERT tokenizer ``--tokenizer``
(``[DEC]`` is added), or into the network ``--config`` builds.
Images: files, folders (recursive) and list files; an unreadable image is an error naming it.
Bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from blip2.captioning import batches, collect_inputs
from blip2.loading import is_lavis_checkpoint, load_blip2
from blip2.modules.blip2_qformer import Blip2Qformer
from blip2.processors import Blip2ImageProcessor
from core.cli import ArgumentParser, run_cli
from core.images import load_rgb
from core.weights import CheckpointError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a Hugging Face Blip2ForImageTextRetrieval folder")
    src.add_argument("--ckpt", help="weights for --config (.safetensors, .ckpt, or a Lightning checkpoint)")
    src.add_argument("--lavis", help="LAVIS's stage-1 checkpoint (blip2_pretrained.pth), with --vit")
    p.add_argument("--config", help="a yaml whose 'model' builds a Blip2Qformer or Blip2Stage1 (for --ckpt, --lavis)")
    p.add_argument("--vit", help="the EVA ViT-g file of --lavis (eva_vit_g.pth)")
    p.add_argument("--tokenizer", help="the BERT tokenizer folder of --lavis without --config (bert-base-uncased)")
    p.add_argument("--base_weights", metavar="DIR",
                   help="a lean training checkpoint's ViT folder, when it was moved (its content is checked)")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders or list files")
    p.add_argument("--texts", nargs="*", default=[], help="candidate texts")
    p.add_argument("--texts_file", help="a file of candidate texts, one a line")
    p.add_argument("--top_k", type=int, default=5, help="entries shown per image / per text")
    p.add_argument("--itm_top_k", type=int, default=0, help="re-rank this many of each list with ITM (0: off)")
    p.add_argument("--max_txt_len", type=int, default=None, help="text truncation (default: the model's, 32)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def read_texts(opt: argparse.Namespace) -> list[str]:
    texts = list(opt.texts)
    if opt.texts_file:
        path = Path(opt.texts_file)
        if not path.is_file():
            raise ValueError(f"--texts_file {path}: file not found")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("no texts: give --texts and/or --texts_file")
    return texts


def check(opt: argparse.Namespace) -> None:
    """The model options that go together (one line each, before anything is read)."""
    if opt.config and not (opt.ckpt or opt.lavis):
        raise ValueError("--config needs --ckpt (the weights to load into the model it builds) or --lavis")
    if not (opt.model or opt.ckpt or opt.lavis):
        raise ValueError("no model: give --model DIR, --config YAML with --ckpt FILE, or --lavis FILE with --vit FILE")
    if opt.ckpt and not opt.config:
        raise ValueError("--ckpt needs --config (the model to load it into); a Hugging Face folder goes in --model")
    if opt.vit and not opt.lavis:
        raise ValueError("--vit belongs to --lavis (a LAVIS stage-1 checkpoint)")
    if opt.lavis and not opt.config and not opt.tokenizer:
        raise ValueError("--lavis needs --tokenizer (a bert-base-uncased folder), or --config naming one")
    if opt.tokenizer and not (opt.lavis and not opt.config):
        raise ValueError("--tokenizer is for --lavis without --config (a config names its own tokenizer)")
    if opt.base_weights and not opt.ckpt:
        raise ValueError("--base_weights completes a lean training checkpoint: it goes with --ckpt")


def load_model(opt: argparse.Namespace) -> tuple[Blip2Qformer, Blip2ImageProcessor]:
    """(model, image processor) from a Hub folder, a yaml plus a checkpoint (strict keys), or LAVIS's files."""
    if opt.lavis and not is_lavis_checkpoint(Path(opt.lavis)):
        raise CheckpointError(f"--lavis {opt.lavis}: not a LAVIS checkpoint (a .pth holding {{'model': state_dict}}, "
                              "e.g. blip2_pretrained.pth)")
    return load_blip2(opt.model or opt.ckpt or opt.lavis, opt.config, network=Blip2Qformer, device=opt.device,
                      tokenizer=opt.tokenizer, vit=opt.vit, base=opt.base_weights)


@torch.no_grad()
def encode_images(model: Blip2Qformer, processor: Blip2ImageProcessor, paths: list[Path],
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ViT features [N, 1+P, D] for ITM, normalised query features [N, Q, E] for ITC)."""
    embeds, feats = [], []
    for chunk in batches(paths, batch_size):
        pixels = processor([load_rgb(p) for p in chunk]).to(model.query_tokens.device)
        image = model.image_embeds(pixels)  # (b, 1+P, D_img)
        embeds.append(image)
        feats.append(model.project_queries(model.qformer(model.queries(image.shape[0]), image)))  # (b, Q, E)
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def ranked(model: Blip2Qformer, itc: torch.Tensor, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
           top_k: int, itm_top_k: int, image_rows: bool) -> list[list[tuple[int, float, float | None]]]:
    """Per row of ``itc`` [rows, cols]: the top entries as (column, ITC score, ITM probability or None),
    the first ``itm_top_k`` re-ordered by ITM. ``image_rows``: rows are images (else texts)."""
    out = []
    for row, scores in enumerate(itc):
        order = scores.argsort(descending=True)[:max(top_k, itm_top_k)].tolist()
        head, tail = order[:itm_top_k], order[itm_top_k:]
        probs = {}
        if head:
            img_idx, txt_idx = ([row] * len(head), head) if image_rows else (head, [row] * len(head))
            logits = model.itm_logits_from_embeds(image[img_idx], ids[txt_idx], mask[txt_idx])  # (k, 2)
            probs = dict(zip(head, logits.softmax(-1)[:, 1].tolist()))
            head = sorted(head, key=lambda c: -probs[c])
        out.append([(c, scores[c].item(), probs.get(c)) for c in (head + tail)[:top_k]])
    return out


def print_table(title: str, names: list[str], others: list[str], rows: list) -> None:
    print(title)
    for name, entries in zip(names, rows):
        print(name)
        for rank, (col, itc, itm) in enumerate(entries, 1):
            print(f"  {rank:>3}  itc {itc:+.4f}  itm {'  -   ' if itm is None else f'{itm:.4f}'}  {others[col]}")


def run(opt: argparse.Namespace) -> int:
    check(opt)
    texts, paths = read_texts(opt), collect_inputs(opt.images)
    model, processor = load_model(opt)
    model.max_txt_len = opt.max_txt_len or model.max_txt_len
    image, image_feats = encode_images(model, processor, paths, opt.batch_size)
    ids, mask = model.tokenize(texts)
    itc = model.similarity(image_feats, model.text_features_from_ids(ids, mask))  # (N_img, N_txt)
    names = [str(p) for p in paths]
    print_table("image -> text", names, texts, ranked(model, itc, image, ids, mask, opt.top_k, opt.itm_top_k, True))
    print_table("text -> image", texts, names, ranked(model, itc.T, image, ids, mask, opt.top_k, opt.itm_top_k, False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run; a bad input is one line on stderr and exit status 2 (``core.cli``)."""
    return run_cli("retrieve.py", lambda args: run(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
