"""The toy world: 32x32 coloured shapes on plain backgrounds, drawn procedurally and captioned, with
its own small models (configs/toy/, shipped in models/toy/) so that every claim of the project can
be run and measured on a CPU in minutes.

    shapes.py              the data: scenes, rendering, captions, ShapesDataset, splits, the DreamBooth
                           subjects; python -m toy.shapes writes a split's or a subject's images
    captioner.py           the toy BLIP-2 captioner as trained: caption tokenizer, ToyCaptions data set,
                           ToyBlip2Finetune system; python -m toy.captioner tokenizer
    judge.py               reading images with the shipped captioner: captions, the attributes they
                           name and their scores, image embeddings; python -m toy.judge accuracy
    evaluate.py            the README's five measurements (python scripts/evaluate_toy.py)
    pretrain.sh            the shipped weights from nothing: VAE, text-to-image model, captioner
    pretrain_captioner.sh  the captioner's part of it: tokenizer, training, export, accuracy
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/toy, models/toy, data/toy_subject
