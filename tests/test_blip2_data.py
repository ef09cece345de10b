"""Caption and VQA data: every annotation format, train/eval items, augmentation, bad inputs."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.data.augment import EvalTransform, TrainTransform, crop_box
from blip2.data.captions import CaptionDataset, collate, pre_caption, read_captions
from blip2.data.datamodule import CaptionDataModule
from blip2.data.vqa import VQADataset, pre_question
from blip2.processors import CLIP_MEAN, CLIP_STD, Blip2ImageProcessor
from core.data.sampler import ResumableSampler
from core.images import ImageLoadError

CAPS = {"a.png": ["A dog running!", "the dog (brown)"], "b.png": ["Two cats; sleeping."]}


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for name in CAPS:
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def expected_pairs(root):
    return [(root / name, c) for name, caps in CAPS.items() for c in caps]


def write_karpathy(root):
    entries = [{"filepath": "", "filename": name, "split": split, "sentences": [{"raw": c, "tokens": []} for c in caps]}
               for (name, caps), split in zip(CAPS.items(), ["train", "test"])]
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    return root / "dataset_coco.json"


def test_every_format_reads_the_same_pairs(images):
    (images / "lavis.json").write_text(json.dumps([{"image": n, "caption": c} for n, c in CAPS.items()]))
    with open(images / "caps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows({"image": n, "caption": c} for n, cs in CAPS.items() for c in cs)
    (images / "caps.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": c})
                                                 for n, cs in CAPS.items() for c in cs))
    sidecars = images / "sidecars"
    sidecars.mkdir()
    for name, caps in CAPS.items():
        (sidecars / name).write_bytes((images / name).read_bytes())
        (sidecars / name).with_suffix(".txt").write_text("\n".join(caps) + "\n")
    want = expected_pairs(images)
    for source in ("lavis.json", "caps.csv", "caps.jsonl", write_karpathy(images).name):
        assert read_captions(images / source) == want, source
    assert read_captions(sidecars) == expected_pairs(sidecars)


def test_karpathy_split_and_image_root(images, tmp_path_factory):
    source = tmp_path_factory.mktemp("ann") / "dataset_coco.json"
    source.write_text(write_karpathy(images).read_text())
    assert read_captions(source, images, split=["train", "restval"]) == expected_pairs(images)[:2]
    assert read_captions(source, images, split="test") == expected_pairs(images)[2:]


def test_train_items_and_collate(images):
    (images / "caps.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": c})
                                                 for n, cs in CAPS.items() for c in cs))
    ds = CaptionDataset(str(images / "caps.jsonl"), image_size=16)
    assert len(ds) == 3
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["text_input"] == "a dog running"
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 16, 16) and batch["text_input"][1:] == ["the dog brown", "two cats sleeping"]


def test_train_draws_depend_on_seed_epoch_and_item_only(images):
    """Found by benchmarks/reliability.py: the augmentation drew from the global RNG, which the loader's
    prefetch had advanced before a resumed run restored it, so resumed BLIP-2 runs diverged."""
    (images / "caps.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": c})
                                                 for n, cs in CAPS.items() for c in cs))
    ds = CaptionDataset(str(images / "caps.jsonl"), image_size=16, min_scale=0.2)
    torch.manual_seed(1)
    first = ds[0]["image"]
    torch.manual_seed(2)
    assert torch.equal(ds[0]["image"], first)  # the global RNG plays no part
    assert ds.epoch_indexed and not torch.equal(ds[3]["image"], first)  # item 0 of epoch 1: new draws
    assert ds[3]["text_input"] == ds[0]["text_input"]
    other_seed = CaptionDataset(str(images / "caps.jsonl"), image_size=16, min_scale=0.2, seed=1)
    assert not torch.equal(other_seed[0]["image"], first)
    sampler = ResumableSampler(len(ds), seed=0, epoch_index=True)
    sampler.set_epoch(1)
    assert sorted(sampler) == [3, 4, 5]


def test_eval_items_group_raw_references(images):
    (images / "lavis.json").write_text(json.dumps([{"image": n, "caption": c} for n, c in CAPS.items()]))
    ds = CaptionDataset(str(images / "lavis.json"), mode="eval", image_size=16)
    assert len(ds) == 2
    item = ds[0]
    assert item["references"] == CAPS["a.png"] and item["image_id"] == str(images / "a.png")
    expected = Blip2ImageProcessor(16)([Image.open(images / "a.png").convert("RGB")])[0]
    assert torch.equal(item["image"], expected)
    batch = collate([ds[0], ds[1]])
    assert batch["references"] == [CAPS["a.png"], CAPS["b.png"]]


def test_pre_caption_as_lavis():
    assert pre_caption("A  Dog, (running)!\n") == "a dog, running"  # commas and apostrophes stay
    assert pre_caption(" ".join(f"w{i}" for i in range(60)), max_words=50).split() == [f"w{i}" for i in range(50)]
    assert pre_question("What is the Man doing?  ") == "what is the man doing?"


def test_bad_image_is_named(images):
    (images / "broken.png").write_bytes(b"not an image at all")
    (images / "caps.jsonl").write_text(json.dumps({"image": "broken.png", "caption": "x"}))
    ds = CaptionDataset(str(images / "caps.jsonl"), image_size=16)
    with pytest.raises(ImageLoadError, match="broken.png"):
        ds[0]


def test_bad_annotations_are_one_line_errors(images):
    (images / "caps.jsonl").write_text(json.dumps({"image": "missing.png", "caption": "x"}))
    with pytest.raises(ValueError, match="missing.png: image file not found"):
        CaptionDataset(str(images / "caps.jsonl"))
    (images / "caps.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match="'image' and 'caption' columns"):
        read_captions(images / "caps.csv")
    (images / "bad.json").write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match="entry 0: expected the keys"):
        read_captions(images / "bad.json")
    with pytest.raises(ValueError, match="a.png: no caption sidecar a.txt"):
        read_captions(images)
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_captions(images / "a.png")


def test_crop_box_follows_random_resized_crop():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = crop_box(40, 30, (0.5, 1.0), gen)
        assert 0 <= left <= 40 - w and 0 <= top <= 30 - h
        assert 0.5 * 1200 - 40 <= w * h <= 1200 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # no box of 90-100% area fits a 4:1 image at ratios 3/4..4/3: the centred fallback clamps the ratio
    assert crop_box(400, 100, (0.9, 1.0), gen) == (133, 0, 133, 100)


def test_train_transform_is_crop_flip_normalise():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    transform = TrainTransform(16, 0.5, 1.0)
    outputs = [transform(image, torch.Generator().manual_seed(s)) for s in range(12)]
    for seed, out in enumerate(outputs):
        gen = torch.Generator().manual_seed(seed)
        left, top, w, h = crop_box(32, 24, (0.5, 1.0), gen)
        flip = torch.rand((), generator=gen).item() < 0.5
        crop = image.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BICUBIC)
        pixels = np.asarray(crop, dtype=np.float64)[:, ::-1] if flip else np.asarray(crop, dtype=np.float64)
        expected = (pixels / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        assert np.abs(out.permute(1, 2, 0).numpy() - expected).max() < 1e-5
    assert len({out.sum().item() for out in outputs}) == 12  # different crops / flips per draw
    assert torch.equal(EvalTransform(16)(image), Blip2ImageProcessor(16)([image])[0])


def test_vqa_dataset(images):
    records = [{"image": "a.png", "question": "What is the dog doing?", "answer": ["running"] * 10}]
    (images / "vqa.json").write_text(json.dumps(records))
    item = VQADataset(str(images / "vqa.json"), image_size=16)[0]
    assert item["question"] == "what is the dog doing?" and item["answers"] == ["running"] * 10
    assert item["image"].shape == (3, 16, 16)
    (images / "vqa.json").write_text(json.dumps([{"image": "a.png", "question": "q"}]))
    with pytest.raises(ValueError, match="non-empty 'answer' list"):
        VQADataset(str(images / "vqa.json"))


def test_datamodule_batches(images):
    (images / "caps.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": c})
                                                 for n, cs in CAPS.items() for c in cs))
    params = {"source": str(images / "caps.jsonl"), "image_size": 16}
    dm = CaptionDataModule(batch_size=2, train={"target": "blip2.data.captions.CaptionDataset", "params": params},
                           validation={"target": "blip2.data.captions.CaptionDataset",
                                       "params": {**params, "mode": "eval"}})
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert train["image"].shape == (2, 3, 16, 16) and len(train["text_input"]) == 2
    assert sorted(map(len, val["references"])) == [1, 2]
