"""murmur.files: every writer's content and format, atomicity under a crash before the rename (the old file
stays, no temporary is left where readers look), fsync where durability is promised, and the call sites that
promise it (token manifest, deletion records, stats.json, checkpoints)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from murmur import files


class FsyncLog:
    """Records the path of every fsynced file descriptor, in order."""

    def wrote(self, directory: Path, name: str) -> bool:
        """Whether `name` in `directory` was fsynced, under its own name or a temporary one beside it."""
        return any(p.parent == directory and _is_written_as(p.name, name) for p in self.paths)

    def __init__(self, monkeypatch):
        self.paths: list[Path] = []
        real = os.fsync

        def fsync(fd):
            self.paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def _is_written_as(written: str, name: str) -> bool:
    return written in (name, f"{name}.tmp") or written.startswith(f".{name}.")


@pytest.fixture()
def fsyncs(monkeypatch) -> FsyncLog:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    return FsyncLog(monkeypatch)


def _table() -> pa.Table:
    return pa.table({"id": ["a", "b"], "n": [1, 2]})


# Each writer: (name, call writing `path`, check of what it wrote).
WRITERS = {
    "bytes": (lambda p, **kw: files.write_bytes_atomic(p, b"\x00new\xff", **kw),
              lambda p: p.read_bytes() == b"\x00new\xff"),
    "text": (lambda p, **kw: files.write_text_atomic(p, "nouveau ☕\n", **kw),
             lambda p: p.read_text(encoding="utf-8") == "nouveau ☕\n"),
    "json": (lambda p, **kw: files.write_json_atomic(p, {"b": 1, "a": ["é"]}, **kw),
             lambda p: json.loads(p.read_text(encoding="utf-8")) == {"b": 1, "a": ["é"]}),
    "table": (lambda p, **kw: files.write_table_atomic(_table(), p, **kw),
              lambda p: pq.read_table(p).equals(_table())),
    "path": (lambda p, **kw: files.write_atomic(p, lambda tmp: tmp.write_text("streamed"), **kw),
             lambda p: p.read_text() == "streamed"),
}


@pytest.mark.parametrize("kind", WRITERS)
def test_each_writer_replaces_the_file(tmp_path, kind):
    write, check = WRITERS[kind]
    path = tmp_path / "sub" / "out.file"  # a missing parent folder is created
    assert write(path) == path and check(path)
    path.write_text("old")
    write(path)
    assert check(path) and os.listdir(path.parent) == ["out.file"]


@pytest.mark.parametrize("kind", WRITERS)
def test_crash_before_the_rename_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, kind):
    write, check = WRITERS[kind]
    path = tmp_path / "out.file"
    path.write_bytes(b"old")

    def killed(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.file"]


def test_a_writer_failing_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.file"
    path.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.file"]


def test_temporary_names_are_hidden_and_beside_the_target(tmp_path):
    seen = []
    files.write_atomic(tmp_path / "x.json", lambda tmp: seen.append(tmp) or tmp.write_text("{}"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".x.json.") and seen[0].name.endswith(".tmp")


def test_json_format(tmp_path):
    """The one JSON format: indent 2, UTF-8 as is, the caller's key order, a final newline; no silent str()."""
    path = files.write_json_atomic(tmp_path / "a.json", {"z": 1, "a": {"é": [1, 2]}})
    assert path.read_text(encoding="utf-8") == '{\n  "z": 1,\n  "a": {\n    "é": [\n      1,\n      2\n    ]\n  }\n}\n'
    with pytest.raises(TypeError):
        files.write_json_atomic(tmp_path / "b.json", {"path": tmp_path})
    assert not (tmp_path / "b.json").exists() and os.listdir(tmp_path) == ["a.json"]


def test_text_mode_sets_permissions(tmp_path):
    path = files.write_text_atomic(tmp_path / "run.sh", "#!/bin/sh\n", mode=0o755)
    assert path.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("kind", WRITERS)
def test_durable_fsyncs_the_file_then_its_folder(tmp_path, fsyncs, kind):
    write, _ = WRITERS[kind]
    path = tmp_path / "out.file"
    write(path)
    assert fsyncs.paths == []  # not promised, not paid for
    write(path, durable=True)
    # The data before the rename (under its temporary name), the folder's new entry after it.
    assert len(fsyncs.paths) == 2 and fsyncs.paths[0].parent == tmp_path and fsyncs.paths[0].name.endswith(".tmp")
    assert fsyncs.paths[1] == tmp_path


def test_move_atomic(tmp_path, fsyncs):
    (tmp_path / "work").mkdir()
    staged = tmp_path / "work" / "posts.parquet"
    staged.write_text("new")
    (tmp_path / "posts.parquet").write_text("old")
    files.move_atomic(staged, tmp_path / "posts.parquet", durable=True)
    assert (tmp_path / "posts.parquet").read_text() == "new" and not staged.exists()
    assert fsyncs.paths == [staged, tmp_path]


