"""scripts/evaluate_blip2.py on small files in the standard formats, with a tiny random BLIP-2:
the readers, the official result files, the scores against pycocoevalcap and by hand, a run that
crashes and resumes without recomputing anything, and the one-line refusals of bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from blip2 import Blip2OPT
from blip2.evaluation.annotations import Item, read_captions, read_gqa, read_vqa
from blip2.evaluation.tasks import TASKS, score_gqa, score_nocaps, score_vqa
from blip2.metrics import coco_tokenize
from blip2.processors import Blip2ImageProcessor
from core.images import load_rgb
from scripts import evaluate_blip2
from tests.blip2_fixtures import make_tiny_blip2_folder, one_torch_thread

IDS = [42, 7, 1234, 99, 5]
REFS = ["a photo of a cat sitting on a couch", "two dogs playing in the snow", "a man riding a bike down the street",
        "a bowl of fruit on a wooden table", "a cat on a wooden table"]
DOMAINS = ["in-domain", "near-domain", "out-domain", "near-domain", "in-domain"]
QUESTIONS = ["What is the cat doing?", "how many dogs are there", "Is it snowing?", "what color is the bike?",
             "What is on the table?", "where is the man", "Is this a couch?"]
HUMAN_ANSWERS = ["sleeping", "two", "no"] * 3 + ["yes"]
GQA = {"201": ("n1", "Is the cat on the table?", "yes"), "202": ("n2", "Which side is the dog on?", "left"),
       "203": ("n1", "What is the bowl made of?", "wood")}

_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _save(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _coco_name(image_id: int) -> str:
    return f"val2014/COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    images = root / "images"
    for name in [_coco_name(i) for i in IDS] + ["nocaps/a.jpg", "nocaps/b.jpg", "gqa/n1.jpg", "gqa/n2.jpg"]:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(images / name)
    refs = {i: [REFS[k], REFS[(k + 1) % 5], REFS[(k + 3) % 5]] for k, i in enumerate(IDS)}
    files = {
        "lavis": _save(root / "coco_karpathy_test.json", [{"image": _coco_name(i), "caption": refs[i]} for i in IDS]),
        "gt": _save(root / "coco_karpathy_test_gt.json", {
            "images": [{"id": i} for i in IDS],
            "annotations": [{"image_id": i, "caption": c, "id": n} for n, (i, c) in
                            enumerate((i, c) for i in IDS for c in refs[i])]}),
        "nocaps": _save(root / "nocaps_val_4500_captions.json", {
            "images": [{"id": k, "file_name": "ab"[k % 2] + ".jpg", "domain": DOMAINS[k]} for k in range(5)],
            "annotations": [{"image_id": k, "caption": c, "id": 10 * k + j}
                            for k in range(5) for j, c in enumerate(refs[IDS[k]])]}),
        "questions": _save(root / "v2_OpenEnded_mscoco_val2014_questions.json", {
            "data_subtype": "val2014",
            "questions": [{"question_id": 100 + n, "image_id": IDS[n % 5], "question": q}
                          for n, q in enumerate(QUESTIONS)]}),
        "answers": _save(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
            {"question_id": 100 + n, "answer_type": "other", "question_type": "what",
             "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(HUMAN_ANSWERS)]}
            for n in range(len(QUESTIONS))]}),
        "gqa": _save(root / "testdev_balanced_questions.json", {
            qid: {"imageId": img, "question": q, "answer": a, "fullAnswer": a} for qid, (img, q, a) in GQA.items()}),
    }
    return make_tiny_blip2_folder(root / "model"), images, files, root


def _args(world, task: str, out: Path, *extra: str) -> list[str]:
    model, images, files, _ = world
    data = {"coco": ["--annotations", files["lavis"]], "nocaps": ["--annotations", files["nocaps"]],
            "vqav2": ["--questions", files["questions"], "--annotations", files["answers"]],
            "gqa": ["--annotations", files["gqa"]]}[task]
    image_root = images / ("nocaps" if task == "nocaps" else "gqa" if task == "gqa" else "")
    return [task, "--model", str(model), "--images", str(image_root), "--out", str(out), "--num_workers", "0",
            *map(str, data), *extra]


class CountingGenerate:
    """Wraps ``Blip2OPT.generate``: counts calls and images, and crashes at call ``crash_at``."""

    def __init__(self, monkeypatch, crash_at: int | None = None):
        self.calls, self.images, self.crash_at = 0, 0, crash_at
        original = Blip2OPT.generate

        def generate(model, pixel_values, *args, **kwargs):
            self.calls += 1
            if self.calls == self.crash_at:
                raise RuntimeError("simulated crash")
            self.images += pixel_values.shape[0]
            return original(model, pixel_values, *args, **kwargs)

        monkeypatch.setattr(Blip2OPT, "generate", generate)


# ---- readers ------------------------------------------------------------------------------------
def test_both_coco_formats_give_the_same_items(world):
    _, images, files, _ = world
    lavis, gt = read_captions(files["lavis"], images), read_captions(files["gt"], images)
    assert [it.key for it in lavis] == IDS and lavis == gt
    assert lavis[0].image == images / _coco_name(42) and lavis[0].references == (REFS[0], REFS[1], REFS[3])
    nocaps = read_captions(files["nocaps"], images / "nocaps", domains=True)
    assert [it.group for it in nocaps] == DOMAINS and nocaps[1].image == images / "nocaps" / "b.jpg"
    vqa = read_vqa(files["questions"], files["answers"], images)
    assert [it.key for it in vqa] == list(range(100, 107)) and vqa[5].image == images / _coco_name(IDS[0])
    assert vqa[0].question == QUESTIONS[0] and len(vqa[0].references) == 10 and vqa[0].group == "other"
    gqa = read_gqa(files["gqa"], images / "gqa")
    assert [(it.key, it.image.name, it.question, it.references) for it in gqa] == [
        (qid, f"{img}.jpg", q, (a,)) for qid, (img, q, a) in GQA.items()]
    lavis_gqa = _save(world[3] / "gqa_lavis.json", [{"question_id": qid, "image": f"{img}.jpg", "question": q,
                                                      "answer": a} for qid, (img, q, a) in GQA.items()])
    assert read_gqa(lavis_gqa, images / "gqa") == gqa


# ---- scores -------------------------------------------------------------------------------------
def _coco_caption(hyps: dict, refs: dict) -> tuple[float, float]:
    """BLEU-4 and CIDEr of coco-caption's own scorers on the tokenised texts."""
    h = {k: [coco_tokenize(v)] for k, v in hyps.items()}
    r = {k: [coco_tokenize(x) for x in v] for k, v in refs.items()}
    return Bleu(4).compute_score(r, h, verbose=0)[0][3], Cider().compute_score(r, h)[0]


