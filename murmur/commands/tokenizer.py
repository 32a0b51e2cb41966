"""`murmur tokenizer --data DIR --out DIR [--vocab-size N]`: train a byte-level BPE tokenizer with a chat template."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train the tokenizer (byte-level BPE + ChatML template) on the "
                              "curated training split", description=__doc__)
    p.add_argument("--data", required=True, help="the data folder written by `murmur data` (posts.parquet)")
    p.add_argument("--out", required=True, help="the tokenizer folder to write (replaced atomically)")
    p.add_argument("--vocab-size", type=int, default=None, help="ids in the vocabulary, special tokens included "
                   "(default: tokenizer.vocab_size, 4096)")
    p.add_argument("--min-frequency", type=int, default=None, help="a pair must occur this often to be merged")
    p.add_argument("--pretrained", default=None, help="copy this local Hugging Face tokenizer instead of training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from murmur.settings.tokenizer import TokenizerSettings
    from murmur.tokenizer import ChatTokenizer, copy_tokenizer_dir, train_tokenizer, training_texts

    defaults = TokenizerSettings()
    if args.pretrained:
        tok = ChatTokenizer.load(args.pretrained)
        copy_tokenizer_dir(args.pretrained, args.out)
        print(f"copied tokenizer of {args.pretrained} -> {args.out} (vocabulary {tok.vocab_size})")
        return 0
    vocab_size = args.vocab_size if args.vocab_size is not None else defaults.vocab_size
    min_frequency = args.min_frequency if args.min_frequency is not None else defaults.min_frequency
    if vocab_size <= 0 or min_frequency <= 0:
        from murmur.errors import MurmurError

        raise MurmurError("--vocab-size and --min-frequency must be positive")
    texts = training_texts(args.data)
    tok = train_tokenizer(texts, vocab_size, args.out, min_frequency=min_frequency)
    print(f"trained tokenizer on {texts.count} posts -> {args.out} (vocabulary {tok.vocab_size})")
    return 0
