"""The tokenizer: byte-level BPE with document and ChatML role tokens, saved as Hugging Face expects.

    tok = train_tokenizer(texts, vocab_size=4096, out_dir="runs/demo/tokenizer")
    tok = ChatTokenizer.load("runs/demo/tokenizer")         # or any local Hugging Face tokenizer directory
    ids, mask = tok.render_chat_with_mask([{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello!"}])

Chat rendering is ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message. The same template is
saved as `chat_template.jinja`, so `transformers.AutoTokenizer.apply_chat_template` gives the same ids.
A foreign tokenizer (imported model) keeps its own Jinja template; Murmur renders it the same way
`transformers` does and finds the assistant spans by rendering prefixes of the conversation.

Tools (OpenAI function definitions) render in the manner of Hermes and Qwen: their JSON inside `<tools>` in
the system turn, an assistant's calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and
results (`tool` messages) inside `<tool_response>` in a user turn. A foreign template that renders
tools itself is given them as `transformers` gives them (`tools=`, arguments as objects).

Only the template's own markers become control tokens. A special token's literal typed inside a message
(`<|im_end|>` in a user's text) is encoded as the characters it is made of, so no message can close its
turn or open a forged system turn; `transformers` would read it as the control token.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from murmur.errors import MurmurError
from murmur.files import staged_dir, write_json_atomic

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML, written so that transformers' Jinja settings (trim_blocks, lstrip_blocks) leave it unchanged.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

REQUIRED_FILES = ("tokenizer.json",)
MAX_MODEL_LENGTH = 1_000_000


Message = dict[str, Any]


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


def tool_call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it: `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`."""
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def call_arguments(call: dict[str, Any]) -> tuple[str, Any]:
    """(name, arguments as an object when they are JSON text) of an OpenAI tool call or bare function."""
    function = call.get("function", call) if isinstance(call, dict) else {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # kept as the text it is
    return str(function.get("name", "")), arguments


def with_tools_as_text(messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> list[Message]:
    """Plain role/content messages for ChatML: tool definitions in the system turn, an assistant's calls
    after its content, and each run of `tool` results as one user turn."""
    out: list[Message] = []
    if tools:
        listing = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0].get("role") == "system":
            out.append({"role": "system", "content": f"{message_text(messages[0].get('content'))}\n\n{listing}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": listing})
    for message in messages:
        role = message.get("role")
        content = message_text(message.get("content"))
        if role == "assistant" and message.get("tool_calls"):
            calls = [tool_call_text(*call_arguments(call)) for call in message["tool_calls"]]
            content = "\n".join([content, *calls] if content else calls)
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
            continue
        out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict)
                       and part.get("type", "text") == "text")
    raise MurmurError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


class ChatTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` plus the chat template and the special ids Murmur needs."""

    def __init__(self, tokenizer, chat_template: str | None = None, config: dict[str, Any] | None = None,
                 path: Path | None = None):
        self.tokenizer = tokenizer
        self.config = config or {}
        self.path = path
        self.chat_template = chat_template
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.im_start_id = vocab.get(IM_START)
        self.im_end_id = vocab.get(IM_END)
        self._chatml = self.im_start_id is not None and self.im_end_id is not None and (
            chat_template is None or _normalise_template(chat_template) == _normalise_template(CHATML_TEMPLATE))
        eos = _token_content(self.config.get("eos_token"))
        if ENDOFTEXT in vocab:
            self.eos_id = vocab[ENDOFTEXT]
        elif eos is not None and eos in vocab:
            self.eos_id = vocab[eos]
        else:
            raise MurmurError(f"tokenizer {path or ''} has neither {ENDOFTEXT} nor an eos_token in its vocabulary; "
                              "a document boundary token is needed")
        stops = {self.eos_id}
        for token in (IM_END, eos, "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>"):
            if token is not None and token in vocab:
                stops.add(vocab[token])
        self.stop_ids: set[int] = stops
        self._jinja = None
        self._by_parts: bool | None = None
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = {i for i, token in added.items() if token.special}
        # Longest first, so that the alternation matches leftmost-longest as the tokenizer does.
        literals = sorted({t.content for t in added.values() if t.special and t.content}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, literals))) if literals else None
        self._as_text = None  # a copy of `tokenizer` that reads special-token literals as text

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> ChatTokenizer:
        """Load a tokenizer directory written by Murmur or by `transformers` (tokenizer.json required)."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise MurmurError(f"tokenizer directory {directory} does not exist; run `murmur tokenizer` first "
                              "or pass a Hugging Face model directory")
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise MurmurError(f"tokenizer directory {directory} is missing {', '.join(missing)}; "
                              "Murmur reads fast (Rust) tokenizers only — rerun `murmur tokenizer` or save the "
                              "tokenizer with transformers' save_pretrained")
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # the Rust side raises a plain Exception for malformed files
            raise MurmurError(f"{directory / 'tokenizer.json'} is not a valid tokenizer file: {err}") from None
        config = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() \
            else {}
        return cls(tokenizer, chat_template=_read_chat_template(directory, config), config=config, path=directory)

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
        generation_config.json into `out_dir`, replacing it atomically."""
        out_dir = Path(out_dir)
        with staged_dir(out_dir) as tmp:
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            template = self.chat_template or CHATML_TEMPLATE
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            added = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for t in SPECIAL_TOKENS if t in vocab}
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "added_tokens_decoder": added,
                "bos_token": None,
                "eos_token": ENDOFTEXT,
                "pad_token": ENDOFTEXT,
                "unk_token": None,
                "additional_special_tokens": [IM_START, IM_END],
                "clean_up_tokenization_spaces": False,
                "model_max_length": MAX_MODEL_LENGTH,
                # Also here for transformers releases that predate chat_template.jinja.
                "chat_template": template,
            }
            write_json_atomic(tmp / "tokenizer_config.json", config)
            write_json_atomic(tmp / "special_tokens_map.json", {
                "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "additional_special_tokens": [IM_START, IM_END]})
            # Generation stops at the end of an assistant turn as well as at a document boundary.
            write_json_atomic(tmp / "generation_config.json", {
                "eos_token_id": sorted(self.stop_ids), "pad_token_id": self.eos_id})
        self.path = out_dir
        self.config = config
        return out_dir

    # ---- plain text ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding needs at least this many rows)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, specials_as_text: bool = False) -> list[int]:
        """Token ids of `text`, with no special tokens added.

        A special token's literal in `text` (`<|im_end|>`) is that control token, as in `transformers`; with
        `specials_as_text` it is encoded as the characters it is made of (for text written by users)."""
        return self._encoder(specials_as_text).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, specials_as_text: bool = False) -> list[list[int]]:
        """Token ids of many texts at once, encoded in parallel by the Rust tokenizer (see `encode`)."""
        encodings = self._encoder(specials_as_text).encode_batch(list(texts), add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def _encoder(self, specials_as_text: bool):
        if not specials_as_text:
            return self.tokenizer
        if self._as_text is None:
            from tokenizers import Tokenizer

            # A separate copy: flipping the flag on the shared tokenizer would race with other threads.
            copy = Tokenizer.from_str(self.tokenizer.to_str())
            copy.encode_special_tokens = True
            self._as_text = copy
        return self._as_text

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`. Byte-level BPE makes decode(encode(text)) == text for any UTF-8 text."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def encodes_by_parts(self) -> bool:
        """True when a text's ids equal the concatenation of its pieces' ids wherever the pieces meet at a
        newline or a special token and neither start nor end with whitespace. Holds for Murmur's own
        tokenizers (ChatML, no normalizer, GPT-2 byte-level split, which never joins a newline to the text
        around it); the tokenize stage then encodes each post once and reuses its ids in every document."""
        if self._by_parts is None:
            spec = json.loads(self.tokenizer.to_str())
            pre = spec.get("pre_tokenizer") or {}
            self._by_parts = bool(self._chatml and spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                                  and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))
        return self._by_parts

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def vocab_hash(self) -> str:
        """A fingerprint of the vocabulary, merges and special tokens (shards record it)."""
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    # ---- chat ---------------------------------------------------------------------------------

    def render_chat_text(self, messages: Sequence[Message], add_generation_prompt: bool = False,
                         tools: Sequence[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """The chat as text, and the character spans the model is trained on (assistant content and the
        token that ends its turn)."""
        text, spans, _ = self._render(messages, add_generation_prompt, tools)
        return text, spans

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False,
                    tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a chat: exactly what `apply_chat_template(messages, tokenize=True)` gives, except that
        special-token literals inside the messages (and tools) are encoded as text (see the module docstring)."""
        text, _, markers = self._render(messages, add_generation_prompt, tools)
        return self._encode_rendered(text, markers)[0]

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template shows tool definitions to the model (Murmur's always does)."""
        return self._chatml or bool(self.chat_template and "tools" in self.chat_template)

    def render_chat_with_mask(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Token ids of a chat and a loss mask: 1 exactly on assistant content and its end-of-turn token."""
        text, spans, markers = self._render(messages, False)
        ids, offsets = self._encode_rendered(text, markers)
        return ids, mask_from_offsets(offsets, spans)

    def render_chats_with_masks(self, chats: Sequence[Sequence[Message]]) -> list[tuple[list[int], list[int]]]:
        """`render_chat_with_mask` for many chats, encoded in parallel."""
        rendered = [self._render(chat, False) for chat in chats]
        encodings = self.tokenizer.encode_batch([text for text, _, _ in rendered], add_special_tokens=False)
        out = []
        for enc, (text, spans, markers) in zip(encodings, rendered):
            ids, offsets = ((enc.ids, enc.offsets) if self._only_markers_special(enc.ids, enc.offsets, markers)
                            else self._splice(text, markers))
            out.append((ids, mask_from_offsets(offsets, spans)))
        return out

    def _encode_rendered(self, text: str, markers: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of a rendered chat whose control tokens are exactly `markers`.

        The whole text is encoded at once (so benign chats get transformers' ids, whatever the tokenizer);
        only when a special token turns up outside the markers is it re-encoded piece by piece."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        if self._only_markers_special(enc.ids, enc.offsets, markers):
            return enc.ids, enc.offsets
        return self._splice(text, markers)

    def _only_markers_special(self, ids: list[int], offsets: list[tuple[int, int]],
                              markers: list[tuple[int, int]]) -> bool:
        """True when the special tokens of an encoding are the markers, one each (an added token that strips
        the whitespace beside it may span a little more than its marker)."""
        found = [offset for token, offset in zip(ids, offsets) if token in self._special_ids]
        return len(found) == len(markers) and all(s <= ms and me <= e for (s, e), (ms, me) in zip(found, markers))

    def _splice(self, text: str, markers: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Encode the text between markers with special-token literals as text, each marker as its token."""
        bounds = [0, *(edge for marker in markers for edge in marker), len(text)]
        segments = list(zip(bounds[::2], bounds[1::2]))
        encodings = self._encoder(True).encode_batch([text[a:b] for a, b in segments], add_special_tokens=False)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for k, ((a, _), enc) in enumerate(zip(segments, encodings)):
            ids += enc.ids
            offsets += [(a + s, a + e) for s, e in enc.offsets]
            if k < len(markers):
                start, end = markers[k]
                ids.append(self.tokenizer.token_to_id(text[start:end]))
                offsets.append((start, end))
        return ids, offsets

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool,
                tools: Sequence[dict[str, Any]] | None = None
                ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """(text, trained spans, markers): the character spans of the template's own control tokens."""
        if not self._chatml:
            return self._render_with_template(messages, add_generation_prompt, tools)
        if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            messages = with_tools_as_text(messages, tools)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        markers: list[tuple[int, int]] = []
        pos = 0
        for message in messages:
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise MurmurError(f"chat message without a role: {message!r}")
            head = f"{IM_START}{role}\n"
            content = message_text(message.get("content"))
            body = content + IM_END
            if role == "assistant":
                spans.append((pos + len(head), pos + len(head) + len(body)))
            end = pos + len(head) + len(content)
            markers += [(pos, pos + len(IM_START)), (end, end + len(IM_END))]
            piece = head + body + "\n"
            parts.append(piece)
            pos += len(piece)
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
            markers.append((pos, pos + len(IM_START)))
        return "".join(parts), spans, markers

    def _render_with_template(self, messages: Sequence[Message], add_generation_prompt: bool,
                              tools: Sequence[dict[str, Any]] | None = None
                              ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """Render with a foreign Jinja template; assistant spans come from rendering each prefix.

        Special-token literals inside the messages are swapped for private-use characters while the template
        runs, so every literal left in its output is one of the template's markers; then they are put back."""
        if not self.chat_template:
            raise MurmurError(f"tokenizer {self.path or ''} has no chat template; add chat_template.jinja or "
                              "use a tokenizer trained by `murmur tokenizer`")
        messages = [_with_call_objects(dict(m, content=message_text(m.get("content")))) for m in messages]
        tools = list(tools) if tools else None
        guard = _LiteralGuard(self._special_re, [*messages, *(tools or [])], self.chat_template)
        messages, tools = guard.hide(messages), guard.hide(tools)
        text = self._jinja_render(messages, add_generation_prompt, tools)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self._jinja_render(messages[:i], True, tools)
            after = self._jinja_render(messages[:i + 1], False, tools)
            if after.startswith(before) and text.startswith(after):
                spans.append((len(before), len(after)))
            else:  # a template that rewrites history; fall back to the content itself
                start = text.find(message["content"], spans[-1][1] if spans else 0)
                if start >= 0:
                    spans.append((start, start + len(message["content"])))
        markers = [m.span() for m in self._special_re.finditer(text)] if self._special_re else []
        return guard.reveal(text, spans, markers)

    def _jinja_render(self, messages: list[Message], add_generation_prompt: bool,
                      tools: list[dict[str, Any]] | None = None) -> str:
        if self._jinja is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise MurmurError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent,
                                                                                ensure_ascii=False)
            self._jinja = env.from_string(self.chat_template)
        specials = {key: _token_content(self.config.get(key)) or "" for key in
                    ("bos_token", "eos_token", "pad_token", "unk_token")}
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  tools=tools, **specials)


def _with_call_objects(message: Message) -> Message:
    """An assistant message whose tool calls' arguments are objects, as templates written for
    `transformers` expect (OpenAI sends them as JSON text)."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        name, arguments = call_arguments(call)
        calls.append({**call, "type": "function", "function": {"name": name, "arguments": arguments}})
    return {**message, "tool_calls": calls}


def mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token that starts inside one of the character spans, else 0."""
    mask = [0] * len(offsets)
    if not spans:
        return mask
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if spans[k][0] <= start < spans[k][1] and end > start:
            mask[i] = 1
    return mask


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> ChatTokenizer:
    """Train byte-level BPE on `texts` with Murmur's special tokens; save it to `out_dir` when given.

    Raises MurmurError when the texts are too few to learn `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= base:
        raise MurmurError(f"vocab_size {vocab_size} is too small: byte-level BPE needs more than {base} "
                          "(256 bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    counted = _CountingIterator(texts)
    tokenizer.train_from_iterator(counted, trainer=trainer)
    if counted.count == 0:
        raise MurmurError("no training text for the tokenizer: the training split is empty")
    learned = tokenizer.get_vocab_size(with_added_tokens=True)
    if learned < vocab_size:
        raise MurmurError(f"the corpus is too small for vocab_size {vocab_size}: only {learned} tokens could be "
                          f"learned from {counted.count} texts; lower --vocab-size (e.g. {learned}) or add data")
    chat = ChatTokenizer(tokenizer, chat_template=CHATML_TEMPLATE)
    if out_dir is not None:
        chat.save(out_dir)
    return chat


def run_stage(settings, run_dir: str | Path) -> dict[str, Any]:
    """The `tokenizer` stage: train on run_dir/data/posts.parquet (train split), or copy the pretrained
    tokenizer named by `tokenizer.pretrained`, into run_dir/tokenizer."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "tokenizer"
    cfg = settings.tokenizer
    if cfg.pretrained:
        tok = ChatTokenizer.load(cfg.pretrained)
        copy_tokenizer_dir(cfg.pretrained, out_dir)
        return {"tokenizer": str(out_dir), "vocab_size": tok.vocab_size, "pretrained": str(cfg.pretrained)}
    texts = training_texts(run_dir / "data")
    tok = train_tokenizer(texts, cfg.vocab_size, out_dir, min_frequency=cfg.min_frequency)
    return {"tokenizer": str(out_dir), "vocab_size": tok.vocab_size, "texts": texts.count}


class training_texts:  # a lower-case name: used like a generator function, but counts what it gave
    """The training-split post texts of a data folder, streamed from Parquet in batches."""

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / "posts.parquet"
        if not self.path.is_file():
            raise MurmurError(f"{self.path} not found; run `murmur data` first (or pass --data DIR)")
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for batch in open_parquet(self.path, ["text", "split"]).iter_batches(columns=["text", "split"],
                                                                            batch_size=8192):
            cols = batch.to_pydict()
            for text, split in zip(cols["text"], cols["split"]):
                if split == "train" and text:
                    self.count += 1
                    yield text


def open_parquet(path: Path, columns: list[str]):
    """A `pyarrow.parquet.ParquetFile` that holds `columns`, or an error naming the file and what is missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise MurmurError(f"{path} is not a readable Parquet file ({err}); rerun `murmur data`") from None
    missing = [c for c in columns if c not in file.schema_arrow.names]
    if missing:
        raise MurmurError(f"{path} lacks the column(s) {', '.join(missing)} (see docs/CONTRACTS.md); rerun "
                          "`murmur data`")
    return file


def copy_tokenizer_dir(src: str | Path, out_dir: str | Path) -> Path:
    """Copy the tokenizer files of a Hugging Face directory into `out_dir`, atomically."""
    src, out_dir = Path(src), Path(out_dir)
    with staged_dir(out_dir) as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "generation_config.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return out_dir


class _CountingIterator:
    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.count += 1
            yield text


def _normalise_template(template: str) -> str:
    return "".join(template.split())


def _token_content(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The chat template: chat_template.jinja (what current transformers writes) or the config's entry."""
    path = directory / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MurmurError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise MurmurError(f"{path} should hold a JSON object")
    return data


# Supplementary Private Use Area-B: characters no tokenizer or template gives a meaning of its own.
PRIVATE_USE = range(0x100000, 0x10FFFE)


class _LiteralGuard:
    """Stands a private-use character in for each special token's literal inside chat messages while a Jinja
    template renders them, so that every literal in its output is one the template wrote; `reveal` then puts
    the literals back and moves the character spans found meanwhile to match."""

    def __init__(self, pattern: re.Pattern | None, messages: list[Message], template: str):
        strings = list(_strings(messages))
        found = sorted({literal for s in strings for literal in pattern.findall(s)}) if pattern else []
        self.pattern = pattern
        self.stand_in: dict[str, str] = {}
        if found:
            used = set(template).union(*map(set, strings))
            free = (chr(c) for c in PRIVATE_USE if chr(c) not in used)
            self.stand_in = dict(zip(found, free))
        self.literal = {char: literal for literal, char in self.stand_in.items()}
        self.stand_in_re = re.compile("|".join(self.literal)) if self.literal else None

    def hide(self, value: Any) -> Any:
        """`value` (messages, or anything inside them) with each literal swapped for its stand-in."""
        if not self.stand_in:
            return value
        if isinstance(value, str):
            return self.pattern.sub(lambda m: self.stand_in[m.group()], value)
        if isinstance(value, dict):
            return {key: self.hide(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.hide(item) for item in value]
        return value

    def reveal(self, text: str, *span_lists: list[tuple[int, int]]):
        """The rendered text with the literals back, and each list of (start, end) spans moved to match."""
        if self.stand_in_re is None:
            return (text, *span_lists)
        at = [m.start() for m in self.stand_in_re.finditer(text)]
        grown = [0, *itertools.accumulate(len(self.literal[text[q]]) - 1 for q in at)]

        def moved(position: int) -> int:  # each stand-in before `position` grows into its literal
            return position + grown[bisect.bisect_left(at, position)]

        text = self.stand_in_re.sub(lambda m: self.literal[m.group()], text)
        return (text, *([(moved(a), moved(b)) for a, b in spans] for spans in span_lists))


def _strings(value: Any) -> Iterator[str]:
    """Every string inside `value` (nested dicts and lists)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
