"""The inference engine: continuous batching over a slot-based KV cache.

Requests wait in a queue; between decode steps the engine admits as many as there are free slots
(prefilling each prompt into its slot), then runs one decode step for every running request at
once, samples one token per request, and streams the text out. A request leaves the batch the
moment it finishes or is aborted, and its slot is reused by the next one. The model's own `forward`
prefills, through `positions` and the `KVCache` protocol; decode steps go through `PackedDecoder`
(murmur/infer/decode.py: the same function in far fewer ops, on the model's own weights) where it serves the
model, else through the model's forward too.

Two ways to drive it:

- `engine.start()` runs the loop in a background thread (the server does this); `submit` and
  `abort` are then safe to call from any thread, and outputs go to each request's `sink`.
- Without `start()`, `generate` and `stream` step the engine inline (the evaluation and the
  terminal chat use this): `engine.generate(["hello", [{"role": "user", "content": "hi"}]], params)`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from murmur import accel
from murmur.errors import MurmurError, RequestError
from murmur.infer.compiled import BackgroundCompile, use_persistent_cache
from murmur.infer.decode import PackedDecoder, product_of, why_not
from murmur.infer.kv_cache import DecodeView, SlotKVCache, bytes_per_position, plan_cache
from murmur.infer.quantize import quantize_model
from murmur.infer.sampling import SamplingParams, TokenChoice, make_generator, sample
from murmur.infer.text import IncrementalDetokenizer, StopMatcher
from murmur.model import Transformer

log = logging.getLogger("murmur.infer")

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]


class EngineBusy(MurmurError):
    """The waiting queue is full; try again later."""


class EngineClosed(MurmurError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class StepOutput:
    """What one request produced in one step; the last one has `finished` set.

    text is new text safe to show (complete characters, no part of a stop string); token_ids and
    logprobs are the tokens sampled in this step. finish_reason: "stop" (stop token or string),
    "length" (max_tokens or the context is full), "abort" (cancelled) or "error" (see `error`).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenChoice] = field(default_factory=list)
    prompt_logprobs: list[TokenChoice] | None = None  # on the first output, when asked
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Completion:
    """The whole result of one prompt, as `Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenChoice] | None = None
    prompt_logprobs: list[TokenChoice] | None = None


class Request:
    """A prompt being served: its parameters, its slot, and the state of its output."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 sink: Callable[[StepOutput], None], prefix_len: int, tokenizer, device: torch.device):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.prefix_len = prefix_len
        self.generator = None if params.greedy else make_generator(params.seed, device)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_matcher = StopMatcher(params.stop)
        self.grammar = params.grammar.start() if params.grammar is not None else None
        self.prompt_logprobs: list[TokenChoice] | None = None
        self.slot: int | None = None
        self.length = 0  # positions already in the cache
        self.last_token: int | None = None  # sampled, not yet fed to the model
        self.output_ids: list[int] = []
        self.arrival = time.monotonic()
        self.token_times: list[float] = []
        self.finish_reason: str | None = None


class PrefixStore:
    """Keys/values of recently seen prompt prefixes (a shared system prompt), least recently used out.

    Bounded in number (`capacity`) and in bytes (`max_bytes`): callers choose the prefixes, so many long
    distinct system prompts must not grow memory past what was budgeted with the cache.
    """

    def __init__(self, capacity: int, max_bytes: int):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self.bytes = 0
        self.hits = 0

    def get(self, prefix: tuple[int, ...]):
        entry = self.entries.get(prefix)
        if entry is not None:
            self.entries.move_to_end(prefix)
            self.hits += 1
        return entry

    def put(self, prefix: tuple[int, ...], keys, values) -> None:
        old = self.entries.pop(prefix, None)
        if old is not None:
            self.bytes -= _nbytes(old)
        self.entries[prefix] = (keys, values)
        self.bytes += _nbytes((keys, values))
        while self.entries and (len(self.entries) > self.capacity or self.bytes > self.max_bytes):
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)


