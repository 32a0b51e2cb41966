"""Benchmark: the data stage against a plain Python/pandas reference doing the same steps, in one run.

    .venv/bin/python bench/data_pipeline.py [--repeats 3] [--scales 1 10] [--fraction 1.0]

Input: the chitchat demo corpus (138,737 turns, each a post), and N copies of it with fresh ids for the
N x memory test (the copies' texts are duplicates, so the dedup state sees every one of them).
Both sides run in a fresh child process, one core each (workers=1), so that:
  posts per CPU-second  = records in / CPU seconds of the child: the per-core rate, robust to a shared machine
  peak memory           = the child's max RSS
Murmur:    murmur.data.pipeline.run (read, clean, scrub, filter, language, exact + MinHash LSH dedup, threads,
           split, Parquet out).
Reference: the same steps written the ordinary way: json -> pandas DataFrame, the same regexes via
           Series.str.replace, py3langid per row, drop_duplicates, datasketch MinHashLSH, groupby threads,
           DataFrame.to_parquet.
Prints medians over the repeats and the ratios Murmur / reference and 10x / 1x memory.
"""

from __future__ import annotations

import os
import sys

import argparse
import json
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def make_input(folder: Path, scale: int, fraction: float) -> Path:
    """`scale` copies of (a fraction of) the chitchat corpus, each conversation id suffixed by its copy."""
    from murmur.data.sources import chitchat_path

    corpus = json.loads(chitchat_path().read_text())
    keys = list(corpus)[: max(1, int(len(corpus) * fraction))]
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(scale):
        (folder / f"copy{copy:02d}.json").write_text(json.dumps({f"{k}-{copy}": corpus[k] for k in keys}))
    return folder


# -- children ---------------------------------------------------------------------------------------------

def child_murmur(folder: Path, out: Path) -> int:
    from murmur.data.pipeline import run
    from murmur.settings.data import DataSettings

    stats = run(DataSettings(sources=[f"chitchat:{folder}/*.json"], workers=1), out, progress=False)
    return stats["in"]


def child_reference(folder: Path, out: Path) -> int:
    """The same steps, the way one writes them first: everything in a DataFrame, row-wise Python."""
    import hashlib
    import html
    import re
    import unicodedata

    import pandas as pd
    from datasketch import MinHash, MinHashLSH
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from murmur.data import clean as c
    from murmur.data.pii import PiiDetector
    from murmur.settings.data import DataSettings

    rows = []
    for path in sorted(folder.glob("*.json")):
        for key, conv in json.loads(path.read_text()).items():
            previous = None
            for i, turn in enumerate(conv["messages"]):
                text = "\n".join(u.get("text") or "" for u in turn).strip()
                rows.append({"id": f"{key}-{i}", "author_id": turn[0]["sender"] if turn else "", "text": text,
                             "created_at": turn[0]["timestamp"] if turn else None, "conversation_id": key,
                             "in_reply_to_id": previous})
                previous = f"{key}-{i}"
    n_in = len(rows)
    df = pd.DataFrame(rows)
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
    t = df["text"].map(html.unescape).map(lambda s: unicodedata.normalize("NFC", s))
    t = t.str.replace(c.CONTROL_RE, "", regex=True).str.replace(c.URL_RE, "<url>", regex=True)
    # Personal data: checksums, ipaddress and phonenumbers have no vectorised form, so the same detector per row.
    detector = PiiDetector.from_settings(DataSettings())
    t = t.map(lambda s: detector.scrub(s)[0])
    t = t.str.replace(c.MENTION_RE, "@user", regex=True).str.replace(c.SPACES_RE, " ", regex=True)
    df["text"] = t.str.replace(c.BLANK_LINES_RE, "\n", regex=True).str.strip()
    n = df["text"].str.len()
    df = df[(n >= 2) & (n <= 2000)]
    df = df[df["text"].str.count(r"(?<!\w)#\w+") <= 5]
    df = df[~df["text"].str.contains(r"(.)\1{11,}", regex=True)]
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def foreign(s: str) -> bool:
        if len(s) < 20:
            return False
        lang, p = identifier.classify(s)
        return lang != "en" and p >= 0.9

    df = df[~df["text"].map(foreign)]
    df["norm"] = df["text"].str.casefold().str.replace(r"[\W_]+", "", regex=True)
    long = df["norm"].str.len() >= 20
    df = df.sort_values(["created_at", "id"], kind="stable")
    df = df[~(long & df.duplicated("norm"))]
    lsh = MinHashLSH(num_perm=128, params=(16, 8))
    drop = []
    for pid, text, is_long in zip(df["id"], df["text"], long.loc[df.index]):
        if not is_long:
            continue
        s = re.sub(r"\s+", " ", text.casefold())
        m = MinHash(num_perm=128)
        m.update_batch([s[i:i + 5].encode() for i in range(max(1, len(s) - 4))])
        if lsh.query(m):
            drop.append(pid)
        else:
            lsh.insert(pid, m)
    df = df[~df["id"].isin(set(drop))].sort_index()
    kept = set(df["id"])
    df["in_reply_to_id"] = df["in_reply_to_id"].where(df["in_reply_to_id"].isin(kept))
    parent = dict(zip(df["id"], df["in_reply_to_id"]))

    def root(pid):
        while isinstance(parent.get(pid), str):
            pid = parent[pid]
        return pid

    def split(root_id: str) -> str:
        u = int.from_bytes(hashlib.blake2b(root_id.encode(), digest_size=8).digest(), "little") / 2**64
        return "validation" if u < 0.05 else "test" if u < 0.1 else "train"

    df["root_id"] = df["id"].map(root)
    df["split"] = df["root_id"].map(split)
    conversations = []
    for root_id, group in df.groupby("root_id", sort=False):
        turns = []
        for author, text, pid in zip(group["author_id"], group["text"], group["id"]):
            if turns and turns[-1]["author"] == author:
                turns[-1]["text"] += "\n" + text
                turns[-1]["post_ids"].append(pid)
            else:
                turns.append({"author": author, "text": text, "post_ids": [pid]})
        for start in range(0, len(turns), 32):
            piece = turns[start:start + 32]
            if len(piece) >= 2:
                names = {}
                conversations.append({"root_id": root_id, "split": group["split"].iloc[0], "turns": [
                    {"speaker": names.setdefault(t["author"], f"user{len(names) + 1}"), "text": t["text"],
                     "post_ids": t["post_ids"]} for t in piece]})
    out.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["norm"]).to_parquet(out / "posts.parquet")
    pd.DataFrame(conversations).to_parquet(out / "conversations.parquet")
    return n_in


