"""Benchmark: the data stage at 1x, 10x and 100x on the local and the Ray executor.

    .venv/bin/python bench/data_scale.py [--base 10000] [--scales 1 10 100] [--cpus 2] [--executors local ray]

Input, made here (nothing downloaded): synthetic X API posts, `base` x scale of them (100x of the default base
is 10^6 posts), in JSONL files of 20,000 posts: reply threads of 2 to 6 posts between a few authors, exact
duplicates (5 %, reposted by another account), near duplicates (5 %, one word changed), and posts in English,
French, German and Spanish (the default recipe keeps English), from word lists so that texts differ.
Each run is a fresh child process with `--cpus` CPUs: the local executor's pool of that many workers, or a local
Ray instance of that many CPUs (started before the clock, as a cluster would be). Measured:
  posts/s per core   records in / wall seconds of the stage / cpus
  driver peak RSS    the child's (the driver's) max RSS; Ray's workers and object store are other processes
Prints both per scale and the ratios the issue sets targets for: the Ray driver's peak RSS at the largest scale
over the smallest (target <= 1.2) and Ray's posts/s per core over the local executor's at the largest scale
(target >= 0.8).

    .venv/bin/python bench/data_scale.py --graph 1 20 40

instead measures Ray's own cost of the global step's shape, without data: 20 shuffles of P mappers and P
reducers (the stage's retries and system config), each in a fresh driver, its peak RSS. Shape `objects` hands
tables over as Ray objects (each mapper returns P of 2 kB, each reducer is given one of every mapper: P x P
references a shuffle); shape `files` is the stage's (each mapper returns one small summary, reducers are told
which files to read). Both keep every reference until the end, as a driver that held them all would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = {
    "en": "morning coffee train station rain garden weekend friends music dinner movie kitchen bicycle office "
          "window river summer winter city street market bread letter phone evening holiday".split(),
    "fr": "matin café gare pluie jardin semaine amis musique dîner film cuisine vélo bureau fenêtre rivière "
          "été hiver ville rue marché pain lettre soir vacances".split(),
    "de": "Morgen Kaffee Bahnhof Regen Garten Wochenende Freunde Musik Abendessen Film Küche Fahrrad Büro "
          "Fenster Fluss Sommer Winter Stadt Straße Markt Brot Brief Abend Urlaub".split(),
    "es": "mañana café estación lluvia jardín semana amigos música cena película cocina bicicleta oficina "
          "ventana río verano invierno ciudad calle mercado pan carta tarde vacaciones".split(),
}
JOINERS = {"en": "the and with after before about".split(), "fr": "le la et avec après avant".split(),
           "de": "der die und mit nach vor".split(), "es": "el la y con después antes".split()}
POSTS_PER_FILE = 20_000


def make_posts(folder: Path, n: int, seed: int = 0) -> None:
    """`n` synthetic posts in JSONL files: threads, duplicates, near duplicates, four languages."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, file_index, out = 0, 0, None
    recent: list[tuple[str, str]] = []
    while written < n:
        if out is None or written % POSTS_PER_FILE == 0:
            if out:
                out.close()
            out = open(folder / f"posts-{file_index:05d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            file_index += 1
        lang = rng.choices(["en", "fr", "de", "es"], weights=[70, 10, 10, 10])[0]
        root = f"{seed}{written:012d}"
        thread = rng.randint(2, 6) if rng.random() < 0.4 else 1
        authors = [f"a{rng.randrange(n // 20 + 1)}" for _ in range(2)]
        parent = None
        for depth in range(thread):
            if written >= n:
                break
            post_id = f"{seed}{written:012d}"
            roll = rng.random()
            if recent and roll < 0.05:  # another account reposts a text word for word
                text = rng.choice(recent)[1]
            elif recent and roll < 0.10:  # a near duplicate: one word changed
                words = rng.choice(recent)[1].split()
                words[rng.randrange(len(words))] = rng.choice(WORDS[lang])
                text = " ".join(words)
            else:
                text = " ".join(rng.choice(WORDS[lang] if i % 3 else JOINERS[lang])
                                for i in range(rng.randint(8, 20)))
            tweet = {"id": post_id, "text": text, "author_id": authors[depth % 2], "lang": lang,
                     "created_at": f"2024-{1 + written % 12:02d}-{1 + written % 28:02d}T{written % 24:02d}:00:00Z",
                     "conversation_id": root}
            if parent:
                tweet["referenced_tweets"] = [{"type": "replied_to", "id": parent}]
            out.write(json.dumps(tweet, ensure_ascii=False) + "\n")
            recent.append((post_id, text))
            if len(recent) > 200:
                recent.pop(0)
            parent = post_id
            written += 1
    out.close()


def child(executor: str, folder: Path, out: Path, cpus: int) -> dict:
    from murmur.data.pipeline import run
    from murmur.settings.data import DataSettings

    settings = DataSettings(sources=[f"x-api:{folder}/*.jsonl"], executor=executor, workers=cpus)
    if executor == "ray":
        import ray

        from murmur.data.distributed.driver import connect

        connect(settings)  # as the stage would start it, before the clock (a cluster is up before a run)
    started = time.perf_counter()
    stats = run(settings, out, progress=False)
    wall = time.perf_counter() - started
    if executor == "ray":
        ray.shutdown()
    return {"in": stats["in"], "kept": stats["kept"], "wall_s": wall,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def graph_child(shape: str, parts: int, cpus: int) -> dict:
    import ray

    from murmur.data.distributed.driver import SYSTEM_CONFIG, TASK_RETRIES

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config=SYSTEM_CONFIG)

    @ray.remote(max_retries=TASK_RETRIES)
    def mapper(n_out: int):
        return [b"x" * 2048] * n_out if n_out > 1 else b"x" * 2048

    @ray.remote(max_retries=TASK_RETRIES)
    def summary(parts: int):
        return [0] * parts  # rows per destination, as a mapper that wrote its file might say

    @ray.remote(max_retries=TASK_RETRIES)
    def reducer(*inputs):
        return len(inputs)

    held = []
    started = time.perf_counter()
    for step in range(20):
        if shape == "objects":
            outs = [mapper.options(num_returns=parts).remote(parts) for _ in range(parts)]
            outs = [out if parts > 1 else [out] for out in outs]
            reducers = [reducer.remote(*[out[j] for out in outs]) for j in range(parts)]
        else:
            outs = [summary.remote(parts) for _ in range(parts)]
            ray.get(outs)
            reducers = [reducer.remote(f"step-{step}", j, 0, parts) for j in range(parts)]
        ray.get(reducers)
        held += [outs, reducers]
    wall = time.perf_counter() - started
    ray.shutdown()
    return {"wall_s": wall, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def graphs(partitions: list[int], cpus: int) -> None:
    for shape in ("objects", "files"):
        for parts in partitions:
            command = [sys.executable, __file__, "--graph-child", shape, "--cpus", str(cpus), "--graph", str(parts)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"graph {shape} at P={parts} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {shape:<8} P={parts:<3} {result['wall_s']:6.1f} s  driver peak {result['peak_mb']:5.0f} MB  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)


def run_child(executor: str, folder: Path, out: Path, cpus: int) -> dict:
    command = [sys.executable, __file__, "--child", executor, "--input", str(folder), "--out", str(out),
               "--cpus", str(cpus)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{executor} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=10_000, help="posts at 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--executors", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--graph", type=int, nargs="+", metavar="P",
                        help="only measure Ray's cost of the shuffles' shape at these partition counts")
    parser.add_argument("--child", choices=["local", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--graph-child", choices=["objects", "files"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.input, args.out, args.cpus)))
        return
    if args.graph_child:
        print(json.dumps(graph_child(args.graph_child, args.graph[0], args.cpus)))
        return
    if args.graph:
        print(f"load average before: {os.getloadavg()[0]:.1f}; {args.cpus} CPUs per Ray", flush=True)
        graphs(args.graph, args.cpus)
        return

    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.cpus} CPUs per run",
          flush=True)
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            folder = Path(tmp) / f"x{scale}"
            make_posts(folder, args.base * scale)
            for executor in args.executors:
                result = run_child(executor, folder, Path(tmp) / f"out-{executor}-{scale}", args.cpus)
                result["per_core"] = result["in"] / result["wall_s"] / args.cpus
                results[(executor, scale)] = result
                print(f"  {executor:<6} x{scale:<4} {result['in']:>10,} posts  {result['wall_s']:8.1f} s  "
                      f"{result['per_core']:>8,.0f} posts/s/core  driver peak {result['peak_mb']:7.0f} MB  "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
            for path in folder.glob("*"):
                path.unlink()
    low, high = args.scales[0], args.scales[-1]
    if ("ray", high) in results:
        growth = results[("ray", high)]["peak_mb"] / results[("ray", low)]["peak_mb"]
        print(f"\nRay driver peak RSS x{high}/x{low}: {growth:.2f} (target <= 1.2)")
    if ("ray", high) in results and ("local", high) in results:
        ratio = results[("ray", high)]["per_core"] / results[("local", high)]["per_core"]
        print(f"Ray/local posts per second per core at x{high}: {ratio:.2f} (target >= 0.8)")
    if ("local", high) in results:
        growth = results[("local", high)]["peak_mb"] / results[("local", low)]["peak_mb"]
        print(f"local driver peak RSS x{high}/x{low}: {growth:.2f} (its global step holds ~200 bytes a post)")


if __name__ == "__main__":
    main()
