"""Several DreamBooth subjects in one run (``dreambooth.concepts``, ldm/data/concepts.py): the config
builds one instance set and one class set per concept, each photo paired with its own concept's class
image; the order resumes exactly; class images and sample prompts come per concept; bad concepts are
one clear line before any work; a whole main.py run learns from both."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from core import trainer
from core.config import instantiate_from_config
from ldm.callbacks.image_logger import ImageLogger
from ldm.data.datamodule import DreamBoothDataModule
from tests.main_helpers import DREAMBOOTH_TINY, base_checkpoint

COLOURS = {"sks_photos": (255, 0, 0), "ohwx_photos": (0, 0, 255), "dog_class": (0, 255, 0),
           "cat_class": (255, 255, 0)}


def solid_images(folder, n, colour):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (36, 32), colour).save(folder / f"{i:02d}.png")
    return str(folder)


def colour_of(item) -> tuple[int, ...]:
    return tuple(int(v) for v in np.rint((item["image"][0, 0] + 1) * 127.5))


@pytest.fixture
def folders(tmp_path):
    return {name: solid_images(tmp_path / name, n, colour)
            for (name, colour), n in zip(COLOURS.items(), (2, 3, 2, 1))}


def two_concepts(folders, **second) -> list[dict]:
    return [{"data_root": folders["sks_photos"], "identifier": "sks", "class_word": "dog",
             "class_data_root": folders["dog_class"]},
            {"data_root": folders["ohwx_photos"], "identifier": "ohwx", "class_word": "cat",
             "class_data_root": folders["cat_class"], **second}]


def tiny_config(concepts, *overrides: str):
    config = OmegaConf.merge(OmegaConf.load(DREAMBOOTH_TINY), {"dreambooth": {"concepts": concepts}},
                             OmegaConf.from_dotlist(list(overrides)))
    return config


def test_two_concepts_pair_each_photo_with_a_class_image_of_its_own_concept(folders):
    concepts = two_concepts(folders, instance_prompt="a {identifier} {class_word} toy", repeats=4)
    data = instantiate_from_config(tiny_config(concepts).data)
    dataset = data.train_dataset()
    assert len(dataset) == 2 * 10 + 3 * 4  # photos x repeats: the config's 10, the concept's own 4
    expected = {"sks": ("a photo of sks dog", COLOURS["sks_photos"], "a photo of dog", COLOURS["dog_class"]),
                "ohwx": ("a ohwx cat toy", COLOURS["ohwx_photos"], "a photo of cat", COLOURS["cat_class"])}
    seen = {"sks": 0, "ohwx": 0}
    for i in range(len(dataset)):
        item = dataset[i]
        identifier = "sks" if "sks" in item["instance"]["caption"] else "ohwx"
        caption, colour, class_caption, class_colour = expected[identifier]
        assert item["instance"]["caption"] == caption and colour_of(item["instance"]) == colour
        assert item["class"]["caption"] == class_caption and colour_of(item["class"]) == class_colour
        seen[identifier] += 1
    assert seen == {"sks": 20, "ohwx": 12}
    batches = list(data.train_dataloader())  # batch size 1, shuffled: both concepts in the epoch
    assert {b["instance"]["caption"][0] for b in batches} == {"a photo of sks dog", "a ohwx cat toy"}


def test_the_concepts_order_resumes_mid_epoch(folders):
    config = tiny_config(two_concepts(folders), "data.params.batch_size=4")  # 5 photos x 10 repeats: 13 batches
    first = instantiate_from_config(config.data)
    full = [b["instance"]["caption"] for b in first.train_dataloader()]
    resumed = instantiate_from_config(config.data)
    resumed.load_state_dict({"sampler": first.sampler.state_dict(consumed=3 * 4)})
    assert [b["instance"]["caption"] for b in resumed.train_dataloader()] == full[3:]
    assert len(full) == 13 and any("sks" in c for b in full for c in b) and any("ohwx" in c for b in full for c in b)


def test_without_concepts_the_single_subject_data_is_as_before(folders):
    config = OmegaConf.load(DREAMBOOTH_TINY)
    config.dreambooth.update(data_root=folders["sks_photos"], class_data_root=folders["dog_class"], class_word="dog")
    data = instantiate_from_config(config.data)
    assert data.concepts is None and type(data.train_dataset()).__name__ == "DreamBoothPairs"


def test_sample_prompts_per_concept_each_once():
    concepts = [{"data_root": "a", "identifier": "sks", "class_word": "dog"},
                {"data_root": "b", "identifier": "ohwx", "class_word": "dog"}]
    logger = ImageLogger(prompts=["unused"], concepts=concepts,
                         concept_prompts=["a photo of {identifier} {class_word}", "a photo of a {class_word}"])
    assert logger.prompts == ["a photo of sks dog", "a photo of a dog", "a photo of ohwx dog"]
    assert ImageLogger(prompts=["kept"], concepts=None).prompts == ["kept"]


# ---- bad input: one line, before any work ------------------------------------------------------------
def bad(folders, tmp_path):
    """(concepts or a change of them, expected message) pairs."""
    empty = tmp_path / "empty_photos"
    empty.mkdir()
    first, second = two_concepts(folders)
    return [
        ([first, {**second, "data_root": str(empty)}], r"dreambooth.concepts\[1\] \(ohwx\): data_root .*empty_photos: "
                                                       r"the folder holds no images"),
        ([first, {**second, "data_root": str(tmp_path / "absent")}], r"\[1\] \(ohwx\): data_root .*absent: no such folder"),
        ([first, {**second, "identifier": "sks"}], r"dreambooth.concepts\[0\] and \[1\]: the same identifier 'sks'"),
        ([first, {k: v for k, v in second.items() if k != "class_word"}],
         r"dreambooth.concepts\[1\] \(ohwx\): missing 'class_word'"),
        ([first, {**second, "class_root": "x"}], r"\[1\] \(ohwx\): unknown key 'class_root'"),
        ([first, {**second, "class_data_root": None}], r"\[1\] \(ohwx\): no class_data_root, while other concepts"),
        ([first, {**second, "class_data_root": first["class_data_root"]}],
         r"\[1\] \(ohwx\): class_data_root .*dog_class is also the class folder of sks"),
        ([first, {**second, "num_class_images": -1}], r"\[1\] \(ohwx\): num_class_images=-1, expected an integer"),
        ([first, {**second, "instance_prompt": "a photo of a cat"}], r"instance_prompt .* has no \{identifier\}"),
        ([first, {**second, "data_root": first["data_root"]}], r"\[0\] and \[1\]: the same data_root"),
        ({"data_root": "x"}, r"dreambooth.concepts: expected null or a non-empty list"),
        ([], r"dreambooth.concepts: expected null or a non-empty list"),
        (["sks"], r"dreambooth.concepts\[0\]: expected a mapping"),
    ]


def test_bad_concepts_are_one_line_before_anything_is_built(folders, tmp_path):
    """``check_config`` is what core.trainer asks before it builds anything."""
    for concepts, message in bad(folders, tmp_path):
        with pytest.raises(ValueError, match=message) as err:
            DreamBoothDataModule.check_config(tiny_config(concepts))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"--data_root \(dreambooth.data_root\) is '.*' while dreambooth.concepts"):
        DreamBoothDataModule.check_config(tiny_config(two_concepts(folders), f"dreambooth.data_root={folders['sks_photos']}"))


def test_a_bad_concept_on_the_command_line_is_one_line_and_exit_2(folders, tmp_path, capsys):
    concepts = tmp_path / "concepts.yaml"
    OmegaConf.save({"dreambooth": {"concepts": [two_concepts(folders)[0]] * 2}}, concepts)
    code = trainer.main(["--base", str(DREAMBOOTH_TINY), str(concepts), "-t", "--actual_resume",
                         str(base_checkpoint(tmp_path / "base.ckpt")), "-l", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the same identifier 'sks'" in err[0], err
    assert not (tmp_path / "logs").exists()
