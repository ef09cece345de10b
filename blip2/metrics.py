"""Caption and VQA metrics, with the numbers of the coco-caption toolkit and of the VQA API.

Captions (coco-caption, used for BLIP-2's COCO and NoCaps results, arXiv 2301.12597 Table 3):
1. ``coco_tokenize``: what coco-caption's Java ``PTBTokenizer -lowerCase`` followed by its
   punctuation filter gives, in Python (no Java): contractions split (``don't`` -> ``do n't``),
   punctuation split off and dropped, brackets kept as ``-lrb-`` / ``-rrb-`` ... (coco-caption's
   filter lists them upper-case, so the lower-cased ones survive), decimals, times, thousands,
   hyphenated words and dotted abbreviations kept whole.
2. ``bleu``: corpus BLEU-1..4 (Papineni et al. 2002) as coco-caption: clipped n-gram matches over
   the corpus, the "closest" reference length per caption, p_n = (matches + 1e-15) / (total + 1e-9),
   BLEU-n = (p_1 ... p_n)^(1/n) * BP with BP = exp(1 - r / c) when c < r.
3. ``cider_d``: CIDEr-D (Vedantam et al. 2015) as coco-caption's ``Cider``: tf-idf vectors of
   1..4-grams with document frequencies over the reference sets of the evaluated images, clipped
   similarity min(g_c, g_r) * g_r / (|g_c| |g_r|), length penalty exp(-(l_c - l_r)^2 / (2 * 6^2))
   where l counts bigrams (coco-caption's code), mean over n and over the references, times 10.

VQA (Antol et al. 2015, the official ``vqaEval.py``): an answer's accuracy is
min(#humans who gave it / 3, 1) averaged over the 10 subsets of 9 of the 10 human answers, after
the official normalisation (punctuation, number words -> digits, articles dropped, contractions
restored), which the official script applies only when the human answers are not all identical.
``lavis_vqa_accuracy`` is the variant of LAVIS's ``VQAEval`` (and BLIP's), which BLIP-2's VQAv2 and
OK-VQA numbers come from: the prediction is always normalised, the human answers only have their
punctuation processed, and only when they differ. GQA (LAVIS's ``GQATask``): exact match of the
normalised prediction and the normalised answer.

Split scores (``domain_scores``, NoCaps' in-, near- and out-of-domain CIDEr): each subset is scored
on its own, as coco-caption scores the images it is given, so CIDEr's document frequencies come from
that subset's references.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Mapping, Sequence

# ---- coco-caption tokenisation ------------------------------------------------------------------
BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- ", "[": " -lsb- ", "]": " -rsb- "}
# coco-caption's PUNCTUATIONS, plus the plain quote characters that PTB turns into `` and ''
DROPPED = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
TOKEN = re.compile(
    r"\.\.\.|--"                                  # ellipsis, dash
    r"|-[lr][rcs]b-"                              # bracket names
    r"|(?:[a-z]\.){2,}|(?:mr|mrs|ms|dr|st|jr|sr|mt|prof|etc|vs|inc|ltd)\."  # abbreviations
    r"|\d+(?:[.,:]\d+)+"                          # 3.5, 1,000, 5:30
    r"|[!?]{2,}"                                  # !!! and ??? stay (not in coco-caption's list)
    r"|'(?:s|re|ve|ll|d|m)(?![a-z])|n't"          # split contractions
    r"|[a-z0-9]+(?:[-/&'][a-z0-9]+)*"             # words, black-and-white, bar/restaurant
    r"|\S"                                        # any other character alone
)
CONTRACTION = re.compile(r"(?<=[a-z])(n't|'s|'re|'ve|'ll|'d|'m)(?![a-z])")
SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b|\b(lem|gim)(me)\b")


def coco_tokenize(text: str) -> str:
    """A caption as coco-caption scores it: lower-case PTB tokens without punctuation, space-joined."""
    text = CONTRACTION.sub(r" \1", text.lower().replace("\n", " "))
    text = SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)  # cannot -> can not
    for bracket, name in BRACKETS.items():
        text = text.replace(bracket, name)
    return " ".join(t for t in TOKEN.findall(text) if t not in DROPPED)


# ---- BLEU ---------------------------------------------------------------------------------------
def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams of one length n."""
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]]) -> None:
    if set(hyps) != set(refs):
        raise ValueError(f"captions and references must cover the same images: {len(set(hyps) ^ set(refs))} differ")
    if not hyps:
        raise ValueError("no captions to score")
    empty = [k for k, r in refs.items() if len(r) == 0]
    if empty:
        raise ValueError(f"image {empty[0]!r} has no reference captions")


def closest_length(length: int, ref_lengths: Sequence[int]) -> int:
    """The reference length closest to ``length`` (the shorter one on a tie)."""
    return min(ref_lengths, key=lambda r: (abs(r - length), r))


