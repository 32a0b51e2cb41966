"""Reading a folder a user handed in without leaving it: no `..`, no absolute names, no links out.

A model directory, a run folder or a checkpoint may come from someone else. File names written inside
it (an index's shard names, a DCP index's data files, a `latest` pointer) and symbolic links under it
must not make Murmur read, or copy into an export, a file elsewhere on the machine (a key, a device
that never ends). Every such file is resolved and must land inside the folder's root.

One layout is allowed to link outside its snapshot folder: the Hugging Face hub cache
(`models--ORG--NAME/snapshots/REV/` whose files link to `../../blobs/`), which is how `hf:ORG/NAME`
models arrive. Its root is the `models--ORG--NAME` folder.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from murmur.errors import MurmurError


def folder_root(directory: str | Path) -> Path:
    """The resolved folder that files read from `directory` must stay inside."""
    directory = Path(directory).resolve()
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--") \
            and (directory.parent.parent / "blobs").is_dir():
        return directory.parent.parent
    return directory


def confined(root: Path, path: str | Path, what: str) -> Path:
    """`path` resolved (links followed), provided it stays inside `root`; `what` names it in the error."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a link loop, a NUL byte
        raise MurmurError(f"{what} ({path}) cannot be resolved: {err}") from None
    if not resolved.is_relative_to(root):
        raise MurmurError(f"{what} ({path}) leads to {resolved}, outside {root}; Murmur reads only files inside "
                          "the folder it was given. Copy the file in (cp -L) if you trust it")
    return resolved


def relative_name(name: object, what: str) -> str:
    """A file name read from a file (an index, a pointer): a relative path with no `..`, or an error."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise MurmurError(f"{what} names {str(name)[:200]!r}, which is not a file name")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise MurmurError(f"{what} names {name[:200]!r}; a file name there must be relative to its folder, without '..'")
    return name
