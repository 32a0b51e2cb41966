"""Benchmark: the cleaner with the personal-data scrubber, on chat text, on digit-heavy text, on hostile records.

    .venv/bin/python bench/pii_scrub.py [--repeats 3] [--old murmur/data/clean.py of an older commit]

Chat:        the chitchat demo corpus (138,737 turns, each a post); few have a run of 7+ digits.
Digit-heavy: posts that all hold phone numbers, IPs, cards, IBANs, SSNs, dates or order ids.
Hostile:     64 KiB records of digit soup, IPs, cards and the like, the most work one record can ask for.
Posts per CPU-second (robust on a shared machine), best of the repeats. With --old FILE (for example
`git show dd53b5c:murmur/data/clean.py > /tmp/old_clean.py`), the same for that cleaner, with the kinds it knew.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time

from murmur.data.clean import Cleaner
from murmur.data.records import Post
from murmur.data.sources import chitchat_path
from murmur.settings.data import DataSettings


def chat_posts() -> list[Post]:
    data = json.loads(chitchat_path().read_text(encoding="utf-8"))
    texts = ["\n".join(u.get("text") or "" for u in turn) for conv in data.values() for turn in conv["messages"]]
    return [Post(id=str(i), author_id="a", text=t, source="bench") for i, t in enumerate(texts)]


def digit_heavy_posts(n: int = 5000) -> list[Post]:
    rng = random.Random(0)
    texts = ["call me on 020 7946 0958 tonight", "the 2018 2019 2020 seasons went 3-2, 4-1",
             "order #112-4456789-1234567 arrived on 13.10.2017 at 12:30",
             "my ip is 2001:db8::1 and card 4111 1111 1111 1111", "ssn 123-45-6789, iban DE89370400440532013000",
             "ping 10.0.0.1 from +1 415 555 0132 ok"]
    return [Post(id=str(i), author_id="a", text=rng.choice(texts), source="bench") for i in range(n)]


def hostile_posts() -> list[Post]:
    texts = ["212 736 5000 " * 5000, "call 212-736-5000, " * 5000, "1 " * 32000, "10.1.2.3 " * 7000,
             "GB82 WEST 1234 5698 7654 33 " * 2300, "4111 1111 1111 1111 " * 3200, "123-45-6789 " * 5400,
             "2001:db8::1 " * 5400, "abc 1234567 " * 5000, "12 345 " * 9000]
    return [Post(id=str(i), author_id="a", text=t[:65536], source="bench") for i, t in enumerate(texts)]


def rate(cleaner, posts: list[Post], repeats: int) -> tuple[float, float]:
    """Best posts per CPU-second over the repeats, and the slowest single post (CPU seconds)."""
    best, slowest = 0.0, 0.0
    for _ in range(repeats):
        start = time.process_time()
        for post in posts:
            before = time.process_time()
            cleaner.clean(post)
            slowest = max(slowest, time.process_time() - before)
        best = max(best, len(posts) / max(time.process_time() - start, 1e-9))
    return best, slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", help="an older murmur/data/clean.py to compare with")
    args = parser.parse_args()
    cleaners = {"now": Cleaner(DataSettings())}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_clean", args.old)
        old = importlib.util.module_from_spec(spec)
        sys.modules["old_clean"] = old
        spec.loader.exec_module(old)
        cleaners["old"] = old.Cleaner(DataSettings(scrub=["email", "phone", "card", "ip"]))
    for name, posts in (("chat", chat_posts()), ("digit-heavy", digit_heavy_posts()), ("hostile", hostile_posts())):
        for label, cleaner in cleaners.items():
            per_second, slowest = rate(cleaner, posts, args.repeats)
            print(f"{name:12s} {label:4s} {len(posts):7d} posts  {per_second:9.0f} posts/CPU-s  "
                  f"slowest post {slowest * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
