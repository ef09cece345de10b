"""The toy world: 32x32 coloured shapes on plain backgrounds, drawn procedurally and captioned, with
its own small models (configs/toy/, shipped in models/toy/) so that every claim of the project can
be run and measured on a CPU in minutes.

    shapes.py     the data: scenes, rendering, captions, ShapesDataset, splits, the DreamBooth subject
    captioner.py  the toy BLIP-2 captioner as trained: caption tokenizer, ToyCaptions, ToyBlip2Finetune
    judge.py      reading images with the shipped captioner: captions, attributes and their scores,
                  image embeddings, caption accuracy
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/toy, models/toy, data/toy_subject
