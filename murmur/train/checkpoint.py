"""Training checkpoints: torch.distributed.checkpoint (DCP) step folders, written atomically.

Layout of a stage folder's `checkpoints/`:

    step_00000500/   DCP files (.metadata, __R_N.distcp), murmur.json, train_state.json
    step_00001000/
    latest           text file naming the newest complete step folder; moved last

Every process writes its own shards into `.partial_step_NNNNNNNN/`; when all are done, rank 0 adds
`murmur.json` (model settings, stage, step, tokens, tokenizer folder) and `train_state.json` (loader
positions and RNG states of every rank, as JSON), renames the folder to its final name and only then
moves `latest`. A process killed at any point leaves the previous `latest` complete and loadable.
DCP reshards on load, so a checkpoint written by N processes resumes on M.

Loading never unpickles arbitrary objects: DCP's metadata is read with an unpickler that admits an
exact list of DCP's own records, and non-tensor entries load with `torch.load(weights_only=True)`.
A checkpoint may come from someone else: every file it names stays inside the folder given, and its
settings are checked against the index before any weight is allocated.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from murmur.confine import confined, relative_name
from murmur.errors import MurmurError
from murmur.files import replace_dir, write_json_atomic, write_text_atomic
from murmur.model import Transformer
from murmur.settings.model import ModelSettings
from murmur.train.lora import apply_lora, is_adapter_name, lora_settings_from_meta, merge_lora

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META_FILE = "murmur.json"
STATE_FILE = "train_state.json"
PARTIAL_PREFIX = ".partial_"


@contextmanager
def _quiet():
    """DCP warns on every save and load in one process without a process group: a normal way to train."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# --- safe loading -------------------------------------------------------------------------------

