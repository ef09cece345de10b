"""BLEU / CIDEr-D against coco-caption's own scorers (pycocoevalcap, pure Python: no Java needed for
them), the caption tokeniser against outputs of coco-caption's Java PTB tokenizer, and VQA accuracy
against hand-computed values of the official formula."""
import math
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from blip2.metrics import bleu, caption_scores, cider_d, coco_tokenize, normalize_answer, vqa_accuracy

WORDS = "a an the dog cat man woman on in of with red blue sitting table street two people riding bike".split()


def random_corpus(seed: int):
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))  # noqa: E731
    n = rng.randint(2, 25)
    hyps = {i: sentence() for i in range(n)}
    refs = {i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(n)}
    for i in range(0, n, 3):  # some captions close to their references
        hyps[i] = refs[i][0] + " " + rng.choice(WORDS)
    return hyps, refs


@pytest.mark.parametrize("seed", range(6))
def test_bleu_and_cider_equal_coco_caption(seed):
    hyps, refs = random_corpus(seed)
    ref_bleu, _ = Bleu(4).compute_score(refs, {k: [v] for k, v in hyps.items()}, verbose=0)
    ref_cider, ref_each = Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
    ours_cider, ours_each = cider_d(hyps, refs)
    assert bleu(hyps, refs) == pytest.approx(ref_bleu, rel=1e-12, abs=1e-15)
    assert ours_cider == pytest.approx(ref_cider, rel=1e-12)
    assert [ours_each[k] for k in sorted(hyps)] == pytest.approx(list(ref_each), rel=1e-12, abs=1e-12)
    assert ours_cider > 0


def test_bleu_by_hand():
    refs = {0: ["the cat is on the mat"]}
    b1, b2, b3, b4 = bleu({0: "the cat sat on the mat"}, refs)
    # matches / totals: 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3; equal lengths, BP = 1
    assert (b1, b2, b3) == pytest.approx((5 / 6, math.sqrt(0.5), 0.5), rel=1e-9)
    assert b4 < 1e-3
    # a short caption: p1 = p2 = 1, BP = exp(1 - 6/2)
    assert bleu({0: "the cat"}, refs, n=2)[1] == pytest.approx(math.exp(-2), rel=1e-8)  # up to the 1e-9 smoothing
    # the closest reference length sets BP, the shorter one on a tie: 4 words against 3 and 5 -> 3,
    # so BP = 1 (5 would give exp(1 - 5/4)); every word matches the longer reference
    assert bleu({0: "x y z w"}, {0: ["x y z", "x y z w v"]}, n=1)[0] == pytest.approx(1.0, rel=1e-8)
    assert bleu({0: "x y z w"}, {0: ["x y z w v u"]}, n=1)[0] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-8)


def test_cider_by_hand():
    refs = {0: ["a b c d"], 1: ["e f g h"]}
    score, each = cider_d({0: "a b c d", 1: "e f g h"}, refs)
    assert score == pytest.approx(10.0) and each == {0: pytest.approx(10.0), 1: pytest.approx(10.0)}
    assert cider_d({0: "e f g h", 1: "a b c d"}, refs)[0] == 0.0  # every n-gram belongs to the other image


@pytest.mark.parametrize("raw, tokens", [
    # outputs of coco-caption's stanford-corenlp-3.4.1 PTBTokenizer -preserveLines -lowerCase,
    # punctuation tokens then dropped as coco-caption does
    ("A man's dog, running (fast) on the beach.", "a man 's dog running -lrb- fast -rrb- on the beach"),
    ('Two dogs don\'t like "the" cat!', "two dogs do n't like the cat"),
    ("a black-and-white photo of Mr. Smith's 3.5 cars; really?",
     "a black-and-white photo of mr. smith 's 3.5 cars really"),
    ("People at a bar/restaurant... eating 50% off pizza -- yum",
     "people at a bar/restaurant eating 50 % off pizza yum"),
    ("it's a kids' toy: ok & fine {yes} [no] 1,000 people",
     "it 's a kids toy ok & fine -lcb- yes -rcb- -lsb- no -rsb- 1,000 people"),
    ("The boy's can't won't they're we've I'll you'd I'm",
     "the boy 's ca n't wo n't they 're we 've i 'll you 'd i 'm"),
    ("a u.s. flag at 5:30 p.m. on a pole e-mail", "a u.s. flag at 5:30 p.m. on a pole e-mail"),
    ("a 'quoted' word and an x-ray of a t-shirt, etc.", "a quoted word and an x-ray of a t-shirt etc."),
    ("He said:yes hello--world cannot gonna o'clock", "he said yes hello world can not gon na o'clock"),
    ('a sign that reads "STOP" on a 10-year-old pole.', "a sign that reads stop on a 10-year-old pole"),
])
def test_tokenizer_matches_ptb(raw, tokens):
    assert coco_tokenize(raw) == tokens


def test_caption_scores_tokenize_raw_text():
    scores = caption_scores({1: "A dog, running on the beach."}, {1: ["a dog running on the beach", "a dog"]})
    same = bleu({1: "a dog running on the beach"}, {1: ["a dog running on the beach", "a dog"]})[3]
    assert scores["bleu4"] == pytest.approx(same) and scores["bleu4"] > 0.99


def test_metrics_reject_mismatched_sets():
    with pytest.raises(ValueError, match="same images"):
        bleu({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="no reference"):
        cider_d({1: "a"}, {1: []})


def test_vqa_accuracy_by_hand():
    ten = ["2"] * 3 + ["3"] * 7
    # "two" -> "2": left-out "2" answers see 2 matches (2/3), left-out "3" answers see 3 (1)
    assert vqa_accuracy("two", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("3", ten) == pytest.approx(1.0)
    assert vqa_accuracy("four", ten) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    # the official script normalises only when the human answers differ
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("2", ["2"] * 10) == 1.0


def test_vqa_normalisation():
    assert normalize_answer("A red one.") == "red 1"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("hed've") == "he'd've" and normalize_answer("im") == "im"  # 'Im' is capitalised
    assert normalize_answer("1,000") == "1000"  # digits around a comma: punctuation removed, no space
    assert normalize_answer("yes/no") == "yes no" and normalize_answer("3.5") == "3.5"
    assert vqa_accuracy("don't know", ["dont know"] * 4 + ["no"] * 6) == 1.0
