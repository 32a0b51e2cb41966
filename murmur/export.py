"""The export stage: the run's final model as a Hugging Face directory in run_dir/model.

The final model is the chat-finetuned one when SFT ran, else the pretrained one. The exported folder
loads in transformers and vLLM, and back into Murmur (`murmur serve runs/NAME/model`).
"""

from __future__ import annotations

from pathlib import Path

from murmur.errors import MurmurError


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
    return {"model_dir": str(out), "from": str(loaded.path)}