# Exactly the globals a DCP `.metadata` written by torch 2.13 refers to (listed from real checkpoints
# with pickletools), plus the torch dtypes. A name is looked up as written, so a dotted name (which
# pickle would walk attribute by attribute, e.g. metadata -> os -> system) never matches.
_METADATA_RECORDS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}
_TORCH_DTYPES = {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records, torch dtypes and sizes; refuses every other global."""

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if (module, name) in _METADATA_RECORDS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never "
                                     "needs; refusing to load it")


def _check_index(metadata: Any, step_dir: Path) -> None:
    """The index is DCP's, and every data file it names is a file inside the step folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, TensorProperties,
                                                       TensorStorageMetadata)

    where = step_dir / ".metadata"
    entries, storage = getattr(metadata, "state_dict_metadata", None), getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(entries, dict) or not isinstance(storage, dict):
        raise MurmurError(f"{where} is not a DCP checkpoint index ({type(metadata).__name__}); "
                          "the checkpoint is corrupt or was not written by Murmur")
    for fqn, entry in entries.items():
        tensor_entry = isinstance(entry, TensorStorageMetadata) and isinstance(entry.size, torch.Size) \
            and isinstance(entry.properties, TensorProperties) and isinstance(entry.properties.dtype, torch.dtype)
        if not isinstance(fqn, str) or not (tensor_entry or isinstance(entry, BytesStorageMetadata)):
            raise MurmurError(f"{where} describes {str(fqn)[:200]!r} with a malformed record; the checkpoint is corrupt")
    names = set()
    for info in storage.values():
        if not isinstance(info, _StorageInfo) or type(getattr(info, "offset", None)) is not int \
                or type(getattr(info, "length", None)) is not int or info.offset < 0 or info.length < 0:
            raise MurmurError(f"{where} holds a malformed storage entry; the checkpoint is corrupt")
        names.add(relative_name(getattr(info, "relative_path", None), str(where)))
    root = step_dir.resolve()
    for name in names:
        confined(root, step_dir / name, f"data file of {where}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, reading `.metadata` with the restricted unpickler and only files in its folder."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        step_dir = Path(self.path)
        path = confined(step_dir.resolve(), step_dir / ".metadata", "checkpoint index")
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except OSError as err:
            raise MurmurError(f"{path} cannot be read: {err}") from None
        except Exception as err:  # find_class admits only DCP's records: anything else is a malformed file
            raise MurmurError(f"{path} is not a readable checkpoint index: {type(err).__name__}: {err}") from None
        _check_index(metadata, step_dir)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, loading non-tensor entries (optimizer hyper-parameters) with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _check_model_fits(metadata: Any, model: nn.Module, step_dir: Path) -> None:
    """Before any weight is allocated: the index holds each of `model`'s (meta) tensors at the shape the
    settings imply, and its data files are at least as large as those tensors, so neither murmur.json nor
    the index can ask for more memory than the checkpoint holds."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # A tied head shares the embedding's storage: count its bytes once.
    shared = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    claimed = 0
    for name, tensor in model.state_dict().items():
        entry = metadata.state_dict_metadata.get(f"model.{name}")
        if not isinstance(entry, TensorStorageMetadata):
            raise MurmurError(f"{step_dir} holds no tensor model.{name}, which {META_FILE}'s model settings need")
        if tuple(entry.size) != tuple(tensor.shape):
            raise MurmurError(f"{step_dir / META_FILE} implies model.{name} of shape {tuple(tensor.shape)}, the "
                              f"checkpoint holds {tuple(entry.size)}; the settings do not belong to these weights")
        if name not in shared:
            claimed += tensor.numel() * entry.properties.dtype.itemsize
    files = {info.relative_path for info in metadata.storage_data.values()}
    held = sum((step_dir / name).stat().st_size for name in files if (step_dir / name).is_file())
    if claimed > held:
        raise MurmurError(f"{step_dir / '.metadata'} claims {claimed} bytes of weights, its data files hold {held} "
                          "bytes; the checkpoint is corrupt or truncated")


def _dcp_load(state: dict, path: Path) -> None:
    if not (Path(path) / ".metadata").is_file():
        raise MurmurError(f"{path} has no DCP index (.metadata); the checkpoint is incomplete")
    SafeFileSystemReader(str(path)).read_metadata()  # refuse a hostile index here, with a plain message
    try:
        with _quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except MurmurError:
        raise
    except Exception as err:  # DCP wraps per-rank failures in CheckpointException
        raise MurmurError(f"could not load checkpoint {path}: {str(err).splitlines()[0][:300]}") from None


# --- finding checkpoints -------------------------------------------------------------------------

def latest_step_dir(checkpoints_dir: Path) -> Path | None:
    """The step folder `latest` names, or None when there is no complete checkpoint."""
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise MurmurError(f"{pointer} names {name[:200]!r}; `latest` must name a step folder beside it")
    target = Path(checkpoints_dir) / name
    if not (target / META_FILE).is_file():
        raise MurmurError(f"{pointer} names {target.name}, which is not a complete checkpoint; "
                          "delete the pointer to start over, or point it at an existing step folder")
    return target


def resolve_step_dir(path: str | Path) -> Path | None:
    """The step folder a path means: a step folder, a checkpoints folder, a stage folder or a run folder
    (its sft/ checkpoint before its pretrain/ one); None when it holds no checkpoint. The folder found may
    lie outside `path` (a link): `step_dir_of` also confines it."""
    path = Path(path)
    if (path / META_FILE).is_file() and (path / ".metadata").is_file():
        return path
    for candidate in (path, path / CHECKPOINTS, path / "sft" / CHECKPOINTS, path / "pretrain" / CHECKPOINTS):
        if (candidate / LATEST).is_file():
            return latest_step_dir(candidate)
    return None


def is_checkpoint_source(path: str | Path) -> bool:
    """True when `path` is a Murmur run folder, stage folder or step folder holding a checkpoint."""
    try:
        return Path(path).is_dir() and resolve_step_dir(Path(path)) is not None
    except MurmurError:
        return True  # it is one, but broken: let the loader say how


def step_dir_of(path: str | Path) -> Path:
    """The step folder of the checkpoint `path` names (run, stage, checkpoints or step folder), which must lie
    inside `path`: a checkpoint from elsewhere may not lead out of itself through a link."""
    step_dir = resolve_step_dir(Path(path))
    if step_dir is None:
        raise MurmurError(f"{path} holds no Murmur checkpoint (no checkpoints/latest or step folder)")
    confined(Path(path).resolve(), step_dir, "checkpoint step folder")
    return step_dir


def read_meta(step_dir: Path) -> dict[str, Any]:
    """A step folder's murmur.json (model settings, stage, step, tokens, tokenizer folder, training section)."""
    try:
        meta = json.loads((Path(step_dir) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MurmurError(f"{Path(step_dir) / META_FILE} is not readable JSON: {err}") from None
    if not isinstance(meta, dict):
        raise MurmurError(f"{Path(step_dir) / META_FILE} must hold a JSON object (found a {type(meta).__name__})")
    return meta


def model_settings(step_dir: Path, meta: dict[str, Any]) -> ModelSettings:
    """The model settings a step folder's murmur.json (`meta`) stores, validated."""
    try:
        return ModelSettings.model_validate(meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise MurmurError(f"{Path(step_dir) / META_FILE} has no valid model settings: {err}") from None


def tokenizer_dir(step_dir: Path, meta: dict[str, Any]) -> Path | None:
    """The tokenizer folder named in a step folder's murmur.json (`meta`): relative to the run folder when it
    was inside it, else as written; None when it names none or the folder holds no tokenizer.json."""
    name = meta.get("tokenizer_dir")
    if not name:
        return None
    if not isinstance(name, str) or "\0" in name:
        raise MurmurError(f"{Path(step_dir) / META_FILE}: tokenizer_dir must name a folder, found {name!r:.200}")
    run_dir = Path(step_dir).parent.parent.parent  # run/stage/checkpoints/step
    for candidate in (run_dir / name, Path(name)):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def load_model_weights(model: nn.Module, step_dir: Path) -> None:
    """Load only the weights of a checkpoint into `model` (plain or sharded), e.g. to start SFT.

    LoRA adapters of `model` are not in the checkpoint it adapts: they keep their initial values. A checkpoint
    that holds adapters itself is refused, since loading its base alone would silently drop them."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)

    meta = read_meta(step_dir)
    if lora_settings_from_meta(meta.get("train"), str(Path(step_dir) / META_FILE)):
        raise MurmurError(f"{step_dir} was finetuned with LoRA; export it merged (`murmur export {step_dir} --out "
                          "DIR`) and start from DIR instead")
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if not is_adapter_name(k)}}
    _dcp_load(state, step_dir)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                       merge_adapters: bool = True) -> tuple[Transformer, ModelSettings, Path | None]:
    """The model of a checkpoint (run, stage or step folder), its settings and its tokenizer folder.

    A LoRA-finetuned checkpoint comes with its adapters merged into the weights, or kept as adapters
    (murmur/train/lora.py) with merge_adapters=False."""
    step_dir = step_dir_of(path)
    meta = read_meta(step_dir)
    settings = model_settings(step_dir, meta)
    metadata = SafeFileSystemReader(str(step_dir)).read_metadata()
    # Building even a meta model costs memory per layer: check the layer count against the index first.
    stored_layers = {name.split(".")[2] for name in metadata.state_dict_metadata if name.startswith("model.layers.")}
    if len(stored_layers) != settings.n_layers or stored_layers != {str(i) for i in range(settings.n_layers)}:
        raise MurmurError(f"{step_dir / META_FILE} says n_layers={settings.n_layers}, the checkpoint holds "
                          f"{len(stored_layers)} layers; the settings do not belong to these weights")
    try:
        with torch.device("meta"):
            model = Transformer(settings)
    except (RuntimeError, ValueError, OverflowError) as err:
        raise MurmurError(f"{step_dir / META_FILE}: the model settings describe no buildable model: {err}") from None
    adapters = lora_settings_from_meta(meta.get("train"), str(step_dir / META_FILE))
    if adapters:  # checked against the index like every other tensor, before any memory is given
        apply_lora(model, adapters)
    _check_model_fits(metadata, model, step_dir)
    model.to_empty(device="cpu")
    model.init_weights()  # reties shared weights and rebuilds rope; the values are replaced below
    state = {"model": model.state_dict()}
    _dcp_load(state, step_dir)
    model.load_state_dict(state["model"])
    if adapters and merge_adapters:
        merge_lora(model)
    model.to(device=device, dtype=dtype)
    model.init_rope()
    return model.eval(), settings, tokenizer_dir(step_dir, meta)


# --- JSON-safe RNG states ------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON (byte tensors in base64)."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# --- saving and resuming -------------------------------------------------------------------------

def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather_json(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _model_parts(model: nn.Module | list[nn.Module], optimizers: list) -> list[tuple[nn.Module, list]]:
    """(module, its optimizers) pairs: one model and its optimizers, or pipeline stages and a list per stage."""
    if isinstance(model, nn.Module):
        return [(model, optimizers)]
    return list(zip(model, optimizers, strict=True))


def _training_state(parts: list[tuple[nn.Module, list]]) -> tuple[dict[str, Any], list[tuple[list, list]]]:
    """{"model", "optim"} of every part, keyed by the whole model's parameter names, and each part's keys.

    The optimizer state is flattened to one entry per parameter name (hyper-parameters included), so a
    checkpoint holds the same keys whatever the parallel layout, pipeline stages included, and reshards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    state: dict[str, Any] = {"model": {}, "optim": {}}
    keys = []
    for module, optimizers in parts:
        model_state, optim_state = get_state_dict(module, optimizers, options=options)
        state["model"].update(model_state)
        state["optim"].update(optim_state)
        keys.append((list(model_state), list(optim_state)))
    return state, keys


class Checkpointer:
    """Saves and restores a stage's training state under `stage_dir/checkpoints`, keeping the last `keep`."""

    def __init__(self, stage_dir: Path, keep: int, async_save: bool = False):
        self.dir = Path(stage_dir) / CHECKPOINTS
        self.keep = keep
        self.async_save = async_save
        self._pending = None  # (future, finalize) of an asynchronous save in flight

    def latest(self) -> Path | None:
        return latest_step_dir(self.dir)

    def clean_partial(self) -> None:
        """Remove step folders a killed process left half-written (never visible as `latest`)."""
        if _is_main() and self.dir.is_dir():
            for partial in self.dir.glob(PARTIAL_PREFIX + "*"):
                shutil.rmtree(partial, ignore_errors=True)
        _barrier()

    def save(self, step: int, model: nn.Module | list[nn.Module], optimizers: list, meta: dict[str, Any],
             local_state: dict[str, Any]) -> Path:
        """Write step `step`: model and optimizer shards (DCP), then metadata, then move `latest`.

        model, optimizers: a module and its optimizers, or this rank's pipeline stages and a list of
        optimizers per stage. local_state: this rank's JSON state (loader position, RNG); all ranks' are
        stored together.
        """
        self.wait()
        final = self.dir / step_name(step)
        partial = self.dir / (PARTIAL_PREFIX + step_name(step))
        if _is_main():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        state, _ = _training_state(_model_parts(model, optimizers))
        ranks_state = _gather_json(local_state)

        def finalize() -> None:
            _barrier()
            if _is_main():
                write_json_atomic(partial / STATE_FILE, {"ranks": ranks_state}, durable=True)
                # murmur.json last: its presence marks completeness
                write_json_atomic(partial / META_FILE, meta, durable=True)
                replace_dir(partial, final, durable=True)
                self._point_latest(final.name)
                self._prune()
            _barrier()

        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(partial))
            self._pending = (future, finalize)
        else:
            with _quiet():
                dcp.save(state, checkpoint_id=str(partial))
            finalize()
        return final

    def _point_latest(self, name: str) -> None:
        write_text_atomic(self.dir / LATEST, name + "\n", durable=True)

    def _prune(self) -> None:
        steps = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in steps[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Finish an asynchronous save in flight (its folder becomes visible only now)."""
        if self._pending is not None:
            future, finalize = self._pending
            self._pending = None
            future.result()
            finalize()

    def load(self, step_dir: Path, model: nn.Module | list[nn.Module], optimizers: list
             ) -> tuple[dict[str, Any], list[Any]]:
        """Restore model and optimizers (as `save` takes them) from `step_dir`, whatever layout wrote it;
        returns (meta, ranks' states)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        parts = _model_parts(model, optimizers)
        state, keys = _training_state(parts)
        _dcp_load(state, step_dir)
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for (module, optims), (model_keys, optim_keys) in zip(parts, keys):
            set_state_dict(module, optims, model_state_dict={k: state["model"][k] for k in model_keys},
                           optim_state_dict={k: state["optim"][k] for k in optim_keys}, options=options)
        try:
            ranks = json.loads((step_dir / STATE_FILE).read_text())["ranks"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise MurmurError(f"{step_dir / STATE_FILE} is missing or unreadable: {err}") from None
        return read_meta(step_dir), ranks
