"""LoRA finetuning (murmur/train/lora.py): adapters alone train, on a frozen base from a Hugging Face folder.

One LoRA run (12 steps, dropout on, started from a tiny Llama that `transformers` wrote) is the reference
for everything: a copy of it killed with SIGKILL mid-run resumes to the same losses bit for bit; its merged
export loads in `transformers`, and its PEFT folder loads with `peft` onto the `transformers` base, both with
the logits of Murmur's adapted model. A 2-process torchrun (FSDP2 with the base frozen) matches 1 process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from lora_dist_worker import DIST, LORA
from train_helpers import in_one_thread, SEQ, VOCAB, link_tokens, read_losses, settings_for, write_sft_tokens
from murmur.cli import main as cli
from murmur.errors import MurmurError
from murmur.hf import load_hf_model
from murmur.train import checkpoint as ckpt
from murmur.train.lora import LoraSettings, LoRALinear, apply_lora, is_adapter_name, merge_lora
from murmur.train.trainer import Trainer, make_plan, run_stage, start_runtime

HERE = Path(__file__).parent
TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3, 2, 10, 11, 12, 13, 2], [1, 4, 8, 15, 16, 23, 2, 20, 21, 22, 2, 0]])
RANK, ALPHA = LORA["sft_lora_rank"], LORA["sft_lora_alpha"]
SETTINGS = dict(steps=12, checkpoint_interval=4, eval_interval=100, keep_checkpoints=5, sft_lora_dropout=0.1, **LORA)

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from train_helpers import settings_for
    from murmur.train import trainer

    run, base = Path(sys.argv[1]), sys.argv[2]
    original_step = trainer.Trainer.train_step
    def train_step(self, batches):
        if self.step == 6:  # after the step-4 checkpoint, before step 8's
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(self, batches)
    trainer.Trainer.train_step = train_step
    trainer.run_stage(settings_for(run, sft_init_from=base, **%r), run, "sft")
""" % SETTINGS)


