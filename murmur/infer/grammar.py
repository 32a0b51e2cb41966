"""Constrained decoding: outputs that must match a grammar (a JSON schema, any JSON object, tool calls).

A `GrammarCompiler` (one per tokenizer; `Engine.grammars`) turns a JSON schema or a Lark grammar into a
`Grammar`, which rides in `SamplingParams.grammar`. Each request the engine serves with one gets its own
`GrammarState` (the parser's position); before every sampling step the engine asks `allowed_tokens` for
the tokens each row may take, and the sampler masks the rest. The work runs on the logits after the
model's (compiled) step, on CPU, in llguidance (docs/journal.md says why that library: it bounds its
own work per grammar and per token, and needs no ahead-of-time compilation of a request's schema).

Every grammar comes from a request, so it is hostile: compiling is bounded (grammar size, lexer
work: `_limits()`), and so is the work of each token's mask; a grammar that exceeds them is refused
with a RequestError naming the request's field, and a request whose grammar runs out of work mid-way
ends with an error rather than stalling the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from murmur.errors import MurmurError, RequestError

# JSON as compact as the schema allows: no free whitespace between tokens, so a model (even a random
# one) cannot spend its whole budget on blanks.
JSON_OPTIONS = {"whitespace_flexible": False}


def _limits():
    import llguidance

    # Defaults are 500_000 symbols and 1_000_000 fuel (about 20 ms) to build; a request's grammar gets a
    # tenth of the size, and at most 100_000 fuel (about 7 ms) per token's mask.
    return llguidance.LLParserLimits(max_grammar_size=50_000, initial_lexer_fuel=1_000_000,
                                     step_lexer_fuel=100_000, step_max_items=20_000, max_lexer_states=50_000,
                                     verbose_errors=False)


class Grammar:
    """A compiled grammar over one tokenizer's vocabulary; `start()` gives a fresh parser state."""

    def __init__(self, compiler: GrammarCompiler, source: str, description: str, param: str):
        self.compiler = compiler
        self.source = source  # llguidance's grammar text
        self.description = description  # what it was made from, for messages
        self.param = param  # the request's field it came from

    def start(self) -> GrammarState:
        import llguidance

        matcher = llguidance.LLMatcher(self.compiler.tokenizer, self.source, log_level=0, limits=_limits())
        if matcher.is_error():
            raise RequestError(f"{self.description} cannot be used: {matcher.get_error()}",
                               param=self.param)
        return GrammarState(matcher)

    def __repr__(self) -> str:
        return f"Grammar({self.description})"


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False when the grammar did not allow it or ran out of work."""
        return bool(self.matcher.consume_token(token))

    @property
    def finished(self) -> bool:
        """True when the grammar is complete and nothing but the end of the output may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Builds `Grammar`s for one tokenizer, whose vocabulary (padded to the model's) it indexes once."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import llguidance
        except ImportError:
            raise MurmurError("structured outputs need the llguidance package: pip install llguidance") from None
        self.vocab_size = vocab_size
        stops = sorted(getattr(tokenizer, "stop_ids", {tokenizer.eos_id}))
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab_size, eos_token=stops)

    def json_schema(self, schema: dict[str, Any], param: str = "response_format") -> Grammar:
        """Outputs that are JSON documents valid under `schema`."""
        import llguidance

        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as err:
            raise RequestError(f"{param}: the JSON schema cannot be used: {err}", param=param) from None
        return self._checked(source, f"{param}'s JSON schema", param)

    def json_object(self, param: str = "response_format") -> Grammar:
        """Outputs that are one JSON object, of any content."""
        return self.json_schema({"type": "object"}, param)

    def lark(self, source: str, description: str, param: str) -> Grammar:
        """Outputs in a Lark grammar (llguidance's dialect, with `%json {schema}` for embedded JSON)."""
        import llguidance

        return self._checked(llguidance.LLMatcher.grammar_from_lark(source), description, param)

    def _checked(self, source: str, description: str, param: str) -> Grammar:
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.tokenizer,
                                                                               limits=_limits())
        if failed:
            detail = "; ".join(messages)[:500]
            raise RequestError(f"{description} cannot be used: {detail}. Simplify it or use a keyword the "
                               "server supports (docs/serve.md lists them).", param=param)
        return Grammar(self, source, description, param)


def allowed_tokens(states: list[GrammarState | None], vocab_size: int) -> torch.Tensor | None:
    """(B, vocab) bool: the tokens each row's grammar allows next (every token for rows without one);
    None when no row has a grammar."""
    if all(state is None for state in states):
        return None
    words = (vocab_size + 31) // 32
    bitmask = np.full((len(states), words), -1, dtype=np.int32)
    for row, state in enumerate(states):
        if state is not None:
            view = bitmask[row]
            state.matcher.unsafe_compute_mask_ptr(view.ctypes.data, view.nbytes)
    # Bit i of word w is token 32 * w + i (little-endian words).
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.astype(bool))