def run_child(kind: str, folder: Path, out: Path) -> dict:
    """Run one side in a fresh process; its records in, CPU seconds, wall seconds and peak RSS."""
    command = [sys.executable, __file__, "--child", kind, "--input", str(folder), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--fraction", type=float, default=1.0, help="part of the corpus to use (1.0 = all)")
    parser.add_argument("--child", choices=["murmur", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        wall = time.perf_counter()
        n = (child_murmur if args.child == "murmur" else child_reference)(args.input, args.out)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"in": n, "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - wall,
                          "peak_mb": usage.ru_maxrss / 1024}))
        return

    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            folder = make_input(Path(tmp) / f"x{scale}", scale, args.fraction)
            repeats = args.repeats if scale == args.scales[0] else 1  # the large input once: it is for memory
            for repeat in range(repeats):
                for kind in ("murmur", "reference"):
                    out = Path(tmp) / f"out-{kind}-{scale}-{repeat}"
                    result = run_child(kind, folder, out)
                    results.setdefault((kind, scale), []).append(result)
                    print(f"  {kind:<9} x{scale:<3} repeat {repeat}: {result['in']:,} posts, {result['cpu_s']:.1f} CPU s, "
                          f"{result['wall_s']:.1f} wall s, peak {result['peak_mb']:.0f} MB", flush=True)

    def median(kind, scale, key):
        return statistics.median(r[key] for r in results[(kind, scale)])

    print(f"\ndata pipeline, chitchat corpus x fraction {args.fraction}, one core each, medians of "
          f"{args.repeats} at x{args.scales[0]}")
    print(f"{'':<10}{'scale':>6}{'posts/CPU-s':>14}{'peak MB':>10}")
    for scale in args.scales:
        for kind in ("murmur", "reference"):
            rate = median(kind, scale, "in") / median(kind, scale, "cpu_s")
            print(f"{kind:<10}{'x' + str(scale):>6}{rate:>14,.0f}{median(kind, scale, 'peak_mb'):>10,.0f}")
    base = args.scales[0]
    speed = (median("murmur", base, "in") / median("murmur", base, "cpu_s")) / \
        (median("reference", base, "in") / median("reference", base, "cpu_s"))
    print(f"\nspeed ratio murmur/reference (posts per CPU-second, x{base}): {speed:.2f}x")
    for scale in args.scales[1:]:
        for kind in ("murmur", "reference"):
            growth = median(kind, scale, "peak_mb") / median(kind, base, "peak_mb")
            print(f"memory x{scale}/x{base} {kind}: {growth:.2f}x")
        print(f"peak memory at x{scale}, murmur/reference: "
              f"{median('murmur', scale, 'peak_mb') / median('reference', scale, 'peak_mb'):.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
