"""Decoding rules over a ``DecodingSession``: greedy, multinomial sampling and beam search.

The rules follow transformers 5's ``generate`` exactly (tests compare token ids), reusing its
logits processors but the minimum-length one (``MinNewTokens``, ours: in place); the loops over our
own KV cache are ours. Notation: B images, k rows per image
(beams or returned samples), N = B * k rows, P prefix ids seen by the processors, V vocabulary.

Beam search (transformers' vectorised form): each step keeps the K = max(2, 1 + #eos) * beams best
continuations over all beams; those ending in eos (or at the length limit) among the top ``beams``
become finished hypotheses scored ``sum log p / new_len ** length_penalty``; the best unfinished
``beams`` continue. ``early_stopping``: True stops once every image has ``beams`` finished
hypotheses; False stops when the best running score, penalised at its current length, cannot beat
the worst finished one; "never" uses the longest possible length for that bound when
``length_penalty > 0``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

NEG = -1.0e9  # transformers' "impossible" score offset
IGNORED_FIELDS = {"transformers_version", "_from_model_config", "bos_token_id"}


class Session(Protocol):
    """What the decoding rules need from a model: see ``blip2.modules.opt.DecodingSession``.
    ``prefill`` and ``step`` return new logits [N, V] each call, which the rules may change in place
    (``MinNewTokens``); ``expand`` repeats each row for its input's beams or samples; ``select``
    reorders rows within each input (the beam step)."""

    def prefill(self) -> torch.Tensor: ...
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def expand(self, rows_per_input: int) -> None: ...
    def select(self, index: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options, named as in transformers' ``GenerationConfig`` (lengths in new tokens)."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    use_cache: bool = True

    @classmethod
    def build(cls, generation_config: Any = None, defaults: Mapping[str, Any] | None = None,
              **options: Any) -> "GenerationSettings":
        """Merge, lowest priority first: ``defaults``, a ``GenerationConfig``, keyword options."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(defaults or {})
        if generation_config is not None:
            values.update(supported_fields(generation_config.to_diff_dict(), "GenerationConfig"))
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; supported: {sorted(names)}")
        values.update({k: v for k, v in options.items() if v is not None})
        return cls(**_coerce(values)).validated()

    def validated(self) -> "GenerationSettings":
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("max_new_tokens, num_beams and num_return_sequences must be >= 1")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError("num_return_sequences > 1 needs beam search (num_beams > 1) or do_sample=True")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) > num_beams ({self.num_beams})")
        return self

    @property
    def rows_per_input(self) -> int:
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences


def supported_fields(given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``GenerationSettings`` fields set in a ``GenerationConfig``'s fields (``given``), without
    its metadata (``IGNORED_FIELDS``); any other field that is set raises, naming ``where``."""
    names = {f.name for f in dataclasses.fields(GenerationSettings)}
    bad = sorted(k for k, v in given.items() if k not in names | IGNORED_FIELDS and v not in (None, False))
    if bad:
        raise ValueError(f"{where}: unsupported option(s) {bad}; supported: {sorted(names)}")
    return {k: v for k, v in given.items() if k in names and v is not None}


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    eos = values.get("eos_token_id", ())
    values["eos_token_id"] = (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
    stop = values.get("early_stopping", False)
    values["early_stopping"] = stop if stop == "never" else bool(stop)
    return values


class MinNewTokens(LogitsProcessor):
    """transformers' ``MinNewTokensLengthLogitsProcessor`` without its two full-vocabulary passes per
    step (an ``isin`` over the vocabulary, a clone and a ``where`` of the scores): while fewer than
    ``min_new`` tokens follow the ``prefix_len`` ids, the eos scores are set to -inf in place."""

    def __init__(self, prefix_len: int, min_new: int, eos: torch.Tensor):
        self.prefix_len, self.min_new, self.eos = prefix_len, min_new, eos
        self._in_vocab: dict[int, torch.Tensor] = {}  # eos ids below each vocabulary size seen

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prefix_len < self.min_new:
            vocab = scores.shape[-1]
            if vocab not in self._in_vocab:  # as transformers' isin over the vocabulary: others ignored
                self._in_vocab[vocab] = self.eos[(self.eos >= 0) & (self.eos < vocab)]
            scores[:, self._in_vocab[vocab]] = -math.inf
        return scores


def logits_processors(s: GenerationSettings, prefix_len: int, device: torch.device) -> LogitsProcessorList:
    """transformers' processors, in its order. (Its repetition penalty skips the attention mask's
    leading padding; our sequences start with the always-attended queries, so there is none.)"""
    eos = torch.tensor(s.eos_token_id, device=device)
    procs = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(s.repetition_penalty)))
    if s.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
    if s.min_new_tokens > 0 and len(s.eos_token_id) > 0:
        procs.append(MinNewTokens(prefix_len, s.min_new_tokens, eos))
    if s.do_sample:
        keep = len(s.eos_token_id) + 1 if s.num_beams > 1 else 1
        if s.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(s.temperature)))
        if s.top_k != 0:
            procs.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=keep))
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=float(s.top_p), min_tokens_to_keep=keep))
    return procs


def decode(session: Session, history: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    """Generate from the session's prefix. ``history`` [B, P]: the ids the processors see before the
    new tokens (may be empty). Returns the new tokens [B * num_return_sequences, L], padded with
    ``pad_token_id`` after eos."""
    batch = history.shape[0]
    logits = session.prefill()  # (B, V)
    session.expand(s.rows_per_input)
    logits, history = logits.repeat_interleave(s.rows_per_input, 0), history.repeat_interleave(s.rows_per_input, 0)
    procs = logits_processors(s, history.shape[1], history.device)
    if s.num_beams > 1:
        return beam_search(session, logits, history, s, procs, batch)
    return sample(session, logits, history, s, procs)


def _pad_id(s: GenerationSettings) -> int:
    return s.pad_token_id if s.pad_token_id is not None else s.eos_token_id[0]


def sample(session: Session, logits: torch.Tensor, history: torch.Tensor, s: GenerationSettings,
           procs: LogitsProcessorList) -> torch.Tensor:
    """Greedy (argmax) or multinomial sampling; finished rows are fed the pad token."""
    eos = torch.tensor(s.eos_token_id, dtype=torch.long, device=history.device)
    prefix_len, unfinished = history.shape[1], torch.ones(history.shape[0], dtype=torch.bool, device=history.device)
    for step in range(s.max_new_tokens):
        scores = procs(history, logits)  # (N, V)
        if s.do_sample:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if len(s.eos_token_id) > 0:
            tokens = torch.where(unfinished, tokens, _pad_id(s))
        history = torch.cat([history, tokens[:, None]], dim=1)  # (N, P + step + 1)
        unfinished &= ~torch.isin(tokens, eos)
        if not unfinished.any() or step + 1 == s.max_new_tokens:
            break
        logits = session.step(tokens)
    return history[:, prefix_len:]


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [B, k] of ``t`` [B, n, ...] -> [B, k, ...]."""
    index = index.reshape(*index.shape, *([1] * (t.dim() - 2)))
    return torch.take_along_dim(t, index, dim=1)


