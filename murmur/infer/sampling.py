"""Choosing the next token: per-request sampling parameters applied to a batch of logits at once.

Every row of a decode batch may belong to a different request with its own temperature, top-k,
top-p, min-p, repetition penalty and seed. Everything is vectorised over the batch; only the uniform
number behind each draw comes from the request's own generator, so a seeded request draws the same
numbers whether it runs alone or beside fifteen others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from murmur.errors import MurmurError

MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias, as OpenAI allows


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 and min_p 0 disable those filters.
    repetition_penalty > 1 discourages tokens already in the prompt or the output (CTRL's rule:
    positive logits divided by it, negative ones multiplied). max_tokens None means "until the
    context is full". stop strings end the output before the match; stop_token_ids add to the
    tokenizer's end-of-turn tokens unless ignore_eos is set. logprobs returns the chosen token's
    log-probability under the model and the top_logprobs most likely alternatives.

    OpenAI's penalties: presence_penalty is subtracted once from every token already generated,
    frequency_penalty once per time it was generated (the prompt does not count); logit_bias adds its
    value to a token id's logit (-100 bans it, 100 all but forces it). prompt_logprobs (None: off)
    returns each prompt token's log-probability and that many alternatives. grammar (a
    `murmur.infer.grammar.Grammar`) allows only tokens that keep the output inside it.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    prompt_logprobs: int | None = None
    grammar: Any = None  # a murmur.infer.grammar.Grammar (not imported here: the grammar library is optional)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        problems = []
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1] (got {self.min_p})")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if not 0 <= self.top_logprobs <= 20:
            problems.append(f"top_logprobs must be in [0, 20] (got {self.top_logprobs})")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            problems.append(f"prompt_logprobs must be in [0, 20] (got {self.prompt_logprobs})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2] (got {getattr(self, name)})")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            problems.append(f"logit_bias holds {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        if any(not -100 <= bias <= 100 for bias in self.logit_bias.values()):
            problems.append("logit_bias values must be in [-100, 100]")
        if any(token < 0 for token in self.logit_bias):
            problems.append("logit_bias keys must be token ids >= 0")
        if problems:
            raise MurmurError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether the output's own token counts change the logits (presence or frequency penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenChoice:
    """The token picked for one row, with its log-probability and the best alternatives (when asked)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _param_column(values: list[float], device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Penalise tokens marked in `seen` (B, V bool) by `penalty` (B, 1)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _sorted_descending(logits: Tensor) -> Tensor:
    """Each row's values in descending order (values only: the filters below need thresholds, not ids).

    On CPU numpy's values-only sort is 24x faster than torch.sort for vocabulary-sized rows (8 x 4096:
    56 us against 1.3 ms, docs/journal.md); a full torch.sort was a fifth of a batched decode step.
    """
    if logits.device.type != "cpu":
        return logits.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.ascontiguousarray(np.sort(logits.numpy(), axis=-1)[:, ::-1]))


