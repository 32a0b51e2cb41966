"""From a SRC argument and serve settings to a running server (or an engine for `murmur chat`)."""

from __future__ import annotations

import os
from pathlib import Path

from murmur.errors import MurmurError
from murmur.settings.serve import ServeSettings


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def build_engine(src: str | Path, settings: ServeSettings):
    """Load the model at `src` and wrap it in an engine sized by `settings`."""
    from murmur.accel import resolve_device
    from murmur.infer.engine import Engine

    device = resolve_device(settings.device)
    engine = Engine.from_source(src, device=device, dtype=resolve_dtype(settings.dtype, device),
                                max_batch_size=settings.max_batch_size, max_seq_len=settings.max_seq_len,
                                max_queue=settings.max_queue, prefix_cache=settings.prefix_cache,
                                stuck_after_s=settings.stuck_after_s, compile=settings.compile,
                                kv_cache_bytes=settings.kv_cache_bytes,
                                kv_cache_memory_fraction=settings.kv_cache_memory_fraction,
                                quantize=settings.quantize)
    engine.warmup(background=True)  # serve eagerly at once; the compiled step takes over when built
    return engine


def served_name(src: str | Path) -> str:
    """The model's name for clients: the run's name for a run folder or its model/ subfolder."""
    path = Path(src).resolve()
    return path.parent.name if path.name == "model" else path.name


def report_dir_of(src: str | Path) -> Path | None:
    """The run's report/ folder when `src` is a run folder (or a folder inside one) that has report.md."""
    path = Path(src).resolve()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "report" / "report.md").is_file():
            return candidate / "report"
    return None


def api_keys(flag_keys: list[str] | None, settings: ServeSettings) -> list[str]:
    """Keys from the settings, the --api-key flags and MURMUR_API_KEYS (comma-separated)."""
    env = [k.strip() for k in os.environ.get("MURMUR_API_KEYS", "").split(",") if k.strip()]
    return list(dict.fromkeys([*settings.api_keys, *(flag_keys or []), *env]))


def open_assistant(src: str | Path, settings: ServeSettings, index=None, use_index: bool = True,
                   index_settings=None, data_settings=None):
    """The assistant over the post index at `index` (a folder or url), else the run's own index/ when it
    has one; None with `use_index=False` or when there is no index."""
    from murmur.assistant.service import Assistant
    from murmur.index.location import POINTER, open_index
    from murmur.settings.data import DataSettings
    from murmur.settings.index import IndexSettings

    if not use_index:
        return None
    if index is None:
        path = Path(src).resolve()
        run = path.parent if path.name == "model" else path
        if not (run / "index" / POINTER).is_file():
            return None
        index = run
    index_settings = index_settings or IndexSettings()
    return Assistant(open_index(index, index_settings), index_settings, settings.assistant,
                     data_settings or DataSettings())


def serve(src: str | Path, settings: ServeSettings, *, index=None, use_index: bool = True, index_settings=None,
          data_settings=None) -> None:
    """Run the server until interrupted; the model loads in the background (503 until ready). The post index
    (`index`, else the run's own) grounds chat and answers mentions (docs/assistant.md)."""
    import uvicorn

    from murmur.accel import resolve_device
    from murmur.serve.app import create_app
    from murmur.serve.connections import uvicorn_config
    from murmur.source import is_model_source

    if not is_model_source(src):
        raise MurmurError(f"{src} does not exist; pass a Hugging Face model directory, a Murmur run folder or a "
                          "GGUF (gguf:PATH)")
    resolve_device(settings.device)  # fail now, not in the background
    assistant = open_assistant(src, settings, index, use_index, index_settings, data_settings)
    app = create_app(settings, model_name=settings.model_name or served_name(src),
                     loader=lambda: build_engine(src, settings), report_dir=report_dir_of(src), assistant=assistant)
    try:
        uvicorn.Server(uvicorn_config(app, settings)).run()
    finally:
        if assistant is not None:
            assistant.index.close()