def test_caption_scores_equal_pycocoevalcap_overall_and_per_domain():
    refs = {k: [REFS[k], REFS[(k + 2) % 5], "A dog, and a Cat!"] for k in range(5)}
    hyps = {0: "a cat sitting on a couch.", 1: "Two dogs in the snow", 2: "a man on a bike", 3: "a wooden table",
            4: "a cat on a table"}
    items = [Item(k, Path(f"{k}.jpg"), tuple(refs[k]), group=DOMAINS[k]) for k in range(5)]
    scores = score_nocaps(items, hyps)
    b4, cider = _coco_caption(hyps, refs)
    assert scores["cider"] == pytest.approx(100 * cider, rel=1e-12)
    assert scores["bleu4"] == pytest.approx(100 * b4, rel=1e-12)
    for domain in ("in-domain", "near-domain", "out-domain"):
        keys = [k for k in range(5) if DOMAINS[k] == domain]
        subset = _coco_caption({k: hyps[k] for k in keys}, {k: refs[k] for k in keys})[1]
        assert scores[f"cider_{domain}"] == pytest.approx(100 * subset, rel=1e-12)
    assert TASKS["coco"].score(items, hyps) == {"bleu4": pytest.approx(100 * b4), "cider": pytest.approx(100 * cider)}
    assert cider > 0.5