@dataclass
class _Beams:
    """Beam-search state for B inputs: ``running`` hypotheses and the best ``finished`` ones."""

    running: torch.Tensor  # (B, beams, P + max_new) ids, unfilled slots hold the fill value
    running_scores: torch.Tensor  # (B, beams) summed log-probs
    finished: torch.Tensor  # (B, beams, P + max_new)
    finished_scores: torch.Tensor  # (B, beams) length-penalised scores
    finished_lens: torch.Tensor  # (B, beams) new tokens of each finished slot
    is_finished: torch.Tensor  # (B, beams) bool
    improvable: torch.Tensor  # (B, 1) bool: can a running beam still beat the finished ones


def _init_beams(history: torch.Tensor, s: GenerationSettings, batch: int) -> _Beams:
    prefix_len, beams = history.shape[1], s.num_beams
    fill = (s.pad_token_id or s.eos_token_id[0]) if s.eos_token_id else -1
    running = history.new_full((batch, beams, prefix_len + s.max_new_tokens), fill)
    running[:, :, :prefix_len] = history.view(batch, beams, prefix_len)
    scores = torch.zeros(batch, beams, device=history.device)
    scores[:, 1:] = NEG  # only the first beam's continuations count at step one
    return _Beams(
        running=running, running_scores=scores, finished=running.clone(),
        finished_scores=torch.full_like(scores, NEG), finished_lens=torch.zeros_like(running[..., 0]),
        is_finished=torch.zeros_like(scores, dtype=torch.bool),
        improvable=torch.ones(batch, 1, dtype=torch.bool, device=history.device),
    )


def top_k(x: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1)`` (values, indices, best first) for a long last dimension (the
    vocabulary). On a CPU torch's topk is a selection over every entry (2.9 ms for 40 rows of 50k
    words on 2 cores); here one max per block of ``block`` entries picks the k blocks with the best
    maxima, and the k best entries are among those blocks and the leftover tail (each of them lies in
    a block whose maximum is at least the k-th best value, and at most k blocks have such a
    maximum, ties at the k-th value aside), so a max pass and a topk over k * block candidates do it
    (0.7 ms). The values are torch.topk's; where entries tie at the k-th value the indices kept may
    differ."""
    *lead, vocab = x.shape
    if x.device.type != "cpu" or vocab < 4 * k * block or x.numel() == 0:
        return torch.topk(x, k, dim=-1)
    rows, whole = x.reshape(-1, vocab), vocab - vocab % block
    blocks = rows[:, :whole].view(rows.shape[0], -1, block)  # (n, nb, block)
    best = torch.topk(blocks.amax(dim=-1), k, dim=-1)[1]  # (n, k) the blocks to search
    cand = torch.cat([blocks.gather(1, best[..., None].expand(-1, -1, block)).flatten(1), rows[:, whole:]], 1)
    values, pos = torch.topk(cand, k, dim=-1)  # (n, k) positions among the candidates
    in_block = pos < k * block
    index = torch.where(in_block, best.gather(1, (pos // block).clamp_max(k - 1)) * block + pos % block,
                        whole + pos - k * block)
    return values.view(*lead, k), index.view(*lead, k)


def _top_continuations(log_probs: torch.Tensor, running_scores: torch.Tensor, width: int,
                       do_sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``width`` best (or sampled) continuations of each input's beams, from their next-token
    log-probs [B, beams, V] plus each beam's running score [B, beams]: (scores, source beam, token),
    each [B, K], best first. Without sampling each beam's ``width`` best tokens are taken first (the
    best ``width`` of all continuations are among them) and the running scores added to those alone."""
    batch, beams, vocab = log_probs.shape
    if do_sample:
        flat = (log_probs + running_scores[..., None]).view(batch, -1)
        index = torch.multinomial(F.softmax(flat, dim=-1), num_samples=width)
        scores, order = torch.gather(flat, 1, index).sort(dim=-1, descending=True)
        index = index.gather(1, order)
        return scores, index // vocab, index % vocab
    top, token = top_k(log_probs, min(width, vocab))  # (B, beams, k)
    scores, index = torch.topk((top + running_scores[..., None]).view(batch, -1), k=width)
    return scores, index // top.shape[-1], token.view(batch, -1).gather(1, index)