def _nbytes(entry: tuple[list[torch.Tensor], list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for tensors in entry for t in tensors)


class Engine:
    """Serve one model to many requests at once. See the module docstring for how to drive it."""

    def __init__(self, model: Transformer, tokenizer, *, max_batch_size: int = 16, max_seq_len: int | None = None,
                 max_queue: int = 256, prefix_cache: int = 0, stuck_after_s: float = 30.0, compile: bool = False,
                 kv_cache_bytes: int | None = None, kv_cache_memory_fraction: float = 0.5, quantize: str = "none",
                 packed_decode: bool = True):
        # quantize="int8": the model's linear layers become int8 in place (murmur/infer/quantize.py).
        self.quantization = quantize_model(model, quantize)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        # The cache is fitted to a budget before anything is allocated; it may cut the context or the batch.
        self.cache_plan = plan_cache(model.settings, self.dtype, max_batch_size=max_batch_size,
                                     max_seq_len=max_seq_len, budget_bytes=kv_cache_bytes,
                                     memory_fraction=kv_cache_memory_fraction, device=self.device,
                                     reserve_slots=1 if prefix_cache > 0 else 0,
                                     # each slot's `seen` (bool) and `counts` (int32) rows, allocated below
                                     slot_state_bytes=model.settings.vocab_size * 5)
        log.log(logging.WARNING if self.cache_plan.shrunk else logging.INFO, "%s", self.cache_plan.describe())
        self.max_seq_len = self.cache_plan.max_seq_len
        self.max_batch_size = max_batch_size = self.cache_plan.max_batch_size
        self.max_queue = max_queue
        self.stuck_after_s = stuck_after_s
        self.cache = SlotKVCache(model.settings, max_batch_size, self.max_seq_len, self.device, self.dtype)
        slot_bytes = self.max_seq_len * bytes_per_position(model.settings, self.dtype)
        self.prefixes = PrefixStore(prefix_cache, max_bytes=slot_bytes) if prefix_cache > 0 else None
        self._key_positions = torch.arange(self.max_seq_len, device=self.device)
        if compile and self.device.type == "cpu" and (why := accel.cpu_compile_unavailable()):
            log.warning("serving without compiling the decode step: %s", why)
            compile = False
        # Eager decode steps go through PackedDecoder (a dozen ops a layer, murmur/infer/decode.py) where it
        # serves the model; the compiled step compiles the model's own forward.
        why = "packed_decode=False" if not packed_decode else why_not(model)
        self.packed_decoder = PackedDecoder(model, self.cache) if why is None else None
        self.decode_path = "packed" if why is None else f"model forward ({why})"
        log.info("decode steps: %s", self.decode_path)
        self._eager_step = self._packed_logits if why is None else self._decode_logits
        # Without Murmur's kernels, head @ hidden^T rather than hidden @ head^T for any rows: on CPU MKL runs
        # this layout 1.8x faster for a batch of rows once the head outgrows the L2 cache (docs/journal.md).
        self._head_product = product_of(model.lm_head, weight_major_batches=True)
        self.compiled = compile
        self._decode_step = self._compile_decode() if compile else self._eager_step
        self.background_compile: BackgroundCompile | None = None  # set by warmup(background=True)
        vocab = model.settings.vocab_size
        # Tokens each slot has seen (prompt and output), for the repetition penalty; how often each slot
        # generated each token, for the presence and frequency penalties.
        self.seen = torch.zeros(max_batch_size, vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(max_batch_size, vocab, dtype=torch.int32, device=self.device)
        self._grammars = None
        self.stop_ids = set(getattr(tokenizer, "stop_ids", set()))
        self._free = list(range(max_batch_size))
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}
        self._requests: dict[str, Request] = {}
        self._aborts: set[str] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._busy_since: float | None = None
        self._ids = itertools.count()
        self.on_finish: Callable[[Request], None] | None = None
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "aborted": 0, "errors": 0,
                         "steps": 0}

    @classmethod
    def from_source(cls, src: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    **kwargs) -> Engine:
        """An engine for the model at `src` (Hugging Face directory, run folder or checkpoint), with its tokenizer."""
        from murmur.source import load_model
        from murmur.tokenizer import ChatTokenizer

        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loaded = load_model(src, device=device, dtype=dtype)
        if loaded.tokenizer_dir is None:
            raise MurmurError(f"{src} has no tokenizer (tokenizer.json); export the model with its tokenizer "
                              "(`murmur export`) or serve a run folder")
        return cls(loaded.model, ChatTokenizer.load(loaded.tokenizer_dir), **kwargs)

    @property
    def grammars(self):
        """The `murmur.infer.grammar.GrammarCompiler` of this engine's tokenizer (built on first use)."""
        if self._grammars is None:
            from murmur.infer.grammar import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.model.settings.vocab_size)
        return self._grammars

    # ---- prompts -------------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt, tools: Sequence[dict[str, Any]] | None = None
                      ) -> tuple[list[int], int]:
        """Token ids of a prompt (text, chat messages or ids) and the length of its reusable prefix.

        For chat messages the prefix is the leading system message(s), shared by many conversations;
        `tools` (OpenAI function definitions) are rendered by the chat template with them.
        """
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), 0
        items = list(prompt)
        if all(isinstance(t, int) for t in items):
            return [int(t) for t in items], 0
        if not all(isinstance(m, dict) for m in items):
            raise MurmurError("a prompt is a string, a list of chat messages (dicts) or a list of token ids")
        ids = self.tokenizer.render_chat(items, add_generation_prompt=True, tools=tools)
        system = list(itertools.takewhile(lambda m: m.get("role") == "system", items))
        prefix_len = 0
        if system and self.prefixes is not None and not tools:
            prefix = self.tokenizer.render_chat(system)
            if ids[:len(prefix)] == prefix:
                prefix_len = len(prefix)
        return ids, prefix_len

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError when a prompt cannot be served (empty, too long, bad token ids).

        The one check of a prompt against the model: the server answers its error as it is (message, param,
        code), so the terminal chat, the evaluation and every HTTP route say the same thing.
        """
        if not prompt_ids:
            raise RequestError("the prompt is empty; send at least one token of text", param="prompt")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_seq_len} "
                               "tokens and at least one must be left for the reply. Shorten the prompt",
                               param="prompt", code="context_length_exceeded")
        vocab = self.model.settings.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise RequestError(f"logit_bias names token id {max(params.logit_bias)}; this model's token ids are in "
                               f"[0, {vocab})", param="logit_bias")
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise RequestError(f"max_tokens {params.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
                               f"this model's context of {self.max_seq_len} tokens; lower max_tokens or shorten "
                               "the prompt", param="max_tokens", code="context_length_exceeded")

    # ---- requests ------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[StepOutput], None],
               request_id: str | None = None, prefix_len: int = 0) -> str:
        """Queue a request; outputs are passed to `sink` (called from the engine's thread). Thread-safe."""
        self.check_prompt(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        request = Request(request_id, list(prompt_ids), params, sink,
                          prefix_len if 0 < prefix_len < len(prompt_ids) else 0, self.tokenizer, self.device)
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down; retry on another replica or later")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(request)
            self._requests[request_id] = request
            self._cond.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot is freed before the next decode step. Thread-safe; unknown ids are ignored."""
        with self._cond:
            if request_id in self._requests:
                self._aborts.add(request_id)
                self._cond.notify()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    # ---- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduling loop in a background thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="murmur-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._aborts or self._stopping):
                    self._busy_since = None
                    self._cond.wait()
                if self._stopping and not (self._waiting or self._running or self._aborts):
                    return
                if self._busy_since is None:
                    self._busy_since = time.monotonic()
            self.step()
            self._busy_since = time.monotonic()

    def is_stuck(self) -> bool:
        """True when the loop has work but has not finished a step for `stuck_after_s` seconds, or died."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return True
        busy = self._busy_since
        return busy is not None and time.monotonic() - busy > self.stuck_after_s

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop taking requests, let running ones finish for up to `grace_s`, abort the rest, stop the loop."""
        with self._cond:
            self._closed = True
        deadline = time.monotonic() + grace_s
        while (self._running or self._waiting) and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        with self._cond:
            self._aborts.update(self._requests)
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, grace_s))
            self._thread = None
        else:
            self.step()

    def step(self) -> bool:
        """One scheduling iteration: apply aborts, admit waiting requests, run one decode step.

        Returns whether there is still work. A failure fails the requests it touched, not the engine.
        """
        try:
            with torch.inference_mode():
                self._apply_aborts()
                self._admit()
                if self._running:
                    self._decode()
            self.counters["steps"] += 1
        except Exception as err:
            log.exception("engine step failed")
            self.counters["errors"] += 1
            for request in list(self._running.values()):
                self._finish(request, "error", error=f"generation failed: {type(err).__name__}: {err}")
        return bool(self._running or self._waiting)

    def _apply_aborts(self) -> None:
        with self._cond:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return
            waiting = [r for r in self._waiting if r.id in aborts]
            for request in waiting:
                self._waiting.remove(request)
        for request in waiting:
            self._finish(request, "abort")
        for request_id in aborts:
            request = self._running.get(request_id)
            if request is not None:
                self._finish(request, "abort")

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them, several prompts per forward pass."""
        admitted = []
        while self._free:
            with self._cond:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            request.slot = heapq.heappop(self._free)
            self._running[request.id] = request
            admitted.append(request)
        group: list[tuple[Request, int]] = []
        for request in admitted:
            start = self._reuse_prefix(request)
            candidate = [*group, (request, start)]
            longest = max(len(r.prompt_ids) - s for r, s in candidate)
            # Padded prompts cost B x longest positions; keep a group within the budget and the cache.
            if group and (len(candidate) * longest > self.PREFILL_TOKENS or
                          max(s for _, s in candidate) + longest > self.max_seq_len):
                self._prefill(group)
                candidate = [(request, start)]
            group = candidate
        if group:
            self._prefill(group)

    PREFILL_TOKENS = 4096  # most (padded) prompt positions prefilled in one forward pass

    def _reuse_prefix(self, request: Request) -> int:
        """Copy a cached shared prefix into the request's slot; return how many positions it filled."""
        if not request.prefix_len or self.prefixes is None or request.params.prompt_logprobs is not None:
            return 0  # (prompt log-probabilities need every prompt position computed)
        entry = self.prefixes.get(tuple(request.prompt_ids[:request.prefix_len]))
        if entry is None:
            return 0
        self.cache.copy_in(request.slot, *entry)
        return request.prefix_len

    def _prefill(self, group: list[tuple[Request, int]]) -> None:
        """One forward pass over the prompts of `group` (each from its start), then each one's first token."""
        requests = [r for r, _ in group]
        starts = [s for _, s in group]
        lengths = [len(r.prompt_ids) - s for r, s in group]
        steps = max(lengths)
        # Right-padding: a pad position's key is overwritten by decoding before any real query reaches it.
        rows = [r.prompt_ids[s:] + [0] * (steps - n) for r, s, n in zip(requests, starts, lengths)]
        slots = [r.slot for r in requests]
        positions = self.cache.bind(slots, starts, steps)
        hidden = self.model(torch.tensor(rows, device=self.device), positions=positions, cache=self.cache,
                            return_hidden=True)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.lm_head(hidden[torch.arange(len(rows), device=self.device), last])
        for row, request in enumerate(requests):
            if request.params.prompt_logprobs is not None:
                request.prompt_logprobs = self._prompt_logprobs(hidden[row, :lengths[row]], request.prompt_ids,
                                                                request.params.prompt_logprobs)
        for request, start in group:
            slot, ids = request.slot, request.prompt_ids
            if request.prefix_len and self.prefixes is not None and start == 0:
                self.prefixes.put(tuple(ids[:request.prefix_len]), *self.cache.copy_out(slot, request.prefix_len))
            request.length = len(ids)
            self.counters["prompt_tokens"] += len(ids)
            self.seen[slot] = False
            self.seen[slot, torch.tensor(ids, device=self.device)] = True
            self.counts[slot] = 0
        slot_index = torch.tensor(slots, device=self.device)
        choices = sample(logits, [r.params for r in requests], [r.generator for r in requests],
                         self._seen_for(requests, slot_index), self._counts_for(requests, slot_index),
                         self._allowed(requests))
        self._mark_seen(slot_index, choices)
        for request, choice in zip(requests, choices):
            self._accept(request, choice)

    def _decode(self) -> None:
        batch = sorted(self._running.values(), key=lambda r: r.slot)
        # Decode slots 0..rows-1, row = slot, so attention reads the cache in place. Free slots among
        # them (rare: free slots are reused lowest first) run a throwaway token at position 0.
        rows = batch[-1].slot + 1
        tokens, positions = [0] * rows, [0] * rows
        for request in batch:
            tokens[request.slot], positions[request.slot] = request.last_token, request.length
        logits = self._step_logits(torch.tensor(tokens, device=self.device)[:, None],
                                   torch.tensor(positions, device=self.device), max(positions) + 1)
        slots = torch.tensor([r.slot for r in batch], device=self.device)
        if len(batch) < rows:
            logits = logits[slots]
        for request in batch:
            request.length += 1
        choices = sample(logits, [r.params for r in batch], [r.generator for r in batch], self._seen_for(batch, slots),
                         self._counts_for(batch, slots), self._allowed(batch))
        self._mark_seen(slots, choices)
        for request, choice in zip(batch, choices):
            self._accept(request, choice)

    def _seen_for(self, requests: list[Request], slots: torch.Tensor) -> torch.Tensor | None:
        """The rows of `seen` for `slots`, only when some request uses a repetition penalty (a B x V copy)."""
        return self.seen[slots] if any(r.params.repetition_penalty != 1 for r in requests) else None

    def _counts_for(self, requests: list[Request], slots: torch.Tensor) -> torch.Tensor | None:
        """The rows of `counts` for `slots`, only when some request uses a presence or frequency penalty."""
        return self.counts[slots] if any(r.params.penalised for r in requests) else None

    def _allowed(self, requests: list[Request]) -> torch.Tensor | None:
        """The tokens each request's grammar allows next, or None when no request has one."""
        if all(r.grammar is None for r in requests):
            return None
        from murmur.infer.grammar import allowed_tokens

        return allowed_tokens([r.grammar for r in requests], self.model.settings.vocab_size).to(self.device)

    def _mark_seen(self, slots: torch.Tensor, choices: list[TokenChoice]) -> None:
        """Record each row's sampled token in `seen` and `counts`, in one write each for the whole batch."""
        tokens = torch.tensor([c.token for c in choices], device=self.device)
        self.seen[slots, tokens] = True
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)

    PROMPT_LOGPROB_ROWS = 256  # prompt positions scored per head product: bounds memory at rows x vocab floats

    def _prompt_logprobs(self, hidden: torch.Tensor, ids: list[int], top: int) -> list[TokenChoice]:
        """Each prompt token's log-probability given the tokens before it (None for the first, which has
        no context), with the `top` most likely alternatives."""
        out = [TokenChoice(ids[0])]
        targets = torch.tensor(ids[1:], device=self.device)
        for begin in range(0, len(ids) - 1, self.PROMPT_LOGPROB_ROWS):
            end = min(begin + self.PROMPT_LOGPROB_ROWS, len(ids) - 1)
            logprobs = self.model.lm_head(hidden[begin:end]).float().log_softmax(-1)
            chosen = logprobs.gather(-1, targets[begin:end, None])[:, 0].tolist()
            if top:
                values, top_ids = (t.tolist() for t in logprobs.topk(top, dim=-1))
            for k, (token, logprob) in enumerate(zip(ids[begin + 1:end + 1], chosen)):
                out.append(TokenChoice(token, logprob, list(zip(top_ids[k], values[k])) if top else None))
        return out

    def _step_logits(self, tokens: torch.Tensor, positions: torch.Tensor, length: int, step=None) -> torch.Tensor:
        keys = self._key_positions[:length]
        step = step or self._decode_step
        if step != self._eager_step:  # compiled
            # One graph for any attended length, and one for any batch above one (size-1 dims specialise).
            torch._dynamo.maybe_mark_dynamic(keys, 0)
            if len(positions) > 1:
                torch._dynamo.maybe_mark_dynamic(tokens, 0)
                torch._dynamo.maybe_mark_dynamic(positions, 0)
        return step(tokens, positions, keys)

    def _decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, vocab) for one new token in each of slots 0..B-1: tokens (B, 1) at `positions`.

        keys: the positions 0..L-1 attended to (L = the longest row's length after this token).
        """
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        hidden = self.model(tokens, positions=positions[:, None], cache=DecodeView(self.cache, positions, mask),
                            return_hidden=True)
        return self._head(hidden[:, -1])

    def _packed_logits(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`_decode_logits` through PackedDecoder: the same logits from far fewer operations."""
        return self._head(self.packed_decoder(tokens, positions, keys))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of final hidden states (B, dim)."""
        return self._head_product(hidden)

    def _compile_decode(self):
        """The decode step as one torch.compile graph: far fewer kernel launches and Python calls per token.

        On CPU the graph's wrapper is generated C++ too (`cpp_wrapper`), which removes the Python call
        per kernel that otherwise dominates a small model's decode step (docs/journal.md).
        """
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        use_persistent_cache()  # a restart reuses the kernels built before (murmur/infer/compiled.py)
        return torch.compile(self._decode_logits, fullgraph=True, options=options)

    def warmup(self, background: bool = False) -> None:
        """Compile the decode step now, for batch size 1 and for any larger batch, not on the first requests.

        background=True returns at once: the engine decodes eagerly while a thread compiles, and switches to
        the compiled step between two steps when it is ready (`engine.background_compile`: status, wait()).
        The warm-up writes slots 0 and 1 at the context's last position, which no request writes or reads (a
        request finishes before reaching it), so it may run beside requests.
        """
        if not self.compiled or self.background_compile is not None:
            return
        compiled = self._decode_step

        def compile_now() -> None:
            last = self.max_seq_len - 1
            with torch.inference_mode():
                for batch in sorted({1, min(2, self.max_batch_size)}):
                    tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
                    positions = torch.full((batch,), last, dtype=torch.long, device=self.device)
                    # Attend to positions 0..last-1: a slice shorter than the whole key range, as every
                    # request's is (the full range specialises the graph to it, and the first request recompiles).
                    self._step_logits(tokens, positions, last, step=compiled)

        if not background:
            compile_now()
            return
        self._decode_step = self._eager_step

        def swap() -> None:
            self._decode_step = compiled

        self.background_compile = BackgroundCompile(compile_now, swap)

    def _accept(self, request: Request, choice: TokenChoice) -> None:
        """Record a sampled token: stream its text, or finish the request."""
        token = choice.token
        now = time.monotonic()
        request.output_ids.append(token)
        request.token_times.append(now)
        request.last_token = token
        self.counters["generation_tokens"] += 1
        out = StepOutput(request.id, token_ids=[token], logprobs=[choice] if request.params.logprobs else [])
        if len(request.output_ids) == 1:
            out.prompt_logprobs = request.prompt_logprobs
        params = request.params
        if token in params.stop_token_ids or (token in self.stop_ids and not params.ignore_eos):
            self._finish(request, "stop", out, flush=True)
            return
        if request.grammar is not None and not request.grammar.accept(token):
            self._finish(request, "error", out, error=f"the output left its grammar ({params.grammar.description}): "
                                                      f"{request.grammar.error or 'token not allowed'}")
            return
        text, stopped = request.stop_matcher.feed(request.detokenizer.add(token))
        out.text = text
        if stopped:
            self._finish(request, "stop", out)
        elif request.grammar is not None and request.grammar.finished:
            self._finish(request, "stop", out, flush=True)  # complete: only the end of the output may follow
        elif params.max_tokens is not None and len(request.output_ids) >= params.max_tokens:
            self._finish(request, "length", out, flush=True)
        elif request.length + 1 >= self.max_seq_len:
            self._finish(request, "length", out, flush=True)  # the context is full
        else:
            out.completion_tokens = len(request.output_ids)
            out.prompt_tokens = len(request.prompt_ids)
            request.sink(out)

    def _finish(self, request: Request, reason: str, out: StepOutput | None = None, error: str | None = None,
                flush: bool = False) -> None:
        """Free the request's slot and send its last output (with any held-back text when `flush`)."""
        out = out or StepOutput(request.id)
        if flush:
            tail, stopped = request.stop_matcher.feed(request.detokenizer.flush())
            out.text += tail
            if stopped:
                reason = "stop"
            else:
                out.text += request.stop_matcher.flush()
        request.finish_reason = reason
        out.finished, out.finish_reason, out.error = True, reason, error
        out.prompt_tokens, out.completion_tokens = len(request.prompt_ids), len(request.output_ids)
        if request.slot is not None and self._running.pop(request.id, None) is not None:
            heapq.heappush(self._free, request.slot)
        with self._cond:
            self._requests.pop(request.id, None)
            self._aborts.discard(request.id)
        self.counters["aborted" if reason == "abort" else "finished"] += 1
        if self.on_finish is not None:
            self.on_finish(request)
        request.sink(out)

    # ---- synchronous helpers -------------------------------------------------------------------

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """Yield a prompt's outputs as they come. Closing the iterator early aborts the request."""
        params = params or SamplingParams()
        ids, prefix_len = self.encode_prompt(prompt)
        outputs: queue.Queue[StepOutput] = queue.Queue()
        request_id = self.submit(ids, params, outputs.put, prefix_len=prefix_len)
        finished = False
        try:
            while not finished:
                if self._thread is None:
                    while outputs.empty():
                        self.step()
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)
                if self._thread is None:
                    self.step()

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Complete every prompt (continuously batched) and return the results in order.

        prompts: each a text (completed as is), a list of chat messages (rendered with the chat template
        and answered as the assistant) or a list of token ids. params: one for all, or one per prompt.
        """
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise MurmurError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        outputs: queue.Queue[StepOutput] = queue.Queue()
        encoded = [self.encode_prompt(p) for p in prompts]
        for (prompt_ids, _), p in zip(encoded, params):
            self.check_prompt(prompt_ids, p)
        pending = deque(zip(encoded, params))
        results: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        done = 0
        while done < len(prompts):
            # Keep the queue bounded: submit as room allows.
            while pending and self.num_waiting < self.max_queue:
                (prompt_ids, prefix_len), p = pending.popleft()
                request_id = self.submit(prompt_ids, p, outputs.put, prefix_len=prefix_len)
                order.append(request_id)
                results[request_id] = {"text": [], "ids": [], "logprobs": [], "prompt_logprobs": None, "final": None}
            if self._thread is None and outputs.empty():
                self.step()
                continue
            out = outputs.get()
            entry = results[out.request_id]
            entry["text"].append(out.text)
            entry["ids"].extend(out.token_ids)
            entry["logprobs"].extend(out.logprobs)
            if out.prompt_logprobs is not None:
                entry["prompt_logprobs"] = out.prompt_logprobs
            if out.finished:
                entry["final"] = out
                done += 1
        completions = []
        for request_id, p in zip(order, params):
            entry = results[request_id]
            final: StepOutput = entry["final"]
            if final.error:
                raise MurmurError(final.error)
            completions.append(Completion("".join(entry["text"]), entry["ids"], final.finish_reason,
                                          final.prompt_tokens, final.completion_tokens,
                                          entry["logprobs"] if p.logprobs else None, entry["prompt_logprobs"]))
        return completions