def filter_logits(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Temperature, top-k, top-p and min-p for each row; filtered-out entries become -inf.

    top-k and top-p each keep a prefix of the row sorted by likelihood, so together they come down to
    one threshold per row: the least likely kept logit. Every token at or above it is kept, so tokens
    tied with the last one kept are all kept (rather than some, by an arbitrary sort order).
    """
    device = logits.device
    # Each skipped no-op saves a pass over a (batch x vocabulary) tensor on every decode step.
    temperatures = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    if any(t != 1.0 for t in temperatures):
        logits = logits / _param_column(temperatures, device)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        ordered = _sorted_descending(logits)
        vocab = logits.shape[-1]
        ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)[:, None]
        drop = torch.arange(vocab, device=device)[None] >= ks
        probs = (ordered.masked_fill(drop, float("-inf")) if any(0 < p.top_k < vocab for p in params)
                 else ordered).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        if any(p.top_p < 1 for p in params):
            drop |= probs.cumsum(-1) - probs >= _param_column([p.top_p for p in params], device)
        kept = (~drop).sum(-1, keepdim=True).clamp_min(1)
        logits = logits.masked_fill(logits < ordered.gather(-1, kept - 1), float("-inf"))
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * _param_column([p.min_p for p in params], device)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def draw(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """One sampled token id per row, by inverse CDF with one uniform from each row's own generator.

    Vectorised over the batch; each request consumes exactly one number of its generator per token,
    so a seeded request draws the same tokens alone or in any batch.
    """
    cdf = filter_logits(logits, params).softmax(-1).cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])[:, None]
    # The first token whose cdf exceeds u * total: the cdf rises there, so its probability is never zero.
    return (cdf <= u * cdf[:, -1:]).sum(-1).clamp_max(logits.shape[-1] - 1)


def apply_penalties(logits: Tensor, counts: Tensor, params: list[SamplingParams]) -> Tensor:
    """OpenAI's presence and frequency penalties from `counts` (B, V): how often each row generated each token."""
    device = logits.device
    counts = counts.to(logits.dtype)
    presence = _param_column([p.presence_penalty for p in params], device)
    frequency = _param_column([p.frequency_penalty for p in params], device)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_logit_bias(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """Each row's logit_bias added to its logits (one indexed add for the whole batch)."""
    rows, ids, values = [], [], []
    vocab = logits.shape[-1]
    for row, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if token < vocab:
                rows.append(row)
                ids.append(token)
                values.append(bias)
    if not rows:
        return logits
    logits = logits.clone()
    device = logits.device
    logits.index_put_((torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
                      torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)
    return logits


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           seen: Tensor | None = None, counts: Tensor | None = None, allowed: Tensor | None = None
           ) -> list[TokenChoice]:
    """One token per row of `logits` (B, V), each row by its own request's parameters.

    seen: (B, V) bool of tokens already in each request's context, for the repetition penalty; counts:
    (B, V) how often each row generated each token, for presence and frequency penalties; allowed: (B, V)
    bool of the tokens a row's grammar allows (every token in rows without one).
    Log-probabilities are those of the model's own distribution (before any penalty, bias, filter or
    grammar), as OpenAI reports.
    """
    logits = logits.float()
    want_logprobs = any(p.logprobs for p in params)
    raw_logprobs = logits.log_softmax(-1) if want_logprobs else None
    if seen is not None and any(p.repetition_penalty != 1 for p in params):
        logits = apply_repetition_penalty(logits, seen, _param_column([p.repetition_penalty for p in params],
                                                                      logits.device))
    if counts is not None and any(p.penalised for p in params):
        logits = apply_penalties(logits, counts, params)
    if any(p.logit_bias for p in params):
        logits = apply_logit_bias(logits, params)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(sampled_rows) == len(params):
        chosen = draw(logits, params, generators)
    else:
        chosen = logits.argmax(-1)
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            chosen[rows] = draw(logits[rows], [params[i] for i in sampled_rows],
                                [generators[i] for i in sampled_rows])
    out = [TokenChoice(token) for token in chosen.tolist()]
    if raw_logprobs is not None:
        # One gather and one topk for the whole batch: a per-row read would sync with a GPU once per row.
        chosen_logprobs = raw_logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
        k = max(p.top_logprobs for p in params)
        top_values, top_ids = raw_logprobs.topk(k, dim=-1) if k else (None, None)
        top_values, top_ids = (top_values.tolist(), top_ids.tolist()) if k else (None, None)
        for i, choice in enumerate(out):
            if params[i].logprobs:
                choice.logprob = chosen_logprobs[i]
                if params[i].top_logprobs:
                    n = params[i].top_logprobs
                    choice.top = list(zip(top_ids[i][:n], top_values[i][:n]))
    return out


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one request: seeded when a seed is given, else from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (2**63))
    return generator
