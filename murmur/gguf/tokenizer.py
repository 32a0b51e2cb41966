"""A GGUF file's tokenizer, both ways: rebuilt from its metadata as a `tokenizers` byte-level BPE, and a
tokenizer's metadata for export.

GGUF stores no tokenizer.json, only the vocabulary (`tokenizer.ggml.tokens`, spelled in GPT-2's byte
alphabet), the merges, each token's type (1 normal, 3 control, 4 user-defined, 5 unused, 6 byte), the
special ids and the chat template. How text is split before BPE is named, not stored: `tokenizer.ggml.pre`
is one of llama.cpp's pre-tokenizer names, each a fixed regex. `PRE_TOKENIZERS` gives the ones Murmur
rebuilds, and export finds the name of a tokenizer's pre-tokenizer by matching it against the same table.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from murmur.errors import MurmurError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# llama.cpp's split regexes (llama-vocab.cpp), for the pre-tokenizer names that share them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex, then bytes
    if name == "gpt2":
        return byte_level
    if name == "smollm":  # StarCoder's vocabulary: every digit alone, then GPT-2's split
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[name]
    return pt.Sequence([pt.Split(Regex(split), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


# llama.cpp's name -> the canonical name whose regex it uses.
PRE_TOKENIZERS = {"gpt2": "gpt2", "smollm": "smollm", "starcoder": "smollm", "refact": "smollm",
                  "codeshell": "smollm", "llama-bpe": "llama-bpe", "llama3": "llama-bpe", "llama-v3": "llama-bpe",
                  "falcon3": "llama-bpe", "smaug-bpe": "llama-bpe", "dbrx": "llama-bpe", "qwen2": "qwen2",
                  "deepseek-r1-qwen": "qwen2"}


@cache
def _byte_alphabet() -> frozenset[str]:
    from tokenizers import pre_tokenizers

    return frozenset(pre_tokenizers.ByteLevel.alphabet())


@cache
def _byte_spelling() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def tokenizer_from_metadata(metadata: dict[str, Any], source: str):
    """(tokenizers.Tokenizer, tokenizer_config dict) rebuilt from a GGUF's tokenizer.* metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        what = "a SentencePiece vocabulary (\"llama\")" if kind == "llama" else repr(kind)[:40]
        raise MurmurError(f"{source}: tokenizer.ggml.model is {what}; Murmur rebuilds byte-level BPE tokenizers "
                          "(\"gpt2\": SmolLM, Llama 3, Qwen2) only")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise MurmurError(f"{source}: pre-tokenizer {pre!r:.40} (tokenizer.ggml.pre) is not supported; "
                          f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens or ())
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise MurmurError(f"{source}: tokenizer.ggml.tokens must be a non-empty list of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise MurmurError(f"{source}: tokenizer.ggml.merges must be a list of strings (byte-level BPE needs them)")
    if len(types) != len(tokens):
        raise MurmurError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    alphabet, spelling = _byte_alphabet(), _byte_spelling()
    vocab: dict[str, int] = {}
    added = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            added.append(AddedToken(token, special=kind == CONTROL, normalized=False))
        elif not set(token) <= alphabet:  # a plain token written as text: spell its bytes as BPE sees them
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        if token in vocab:
            raise MurmurError(f"{source}: token {token!r:.40} appears twice in tokenizer.ggml.tokens "
                              f"(ids {vocab[token]} and {index})")
        vocab[token] = index
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise MurmurError(f"{source}: merge {merge!r:.40} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    canonical = PRE_TOKENIZERS[pre]
    try:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=canonical == "llama-bpe"))
    except Exception as err:  # the Rust side reports a merge of unknown tokens as a plain Exception
        raise MurmurError(f"{source}: the vocabulary and merges do not form a BPE tokenizer: {err}") from None
    tokenizer.pre_tokenizer = _pre_tokenizer(canonical)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(added)

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if type(index) is int and 0 <= index < len(tokens) else None

    template = metadata.get("tokenizer.chat_template")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata.get(f"{metadata.get('general.architecture')}.context_length", 1_000_000),
    }
    if isinstance(template, str):
        config["chat_template"] = template
    return tokenizer, config


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for a tokenizer's pre-tokenizer (gpt2 for Murmur's own), or an error naming it."""
    spec = json.loads(tokenizer.to_str()).get("pre_tokenizer")
    for name in ("gpt2", "smollm", "llama-bpe", "qwen2"):
        if _essential(json.loads(_pre_tokenizer(name).__getstate__())) == _essential(spec):
            return name
    raise MurmurError(f"the tokenizer's pre-tokenizer ({json.dumps(spec)[:120]}) is not one llama.cpp knows by "
                      "name; GGUF export supports gpt2, smollm, llama-bpe and qwen2 splits")


def _essential(spec: Any) -> Any:
    """A pre-tokenizer's JSON without the settings that do not change how text splits (trim_offsets)."""
    if isinstance(spec, dict):
        return {k: _essential(v) for k, v in spec.items() if k not in ("trim_offsets",)}
    if isinstance(spec, list):
        return [_essential(v) for v in spec]
    return spec


def metadata_from_tokenizer(chat, vocab_size: int) -> dict[str, Any]:
    """The tokenizer.* keys for a Murmur ChatTokenizer, padded with unused tokens to the model's vocab_size."""
    spec = json.loads(chat.tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MurmurError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}")
    vocab = chat.tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise MurmurError(f"the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    added = chat.tokenizer.get_added_tokens_decoder()
    types = [UNUSED if i not in by_id else (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
             for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    config = chat.config or {}

    def token_id(key: str) -> int | None:
        content = config.get(key)
        content = content.get("content") if isinstance(content, dict) else content
        return vocab.get(content) if isinstance(content, str) else None

    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_tokenizer_name(chat.tokenizer),
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": token_id("eos_token") if token_id("eos_token") is not None else chat.eos_id,
        "tokenizer.ggml.add_bos_token": bool(config.get("add_bos_token", False)),
    }
    for key, name in (("bos_token", "bos_token_id"), ("pad_token", "padding_token_id"),
                      ("unk_token", "unknown_token_id")):
        if token_id(key) is not None:
            out[f"tokenizer.ggml.{name}"] = token_id(key)
    if chat.chat_template:
        out["tokenizer.chat_template"] = chat.chat_template
    return out