def test_vqa_and_gqa_scores_by_hand():
    answers = [("Yes", ["yes"] * 10, "yes/no"), ("two", ["2"] * 10, "number"),
               ("red", ["red"] * 2 + ["dark red"] * 8, "other")]
    items = [Item(n, Path("x.jpg"), tuple(gts), "q?", kind) for n, (_, gts, kind) in enumerate(answers)]
    scores = score_vqa(items, {n: pred for n, (pred, _, _) in enumerate(answers)})
    # official: identical answers are not normalised, so "two" misses "2"; "red": 2 humans x 1/3 + 8 x 2/3
    red = (2 * (1 / 3) + 8 * (2 / 3)) / 10
    assert scores["accuracy"] == pytest.approx(100 * (1 + 0 + red) / 3)
    assert scores["accuracy_per_answer_type"] == {"yes/no": pytest.approx(100), "number": 0.0,
                                                  "other": pytest.approx(100 * red)}
    # LAVIS (the paper's numbers): the prediction is always normalised, "two" -> "2" hits
    assert scores["accuracy_lavis"] == pytest.approx(100 * (1 + 1 + red) / 3)
    gqa = [Item(str(n), Path("x.jpg"), (gt,), "q?") for n, gt in enumerate(["table", "2", "right"])]
    assert score_gqa(gqa, {"0": "The table.", "1": "two", "2": "left"})["accuracy"] == pytest.approx(200 / 3)


# ---- end to end ---------------------------------------------------------------------------------
def _expected_captions(world, keys: list[int], batch: int, **gen) -> list[str]:
    model_dir, images, _, _ = world
    model, processor = Blip2OPT.from_pretrained(model_dir), Blip2ImageProcessor.from_folder(model_dir)
    out = []
    for start in range(0, len(keys), batch):
        pixels = processor([load_rgb(images / _coco_name(i)) for i in keys[start:start + batch]])
        out += model.generate(pixels, **gen)
    return out


def test_coco_writes_the_official_results_with_the_papers_settings(world, tmp_path, capsys):
    assert evaluate_blip2.main(_args(world, "coco", tmp_path, "--batch_size", "3")) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    expected = _expected_captions(world, IDS, 3, prompt="a photo of", num_beams=5, max_new_tokens=30, min_new_tokens=8)
    assert results == [{"image_id": i, "caption": c} for i, c in zip(IDS, expected)]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    refs = {it.key: it.references for it in read_captions(world[2]["lavis"], world[1])}
    b4, cider = _coco_caption({r["image_id"]: r["caption"] for r in results}, refs)
    assert metrics["scores"] == {"bleu4": pytest.approx(100 * b4), "cider": pytest.approx(100 * cider)}
    assert "METEOR and SPICE" in metrics["left_out"] and "coco (5 items): bleu4" in capsys.readouterr().out


def test_gqa_and_nocaps_result_formats(world, tmp_path):
    assert evaluate_blip2.main(_args(world, "gqa", tmp_path / "gqa", "--max_new_tokens", "3")) == 0
    results = json.loads((tmp_path / "gqa" / "results.json").read_text())
    assert [r["questionId"] for r in results] == list(GQA)
    assert all(isinstance(r["prediction"], str) for r in results)
    assert evaluate_blip2.main(_args(world, "nocaps", tmp_path / "nc", "--num_beams", "2", "--max_new_tokens", "9")) == 0
    scores = json.loads((tmp_path / "nc" / "metrics.json").read_text())["scores"]
    assert set(scores) == {"cider", "cider_in-domain", "cider_near-domain", "cider_out-domain", "bleu4"}
    assert [r["image_id"] for r in json.loads((tmp_path / "nc" / "results.json").read_text())] == list(range(5))