def _hf_base(folder: Path) -> Path:
    """A tiny random Llama written by transformers; norms perturbed so that the test sees them."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    _hf_base(folder / "base")
    write_sft_tokens(folder / "tokens")
    return folder


@pytest.fixture(scope="module")
def reference(work):
    """The LoRA run every other test compares with (one thread, as the resumed run)."""
    run = work / "reference"
    link_tokens(run, work / "tokens")
    in_one_thread(lambda: run_stage(settings_for(run, sft_init_from=str(work / "base"), **SETTINGS), run, "sft"))
    return run


def _logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def test_adapters_start_at_the_base_with_peft_init(tmp_path):
    base, _ = load_hf_model(_hf_base(tmp_path / "base"))
    expected = _logits(base)
    trainable, total = apply_lora(base, LoraSettings(RANK, ALPHA, 0.0, ("q_proj", "down_proj")))
    adapted = [m for m in base.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 4  # two targets × two blocks
    assert trainable == sum(RANK * (m.in_features + m.out_features) for m in adapted) < total
    assert [n for n, p in base.named_parameters() if p.requires_grad] == [
        n for n, _ in base.named_parameters() if is_adapter_name(n)]
    for m in adapted:  # PEFT: A kaiming-uniform(a=√5), bound 1/√fan_in; B zeros
        bound = m.in_features ** -0.5
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 3
        assert not m.lora_B.weight.any()
    assert torch.equal(_logits(base), expected)  # step 0 is the base, exactly


def test_only_adapters_get_gradients_and_optimizer_state(work, tmp_path):
    run = tmp_path / "run"
    link_tokens(run, work / "tokens")
    settings = settings_for(run, sft_init_from=str(work / "base"), steps=2, **LORA)
    trainer = Trainer(settings, run, "sft", start_runtime(settings.sft))
    trainer.setup()
    names = {p: n for n, p in trainer.model.named_parameters()}
    adapters = {n for n in names.values() if is_adapter_name(n)}
    assert len(adapters) == 2 * 7 * 2  # blocks × default targets (attention and MLP) × (A, B)
    assert {n for p, n in names.items() if p.requires_grad} == adapters
    trainer.train_step([next(iter(trainer.loader))])
    assert {n for p, n in names.items() if p.grad is not None} == adapters
    before = {n: p.detach().clone() for p, n in names.items()}
    trainer._optimizer_step()
    in_optimizer = {names[p] for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    with_state = {names[p] for opt in trainer.optimizers for p in opt.state}
    assert in_optimizer == with_state == adapters
    changed = {n for p, n in names.items() if not torch.equal(p, before[n])}
    assert changed == adapters  # and not one base weight


def test_killed_lora_run_resumes_bit_exact(work, reference, tmp_path):
    run = tmp_path / "run"
    link_tokens(run, work / "tokens")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), str(work / "base")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (run / "sft" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert max(read_losses(run / "sft")) >= 6  # it trained past the checkpoint before dying

    settings = settings_for(run, sft_init_from=str(work / "base"), **SETTINGS)
    summary = in_one_thread(lambda: run_stage(settings, run, "sft"))
    assert summary["steps"] == 12 and summary["new_steps"] == 8
    expected, resumed = read_losses(reference / "sft"), read_losses(run / "sft")
    assert expected[12] < expected[1] - 0.1  # the adapters learn
    for step in range(5, 13):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])  # bit for bit (dropout too)
    mine = ckpt.load_for_inference(run, merge_adapters=False)[0].state_dict()
    theirs = ckpt.load_for_inference(reference, merge_adapters=False)[0].state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_merged_export_loads_in_transformers_with_the_adapted_logits(work, reference, tmp_path):
    adapted = ckpt.load_for_inference(reference, merge_adapters=False)[0]
    base = transformers.LlamaForCausalLM.from_pretrained(work / "base").eval()
    expected = _logits(adapted)
    assert (expected - _logits(base)).abs().max() > 1e-2  # the adapters changed the model: a dropped one shows
    assert cli(["export", str(reference), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(_logits(merged), expected, atol=1e-5), (_logits(merged) - expected).abs().max()
    # Merging in Murmur itself gives the same function as the adapters.
    assert torch.allclose(_logits(merge_lora(adapted)), expected, atol=1e-5)


def test_peft_folder_loads_onto_the_transformers_base(work, reference, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a dev dependency (pip install peft)")
    out = tmp_path / "adapter"
    assert cli(["export", str(reference), "--out", str(out), "--adapter"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (RANK, ALPHA, 0.1)
    assert config["base_model_name_or_path"] == str(work / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(work / "base").eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    expected = _logits(ckpt.load_for_inference(reference, merge_adapters=False)[0])
    got = _logits(model)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_lora_refusals_name_the_setting(work, reference, tmp_path):
    settings = settings_for(tmp_path / "tp", sft_init_from=str(work / "base"), parallel={"tp": 2, "dp_shard": 1},
                            **LORA)
    with pytest.raises(MurmurError, match="sft.lora_rank > 0 trains with data parallelism only"):
        make_plan(settings, "sft", 2)
    model, _ = load_hf_model(work / "base")
    with pytest.raises(MurmurError, match="sft.lora_rank=40 exceeds the smaller side"):
        apply_lora(model, LoraSettings(40, ALPHA, 0.0, ("q_proj",)))
    # Starting a new finetuning from a LoRA checkpoint would load its base and drop its adapters.
    run = tmp_path / "second"
    link_tokens(run, work / "tokens")
    with pytest.raises(MurmurError, match="was finetuned with LoRA; export it merged"):
        run_stage(settings_for(run, sft_init_from=str(reference / "sft"), steps=1), run, "sft")
    # A checkpoint without adapters has none to export.
    plain = tmp_path / "plain"
    link_tokens(plain, work / "tokens")
    run_stage(settings_for(plain, sft_init_from=str(work / "base"), steps=1), plain, "sft")
    assert cli(["export", str(plain), "--out", str(tmp_path / "none"), "--adapter"]) == 1
    assert not (tmp_path / "none").exists()


def test_checkpoint_whose_lora_settings_lie_is_refused(reference, tmp_path):
    """murmur.json may come from anyone: its LoRA rank is checked against the tensors before any memory."""
    step = tmp_path / "step"
    shutil.copytree(ckpt.latest_step_dir(reference / "sft" / "checkpoints"), step)
    meta = json.loads((step / "murmur.json").read_text())
    for rank, message in ((8, r"implies model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight of shape \(8, 32\)"),
                          (-1, "train.lora_rank is invalid"), (10**12, "exceeds the smaller side")):
        meta["train"]["lora_rank"] = rank
        (step / "murmur.json").write_text(json.dumps(meta))
        with pytest.raises(MurmurError, match=message):
            ckpt.load_for_inference(step)


@pytest.mark.distributed
def test_two_processes_fsdp_with_frozen_base_match_one(work):
    """torchrun on gloo: FSDP2 (dp_shard=2) with the base frozen, and FSDP2 built on the meta device."""
    for name in ("single", "fsdp", "fsdp-meta"):
        link_tokens(work / "dist" / name, work / "tokens")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(HERE / "lora_dist_worker.py"), str(work / "dist"), str(work / "base")]
    proc = subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = work / "dist" / "single"
        in_one_thread(lambda: run_stage(settings_for(single, sft_init_from=str(work / "base"), micro_batch_size=4,
                                                      global_batch_tokens=SEQ * 8, **DIST), single, "sft"))
    finally:
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    ref, got = read_losses(single / "sft"), read_losses(work / "dist" / "fsdp" / "sft")
    assert sorted(got) == sorted(ref) == list(range(1, 5))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5), step
    assert ref[4] < ref[1] - 0.02
    # Adapters initialised after sharding draw other numbers, but B = 0 still starts at the base's loss.
    meta = read_losses(work / "dist" / "fsdp-meta" / "sft")
    assert meta[1] == pytest.approx(ref[1], rel=2e-5) and meta[4] < meta[1] - 0.02
    # The 2-process checkpoint loads in one process, adapters included.
    assert torch.allclose(_logits(ckpt.load_for_inference(work / "dist" / "fsdp")[0]),
                          _logits(ckpt.load_for_inference(single)[0]), atol=1e-4)


def test_stage_folder_of_lora_refuses_full_finetuning_and_another_rank(work, reference):
    """The checkpoints hold adapters of one rank: resuming them as something else is refused, naming why."""
    for changed in ({"sft_lora_rank": 0}, {"sft_lora_rank": 8}):
        settings = settings_for(reference, sft_init_from=str(work / "base"), **{**SETTINGS, **changed})
        with pytest.raises(MurmurError, match=r"belongs to a run with different settings \(lora\)"):
            run_stage(settings, reference, "sft")