def bleu(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised captions (``hyps[k]``) against their references (``refs[k]``)."""
    _check(hyps, refs)
    matches, totals, hyp_len, ref_len = [0] * n, [0] * n, 0, 0
    for key, hyp in hyps.items():
        words, ref_words = hyp.split(), [r.split() for r in refs[key]]
        hyp_len += len(words)
        ref_len += closest_length(len(words), [len(r) for r in ref_words])
        for k in range(1, n + 1):
            counts, best = ngram_counts(words, k), Counter()
            for ref in ref_words:
                best |= ngram_counts(ref, k)  # element-wise max over the references
            matches[k - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[k - 1] += max(len(words) - k + 1, 0)
    ratio = (hyp_len + 1e-15) / (ref_len + 1e-9)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(n):
        product *= (matches[k] + 1e-15) / (totals[k] + 1e-9)
        scores.append(product ** (1 / (k + 1)) * brevity)
    return scores


# ---- CIDEr-D ------------------------------------------------------------------------------------
def all_ngrams(text: str, n: int = 4) -> Counter:
    """Counts of every 1..n-gram of a tokenised caption."""
    words, counts = text.split(), Counter()
    for k in range(1, n + 1):
        counts.update(ngram_counts(words, k))
    return counts


def tfidf(counts: Counter, df: Counter, log_images: float, n: int) -> tuple[list[dict], list[float], int]:
    """Per-order tf-idf vectors g_k, their norms, and the caption length (its bigram count)."""
    vectors, norms = [{} for _ in range(n)], [0.0] * n
    for gram, tf in counts.items():
        k = len(gram) - 1
        vectors[k][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
        norms[k] += vectors[k][gram] ** 2
    return vectors, [math.sqrt(x) for x in norms], sum(tf for g, tf in counts.items() if len(g) == 2)


def cider_similarity(hyp: tuple, ref: tuple, sigma: float) -> list[float]:
    """Clipped cosine similarity of each order, times the Gaussian length penalty."""
    (h_vec, h_norm, h_len), (r_vec, r_norm, r_len) = hyp, ref
    penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
    sims = []
    for k in range(len(h_vec)):
        value = sum(min(x, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, x in h_vec[k].items())
        if h_norm[k] != 0 and r_norm[k] != 0:
            value /= h_norm[k] * r_norm[k]
        sims.append(value * penalty)
    return sims


def cider_d(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of tokenised captions: (corpus mean, score of each image)."""
    _check(hyps, refs)
    ref_counts = {key: [all_ngrams(r, n) for r in rs] for key, rs in refs.items()}
    df = Counter(g for counts in ref_counts.values() for g in set().union(*counts))
    log_images = math.log(len(refs))
    scores = {}
    for key, hyp in hyps.items():
        h = tfidf(all_ngrams(hyp, n), df, log_images, n)
        sims = [cider_similarity(h, tfidf(c, df, log_images, n), sigma) for c in ref_counts[key]]
        scores[key] = 10.0 * sum(sum(s) / n for s in sims) / len(sims)
    return sum(scores.values()) / len(scores), scores


def caption_scores(captions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr (CIDEr-D) of raw generated captions against raw references, as coco-caption."""
    hyps = {k: coco_tokenize(c) for k, c in captions.items()}
    refs = {k: [coco_tokenize(r) for r in rs] for k, rs in references.items()}
    return {"bleu4": bleu(hyps, refs)[3], "cider": cider_d(hyps, refs)[0]}


# ---- VQA accuracy -------------------------------------------------------------------------------
VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# the official contractions table, generated: a form with one apostrophe is looked up without it
# (``dont`` -> ``don't``), a form with more is looked up with any one of them missing (``hed've``,
# ``he'dve`` -> ``he'd've``); keys keep the official capitals (``Im``), which lower-cased words never match
_ONE_APOSTROPHE = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll "
    "how's I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't "
    "shan't should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd "
    "something'll that's there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't "
    "what'll what're what's what've when's where'd where's where've who'd who'll who's who've why'll why're "
    "why's won't would've wouldn't y'all you'd you'll you're you've"
).split()
_MORE_APOSTROPHES = (
    "couldn't've hadn't've he'd've I'd've it'd've mightn't've 'ow's'at she'd've shouldn't've somebody'd've "
    "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've you'd've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {"somebody'd": "somebodyd"}  # sic, as in the official table
    table.update({form.replace("'", ""): form for form in _ONE_APOSTROPHE})
    for form in _MORE_APOSTROPHES:
        cuts = [i for i, c in enumerate(form) if c == "'"]
        table.update({form[:i] + form[i + 1:]: form for i in cuts})
    return table


CONTRACTIONS = _contraction_table()


def normalize_punctuation(text: str) -> str:
    """The official ``processPunctuation``."""
    out = text
    for p in VQA_PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def normalize_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: number words to digits, articles out, contractions in."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    return normalize_digits_articles(normalize_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one predicted answer against the human answers (10 in VQAv2)."""
    if not answers:
        raise ValueError("vqa_accuracy: expected at least one human answer")
    clean = lambda s: s.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    gts, pred = [clean(a) for a in answers], clean(prediction)
    if len(set(gts)) > 1:
        gts, pred = [normalize_answer(a) for a in gts], normalize_answer(pred)
    hits = [g.lower() == pred.lower() for g in gts]
    return sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / len(gts)


def lavis_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] as LAVIS's ``VQAEval`` computes it (see the module notes)."""
    if not answers:
        raise ValueError("lavis_vqa_accuracy: expected at least one human answer")
    pred = normalize_answer(prediction.replace("\n", " ").replace("\t", " ").strip())
    gts = [normalize_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    hits = [g == pred for g in gts]
    return sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / len(gts)


def gqa_accuracy(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer (LAVIS's GQA task), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def domain_scores(captions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                  domains: Mapping[Hashable, str]) -> dict[str, dict[str, float]]:
    """``caption_scores`` of every image together ("overall") and of each domain's images alone."""
    scores = {"overall": caption_scores(captions, references)}
    for domain in sorted(set(domains.values())):
        keys = [k for k in captions if domains[k] == domain]
        scores[domain] = caption_scores({k: captions[k] for k in keys}, {k: references[k] for k in keys})
    return scores