def test_a_crashed_run_resumes_without_recomputing(world, tmp_path, monkeypatch):
    args = lambda out: _args(world, "vqav2", out, "--batch_size", "2")  # noqa: E731  7 questions: 4 batches
    whole = CountingGenerate(monkeypatch)
    assert evaluate_blip2.main(args(tmp_path / "whole")) == 0
    assert (whole.calls, whole.images) == (4, 7)

    crashing = CountingGenerate(monkeypatch, crash_at=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_blip2.main(args(tmp_path / "run"))
    partial = tmp_path / "run" / evaluate_blip2.PARTIAL
    assert len(partial.read_text().splitlines()) == 1 + 4 and crashing.images == 4
    with open(partial, "a") as f:
        f.write('{"key": 104, "out')  # a torn last line, as a crash mid-write leaves it

    resumed = CountingGenerate(monkeypatch)
    assert evaluate_blip2.main(args(tmp_path / "run")) == 0
    assert (resumed.calls, resumed.images) == (2, 3)  # only the 3 questions not done
    final = json.loads((tmp_path / "run" / "results.json").read_text())
    assert final == json.loads((tmp_path / "whole" / "results.json").read_text())
    assert [r["question_id"] for r in final] == list(range(100, 107))
    assert all(isinstance(r["answer"], str) for r in final)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["generation"] == {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1,
                                     "length_penalty": -1.0}
    assert metrics["prompt"] == "Question: {} Short answer:"

    again = CountingGenerate(monkeypatch)  # complete: scored again without loading the model
    assert evaluate_blip2.main(args(tmp_path / "run")) == 0 and again.calls == 0


def test_a_partial_file_of_another_run_is_refused(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert evaluate_blip2.main(_args(world, "gqa", out, "--max_new_tokens", "2")) == 0
    capsys.readouterr()
    counting = CountingGenerate(monkeypatch)
    assert evaluate_blip2.main(_args(world, "gqa", out, "--max_new_tokens", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / evaluate_blip2.PARTIAL) in err
    assert "generation.max_new_tokens: 3 now, 2 in the file" in err and "--overwrite" in err

    other = shutil.copytree(world[0], tmp_path / "other-model")
    (other / "generation_config.json").write_text((other / "generation_config.json").read_text() + "\n")
    argv = _args(world, "gqa", out, "--max_new_tokens", "2")
    argv[argv.index("--model") + 1] = str(other)
    assert evaluate_blip2.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.sha256" in err and "generation." not in err and counting.calls == 0
    assert evaluate_blip2.main([*argv, "--overwrite"]) == 0 and counting.calls == 1


# ---- bad input ----------------------------------------------------------------------------------
def _drop(obj, path: list, key: str):
    target = obj
    for step in path:
        target = target[step]
    del target[key]
    return obj


@pytest.mark.parametrize("task, name, path, key, where", [
    ("coco", "lavis", [2], "caption", "entry 2"),
    ("coco", "gt", ["annotations", 4], "image_id", "annotations[4]"),
    ("nocaps", "nocaps", ["images", 3], "domain", "images[3]"),
    ("vqav2", "questions", ["questions", 1], "image_id", "questions[1]"),
    ("vqav2", "answers", ["annotations", 6, "answers", 9], "answer", "annotations[6].answers[9]"),
    ("gqa", "gqa", ["202"], "imageId", "question '202'"),
])
def test_an_annotation_file_with_a_missing_field_is_one_line(world, tmp_path, capsys, task, name, path, key, where):
    files = world[2]
    broken = _save(tmp_path / files[name].name, _drop(json.loads(files[name].read_text()), path, key))
    argv = _args(world, task, tmp_path / "out")
    flag = "--questions" if name == "questions" else "--annotations"
    argv[argv.index(flag) + 1] = str(broken)
    assert evaluate_blip2.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"evaluate_blip2.py: error: {broken}: {where}: missing key {key!r}"


def test_a_missing_image_is_named_before_any_work(world, tmp_path, capsys):
    images = shutil.copytree(world[1] / "gqa", tmp_path / "gqa")
    (images / "n2.jpg").unlink()
    argv = _args(world, "gqa", tmp_path / "out")
    argv[argv.index("--images") + 1] = str(images)
    assert evaluate_blip2.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"evaluate_blip2.py: error: {images / 'n2.jpg'}: image file not found (1 of 2 images missing, "
                   f"listed in {world[2]['gqa']})")
    assert not (tmp_path / "out").exists()
