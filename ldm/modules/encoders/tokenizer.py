"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, arXiv 2103.00020), offline.

The vocabulary is rebuilt at load time from the merge list ``bpe_simple_vocab_16e6.txt.gz``
(OpenAI CLIP / open_clip, MIT): ids 0-255 are the 256 byte symbols, 256-511 the same with the
end-of-word mark ``</w>``, then one id per merge (48,894), then ``<start_of_text>`` (49406)
and ``<end_of_text>`` (49407). The BPE itself runs in the ``tokenizers`` library. Text is
cleaned as open_clip does (ftfy, HTML unescape, whitespace collapse, lower case) and split into
contractions, letter runs, single digits and punctuation runs before BPE.
"""
from __future__ import annotations

import gzip
import html
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import ftfy
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<start_of_text>", "<end_of_text>"
WORD_SUFFIX = "</w>"
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list[str]:
    """The 256 printable characters standing for bytes, in vocabulary order (GPT-2's table).

    Printable Latin-1 bytes stand for themselves; the other 68 map to ``chr(256 + n)``.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = 256 - len(kept)
    return [chr(b) for b in kept] + [chr(256 + n) for n in range(moved)]


def read_merges(path: str | Path = VOCAB_PATH) -> list[tuple[str, str]]:
    """The first ``NUM_MERGES`` merge rules of the gzipped merge list (its line 0 is a header)."""
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except OSError as err:
        raise ValueError(f"{path}: not a readable gzipped BPE merge list ({err})") from None
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} merge lines of two symbols each")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id: byte symbols, byte symbols + ``</w>``, merge results, then bos and eos."""
    symbols = byte_symbols()
    tokens = symbols + [s + WORD_SUFFIX for s in symbols] + ["".join(m) for m in merges]
    return {token: i for i, token in enumerate(tokens + [BOS, EOS])}


@lru_cache(maxsize=None)
def _byte_level_bpe(path: str) -> Tokenizer:
    """A ``tokenizers`` BPE over pre-cleaned text; built once per vocabulary file."""
    merges = read_merges(path)
    bpe = Tokenizer(models.BPE(build_vocab(merges), merges, end_of_word_suffix=WORD_SUFFIX,
                               continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return bpe


def clean_text(text: str) -> str:
    """open_clip's ``lower`` cleaning: fix mojibake, unescape HTML twice, collapse spaces, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """Prompts -> ``[B, context_length]`` ids: bos, BPE tokens, eos, padded with eos (sd-v1)."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (bos and eos), got {context_length}")
        self.bpe = _byte_level_bpe(str(vocab_path))
        self.context_length = context_length
        self.bos_id = self.bpe.token_to_id(BOS)
        self.eos_id = self.bpe.token_to_id(EOS)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one prompt, without bos/eos and without truncation."""
        return self.bpe.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        wrong = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if wrong:
            raise ValueError(f"prompts must be strings; item {wrong[0]} is {type(texts[wrong[0]]).__name__}")
        ids = torch.full((len(texts), self.context_length), self.eos_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self._bos_eos(self.encode(text), text)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids  # [B, L]

    def _bos_eos(self, tokens: list[int], text: str) -> list[int]:
        """Wrap in bos/eos, keeping the first ``context_length - 2`` tokens of a long prompt."""
        room = self.context_length - 2
        if len(tokens) > room:
            warnings.warn(
                f"prompt truncated: {len(tokens)} tokens, CLIP keeps {room}, "
                f"dropped the last {len(tokens) - room}: {text[:40]!r}...",
                stacklevel=3,
            )
        return [self.bos_id, *tokens[:room], self.eos_id]
