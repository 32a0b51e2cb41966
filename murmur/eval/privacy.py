"""Privacy probes: did the model memorise planted secrets, and do its generations carry personal data?

Canary exposure follows Carlini et al., "The Secret Sharer" (USENIX Security 2019). The data stage can
plant canaries, `prefix + secret`, into the training split (data/canaries.json says which, and how
often; some are controls never inserted). For each canary the model scores the true secret and
`n` random secrets of the same shape (a digit for a digit, a letter for a letter); with the true one
ranked r among n + 1,

    exposure = log2(n + 1) - log2(r)

from 0 (the secret is no more likely than chance) up to log2(n + 1) (it beats every candidate).
Random ranks give about 1.44 bits on average. Because ranking caps exposure at log2(n + 1), the
estimated exposure of the paper's §4.3 is reported too: fit a normal distribution to the candidates'
log-likelihoods and take -log2 of the probability that a random secret scores at least as high.
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

import numpy as np

from murmur.errors import MurmurError
from murmur.eval.scoring import continuation_logprobs


def read_canaries(data_dir: str | Path) -> list[dict]:
    """The canaries of `data_dir/canaries.json` (an empty list when none were planted).

    Each has prefix, secret, repeats (times planted in the train split) and inserted."""
    path = Path(data_dir) / "canaries.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MurmurError(f"{path} is not valid JSON ({err}); rerun `murmur data`") from None
    items = data.get("canaries", []) if isinstance(data, dict) else data
    canaries = []
    for item in items:
        if not isinstance(item, dict) or "prefix" not in item or "secret" not in item:
            raise MurmurError(f"{path}: every canary needs 'prefix' and 'secret'; rerun `murmur data`")
        repeats = int(item.get("repeats", 0))
        canaries.append({**item, "repeats": repeats, "inserted": bool(item.get("inserted", repeats > 0))})
    return canaries


def _same_shape(secret: str, rng: random.Random) -> str:
    """A random string shaped like `secret`: each digit, lower- or upper-case letter replaced by a random one."""
    out = []
    for ch in secret:
        if ch.isdigit():
            out.append(rng.choice(string.digits))
        elif ch.islower():
            out.append(rng.choice(string.ascii_lowercase))
        elif ch.isupper():
            out.append(rng.choice(string.ascii_uppercase))
        else:
            out.append(ch)
    return "".join(out)


def secret_candidates(secret: str, n: int, seed: int) -> list[str]:
    """Up to `n` distinct random secrets shaped like `secret`, none equal to it (fewer if the space is small)."""
    alphabet_sizes = [10 if c.isdigit() else 26 if c.isalpha() and c.isascii() else 1 for c in secret]
    space = math.prod(alphabet_sizes) - 1
    if space < 1:
        raise MurmurError(f"canary secret {secret!r} has no digits or letters to randomise")
    n = min(n, space)
    rng = random.Random(f"{seed}:{secret}")
    found: set[str] = set()
    while len(found) < n:
        candidate = _same_shape(secret, rng)
        if candidate != secret:
            found.add(candidate)
    return sorted(found)


def _log2_normal_tail(z: float) -> float:
    """log2 P(Z >= z) for a standard normal Z, accurate far into the tail."""
    tail = 0.5 * math.erfc(z / math.sqrt(2))
    if tail > 0:
        return math.log2(tail)
    # Mills ratio: P(Z >= z) ~ phi(z) / z for large z.
    return (-z * z / 2 - math.log(z * math.sqrt(2 * math.pi))) / math.log(2)


def exposure_from_scores(true_score: float, candidate_scores: np.ndarray) -> dict:
    """Rank-based and normal-fit exposure of a secret whose log-likelihood is `true_score`."""
    candidate_scores = np.asarray(candidate_scores, dtype=np.float64)
    better = int((candidate_scores > true_score).sum())
    tied = int((candidate_scores == true_score).sum())
    rank = 1 + better + tied / 2  # ties share the middle of their ranks
    total = len(candidate_scores) + 1
    std = float(candidate_scores.std())
    z = (true_score - float(candidate_scores.mean())) / std if std > 0 else 0.0
    return {"rank": rank, "candidates": total, "exposure": math.log2(total) - math.log2(rank),
            "max_exposure": math.log2(total), "exposure_estimated": max(0.0, -_log2_normal_tail(z))}


def canary_exposure(model, tokenizer, prefix: str, secret: str, n_candidates: int = 999, seed: int = 0,
                    batch_size: int = 256, separator: str = " ") -> dict:
    """Exposure of one canary: its secret ranked among random secrets by the model's likelihood of the
    whole text `prefix + separator + secret`, scored as a post (after <|endoftext|>, up to its end)."""
    candidates = secret_candidates(secret, n_candidates, seed)
    prefix = prefix + separator
    ids = tokenizer.encode_batch([prefix + secret] + [prefix + c for c in candidates])
    # The tokens every text shares run once as a prefix; only the differing tails are scored.
    shared = 0
    shortest = min(len(x) for x in ids)
    while shared < shortest and all(x[shared] == ids[0][shared] for x in ids):
        shared += 1
    head = [tokenizer.eos_id, *ids[0][:shared]]
    tails = [x[shared:] + [tokenizer.eos_id] for x in ids]
    if len(head) + max(len(t) for t in tails) > model.settings.max_seq_len:
        raise MurmurError(f"canary {prefix!r} is longer than the model's context ({model.settings.max_seq_len})")
    scores = np.array([lp.sum() for lp in continuation_logprobs(model, head, tails, batch_size)])
    return exposure_from_scores(float(scores[0]), scores[1:])


def run_canaries(model, tokenizer, data_dir: str | Path, n_candidates: int, seed: int) -> list[dict]:
    """Exposure of every canary in `data_dir/canaries.json`, with how often it was planted."""
    out = []
    for canary in read_canaries(data_dir):
        # The planted text is prefix + separator + secret; data/canaries.json gives it whole.
        text = canary.get("text") or f"{canary['prefix']} {canary['secret']}"
        separator = text[len(canary["prefix"]):len(text) - len(canary["secret"])] \
            if text.startswith(canary["prefix"]) and text.endswith(canary["secret"]) else " "
        result = canary_exposure(model, tokenizer, canary["prefix"], canary["secret"], n_candidates, seed,
                                 separator=separator)
        out.append({"prefix": canary["prefix"], "secret": canary["secret"], "repeats": canary["repeats"],
                    "inserted": canary["inserted"], **result,
                    "extracted": greedy_extraction(model, tokenizer, canary["prefix"] + separator, canary["secret"])})
    return out


def greedy_extraction(model, tokenizer, prompt: str, secret: str) -> bool:
    """Does greedy decoding after `prompt` (as a post) write the secret? The attack exposure quantifies."""
    from murmur.infer.engine import Engine
    from murmur.infer.sampling import SamplingParams

    n_tokens = len(tokenizer.encode(" " + secret)) + 4
    engine = Engine(model, tokenizer, max_batch_size=1)
    # A trailing space would end the prompt on a token the model rarely saw there (BPE attaches spaces to
    # the next word), so the prompt stops before it and the continuation brings its own.
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt.rstrip())]
    room = engine.max_seq_len - n_tokens  # the prompt's tokens nearest the secret are the ones that count
    if room < 2:
        return False  # the secret cannot be written within this model's context at all
    ids = ids[-room:]
    completion = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=n_tokens))[0]
    return secret in completion.text


def scan_for_pii(texts: list[str], max_examples: int = 10, settings=None) -> dict:
    """Count the personal data in generated texts, by kind, with a few examples to look at.

    It is found by the data stage's detector (murmur.data.pii) with the data settings given (default: the
    default ones), so the scan flags exactly what the scrubber would have replaced."""
    from murmur.data.pii import PiiDetector
    from murmur.settings.data import DataSettings

    detector = PiiDetector.from_settings(settings or DataSettings())
    counts = {kind: 0 for kind in detector.kinds}
    examples = []
    flagged = 0
    for index, text in enumerate(texts):
        matches = detector.find(text)
        for match in matches:
            counts[match.kind] += 1
            if len(examples) < max_examples:
                examples.append({"text_index": index, "kind": match.kind, "match": text[match.start:match.end]})
        flagged += bool(matches)
    return {"texts": len(texts), "texts_with_pii": flagged, "matches": counts, "examples": examples}