def _update_finished(b: _Beams, cand: torch.Tensor, cand_scores: torch.Tensor, just_finished: torch.Tensor,
                     new_len: int, s: GenerationSettings) -> None:
    """Merge the candidates that just finished into the best ``beams`` finished hypotheses."""
    scores = cand_scores / (new_len ** s.length_penalty)
    scores += (b.is_finished.all(dim=-1, keepdim=True) & (s.early_stopping is True)).to(torch.float32) * NEG
    scores += (~b.improvable).to(torch.float32) * NEG
    scores += (~just_finished) * NEG
    merged_scores = torch.cat([b.finished_scores, scores], dim=1)
    keep = torch.topk(merged_scores, k=s.num_beams)[1]
    b.finished = _gather(torch.cat([b.finished, cand], dim=1), keep)
    b.finished_scores = _gather(merged_scores, keep)
    b.finished_lens = _gather(torch.cat([b.finished_lens, torch.full_like(cand[..., 0], new_len)], dim=1), keep)
    b.is_finished = _gather(torch.cat([b.is_finished, just_finished], dim=1), keep)


def _still_improvable(b: _Beams, new_len: int, max_new: int, s: GenerationSettings) -> torch.Tensor:
    """Can the best running beam, at its best reachable length, beat the worst finished one? [B, 1]."""
    best_len = max_new if (s.early_stopping == "never" and s.length_penalty > 0.0) else new_len
    best_running = b.running_scores[:, :1] / (best_len ** s.length_penalty)
    worst_finished = torch.where(b.is_finished, b.finished_scores.min(dim=1, keepdim=True)[0], NEG)
    return b.improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)


def beam_search(session: Session, logits: torch.Tensor, history: torch.Tensor, s: GenerationSettings,
                procs: LogitsProcessorList, batch: int) -> torch.Tensor:
    """Beam search over N = B * beams rows; returns [B * num_return_sequences, L] new tokens."""
    beams, prefix_len, vocab = s.num_beams, history.shape[1], logits.shape[-1]
    eos = torch.tensor(s.eos_token_id, dtype=torch.long, device=history.device)
    width = max(2, 1 + len(s.eos_token_id)) * beams
    in_top = torch.arange(width, device=history.device) < beams  # (K,) candidates that may finish
    row_offset = torch.arange(batch, device=history.device)[:, None] * beams
    b = _init_beams(history, s, batch)
    for step in range(s.max_new_tokens):
        cur = prefix_len + step
        log_probs = procs(b.running[:, :, :cur].flatten(0, 1), F.log_softmax(logits, dim=-1))  # (N, V)
        cand_scores, source, tokens = _top_continuations(log_probs.view(batch, beams, vocab), b.running_scores,
                                                         width, s.do_sample)  # (B, K) each
        cand = _gather(b.running, source)  # (B, K, P + max_new)
        cand[:, :, cur] = tokens
        stops = torch.isin(tokens, eos) | (step + 1 == s.max_new_tokens)  # (B, K)
        alive_scores = cand_scores + stops.to(torch.float32) * NEG
        keep = torch.topk(alive_scores, k=beams)[1]  # (B, beams)
        b.running, b.running_scores = _gather(cand, keep), _gather(alive_scores, keep)
        _update_finished(b, cand, cand_scores, stops & in_top, step + 1, s)
        b.improvable = _still_improvable(b, step + 1, s.max_new_tokens, s)
        all_full = bool(b.is_finished.all()) and s.early_stopping is True
        if not b.improvable.any() or all_full or bool(stops.all()):
            break
        session.select((_gather(source, keep) + row_offset).flatten())
        logits = session.step(b.running[:, :, cur].flatten())
    best = b.finished[:, : s.num_return_sequences].flatten(0, 1)  # (B * R, P + max_new)
    length = int(b.finished_lens[:, : s.num_return_sequences].max())
    return best[:, prefix_len: prefix_len + length]
