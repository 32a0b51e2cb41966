"""Exporting models: the build's export stage (the run's final model as a Hugging Face directory in
run_dir/model), and the `murmur export` conversions to a Hugging Face directory or a GGUF.

The final model is the chat-finetuned one when SFT ran, else the pretrained one. The exported folder
loads in transformers and vLLM, and back into Murmur (`murmur serve runs/NAME/model`); a GGUF export
(murmur.gguf.writer) runs in llama.cpp, Ollama and LM Studio.
"""

from __future__ import annotations

from pathlib import Path

from murmur.errors import MurmurError
from murmur.model_card import run_folder_of, write_model_card


def final_stage_dir(run_dir: Path) -> Path:
    """The training-stage folder holding the run's final model: sft/ when it has checkpoints, else pretrain/."""
    from murmur.train.checkpoint import is_checkpoint_source

    for stage in ("sft", "pretrain"):
        if is_checkpoint_source(run_dir / stage):
            return run_dir / stage
    raise MurmurError(f"{run_dir} has no checkpoints in sft/ or pretrain/; run `murmur train` first")


def run_stage(settings, run_dir: str | Path) -> dict:
    """Export the run's final checkpoint to run_dir/model (atomically replaced)."""
    from murmur.hf import save_hf_model, special_token_ids
    from murmur.source import load_model

    run_dir = Path(run_dir)
    loaded = load_model(final_stage_dir(run_dir))
    out = save_hf_model(loaded.model, run_dir / "model", tokenizer_dir=loaded.tokenizer_dir,
                        special_tokens=special_token_ids(loaded.tokenizer_dir))
    write_model_card(out, run_dir, settings)
    return {"model_dir": str(out), "from": str(loaded.path)}


def export_hf(src: str | Path, out_dir: str | Path, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """The model at `src` (anything murmur.source.load_model takes) as a Hugging Face directory."""
    import torch

    from murmur.hf import save_hf_model, special_token_ids
    from murmur.source import load_model

    loaded = load_model(src)
    out = save_hf_model(loaded.model, out_dir, tokenizer_dir=loaded.tokenizer_dir,
                        special_tokens=special_token_ids(loaded.tokenizer_dir), max_shard_bytes=max_shard_bytes,
                        dtype=getattr(torch, dtype) if dtype else None)
    write_model_card(out, run_folder_of(src))
    return out


def export_gguf(src: str | Path, out_dir: str | Path, quant: str = "f16") -> Path:
    """The model at `src` as out_dir/model-QUANT.gguf with an Ollama Modelfile beside it; returns the file."""
    from murmur.gguf.writer import write_gguf
    from murmur.source import load_model

    loaded = load_model(src)
    return write_gguf(loaded.model, loaded.tokenizer_dir, out_dir, quant=quant, name=Path(str(src)).name)


def export_adapter(src: str | Path, out_dir: str | Path) -> Path:
    """The LoRA adapters of a Murmur checkpoint as a PEFT folder (adapter_config.json,
    adapter_model.safetensors) that `peft` loads onto the base model the finetuning started from."""
    from murmur.source import resolve_source
    from murmur.train import checkpoint
    from murmur.train.lora import save_peft_adapter

    source = resolve_source(src)
    if source.kind != "checkpoint":
        raise MurmurError(f"{src} holds no Murmur checkpoint; --adapter exports the LoRA adapters of a run finetuned "
                          "with sft.lora_rank > 0")
    model, _, _ = checkpoint.load_for_inference(source.path, merge_adapters=False)
    meta = checkpoint.read_meta(source.step_dir)
    # The base the adapters belong to when it was named (sft.init_from); else the run's own pretraining.
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    base = train.get("init_from") if isinstance(train.get("init_from"), str) else None
    return save_peft_adapter(model, out_dir, base_model=base)