def test_staged_dir_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "tokenizer"
    final.mkdir()
    (final / "old.json").write_text("{}")
    with files.staged_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tokenizer.")
        (tmp / "new.json").write_text("{}")
        assert os.listdir(final) == ["old.json"]  # untouched until the swap
    assert os.listdir(final) == ["new.json"] and os.listdir(tmp_path) == ["tokenizer"]


def test_staged_dir_failing_leaves_the_old_folder_and_nothing_else(tmp_path):
    final = tmp_path / "tokens"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    with pytest.raises(RuntimeError), files.staged_dir(final) as tmp:
        (tmp / "manifest.json").write_text("half")
        raise RuntimeError("tokenizer crashed")
    assert (final / "manifest.json").read_text() == "old" and os.listdir(tmp_path) == ["tokens"]


def test_staged_dir_crash_at_the_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == final and not Path(src).name.startswith(".model.old"):
            raise KeyboardInterrupt("killed at the swap")  # the new folder's rename; putting back the old works
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), files.staged_dir(final) as tmp:
        (tmp / "config.json").write_text("new")
    assert (final / "config.json").read_text() == "old" and os.listdir(tmp_path) == ["model"]


def test_durable_folder_swap_fsyncs_the_folder_and_its_parent(tmp_path, fsyncs):
    with files.staged_dir(tmp_path / "step", durable=True) as tmp:
        (tmp / "murmur.json").write_text("{}")
    assert fsyncs.paths == [tmp, tmp_path]


def test_remove_dir(tmp_path):
    doomed = tmp_path / "tokens"
    (doomed / "pretrain").mkdir(parents=True)
    (doomed / "pretrain" / "shard.bin").write_bytes(b"1")
    (tmp_path / "results.json").write_text("{}")
    files.remove_dir(doomed)
    files.remove_dir(doomed)  # already gone: nothing to do
    files.remove_dir(tmp_path / "results.json")  # a file goes the same way
    assert os.listdir(tmp_path) == []


# ---- the call sites that promise durability ----------------------------------------------------------------

def test_token_manifest_is_durable(tmp_path, fsyncs):
    from murmur.shards import MANIFEST, write_shards

    write_shards(tmp_path, [[1, 2, 3], [4, 5]], vocab_size=10, boundary_id=0)
    assert fsyncs.wrote(tmp_path, MANIFEST)
    assert fsyncs.paths[-1] == tmp_path  # the manifest's rename, last: it commits the shards before it


def test_deletion_records_and_stats_are_durable(tmp_path, fsyncs):
    from murmur.data import compliance

    data = tmp_path / "data"
    events = compliance.parse_deletion_events("post:1\naccount:u2\n", "list.txt")
    compliance.record_deletions(data, events)
    compliance.add_deleted_post_ids(data, ["7"])
    compliance.add_tombstones(data, [42])
    for name in (compliance.DELETIONS_FILE, compliance.DELETED_POSTS_FILE, compliance.TOMBSTONES_FILE):
        assert fsyncs.wrote(data, name)
    assert fsyncs.paths.count(data) == 3


def test_data_stage_stats_are_durable(tmp_path, fsyncs):
    from murmur.data.pipeline import run
    from murmur.settings.data import DataSettings

    source = tmp_path / "posts.jsonl"
    source.write_text("".join(json.dumps({"id": str(i), "author_id": f"u{i % 3}", "text": f"post number {i} here",
                                          "in_reply_to_id": str(i - 1) if i % 4 else None}) + "\n"
                              for i in range(12)))
    stats = run(DataSettings(sources=[f"jsonl:{source}"], min_turns=2), tmp_path / "data", progress=False)
    assert stats["in"] == 12
    assert fsyncs.wrote(tmp_path / "data", "stats.json") and fsyncs.paths[-1] == tmp_path / "data"


def test_checkpoint_metadata_and_latest_are_durable(tmp_path, fsyncs):
    import torch

    from murmur.train.checkpoint import LATEST, META_FILE, STATE_FILE, Checkpointer, step_name

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    saver = Checkpointer(tmp_path, keep=2)
    step_dir = saver.save(4, model, [optimizer], {"step": 4}, {"position": 12})
    assert step_dir.name == step_name(4) and json.loads((step_dir / META_FILE).read_text()) == {"step": 4}
    assert fsyncs.wrote(step_dir, META_FILE) or fsyncs.wrote(saver.dir / f".partial_{step_dir.name}", META_FILE)
    order = [name for p in fsyncs.paths for name in (STATE_FILE, META_FILE, LATEST) if _is_written_as(p.name, name)]
    assert order == [STATE_FILE, META_FILE, LATEST]
    assert fsyncs.paths[-1] == saver.dir  # `latest` moved last, and its folder entry flushed
