"""Training pieces without a process group: layouts, schedules, optimizers, MFU table, checkpoints, failures."""

import json
import math
import pickle

import pytest
import torch

from train_helpers import link_tokens, read_losses, read_val, settings_for, write_pretrain_tokens, write_sft_tokens
from murmur.cli import main as cli_main
from murmur.errors import MurmurError
from murmur.settings.train import ParallelSettings, TrainSettings, section_name, training_settings
from murmur.train import checkpoint as ckpt
from murmur.train import metrics
from murmur.train.optim import Muon, lr_multiplier, orthogonalize
from murmur.train.parallel import resolve_layout
from murmur.train.trainer import Runtime, Trainer, make_plan, run_stage


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units") / "tokens"
    write_pretrain_tokens(folder)
    write_sft_tokens(folder)
    return folder


@pytest.fixture(scope="module")
def pretrained(tokens, tmp_path_factory):
    """A run folder with a short pretraining stage done (shared by the checkpoint and SFT tests)."""
    run = tmp_path_factory.mktemp("pretrained")
    link_tokens(run, tokens)
    summary = run_stage(settings_for(run, steps=20, eval_interval=10, checkpoint_interval=10), run, "pretrain")
    return run, summary


# --- layouts and plans ---------------------------------------------------------------------------

def test_layout_fills_dp_shard_and_refuses_mismatches():
    layout = resolve_layout(ParallelSettings(dp_replicate=2, tp=4), 64)
    assert (layout.dp_replicate, layout.dp_shard, layout.tp, layout.strategy) == (2, 8, 4, "hsdp+tp4")
    assert resolve_layout(ParallelSettings(dp_replicate=4, dp_shard=1), 4).strategy == "ddp"
    assert resolve_layout(ParallelSettings(), 1).strategy == "single"
    with pytest.raises(MurmurError, match="not divisible"):
        resolve_layout(ParallelSettings(tp=3), 8)
    with pytest.raises(MurmurError, match="multiply to 4 .* but 8 processes"):
        resolve_layout(ParallelSettings(dp_shard=2, tp=2), 8)


@pytest.mark.parametrize("degrees, world, sharded, replicated, strategy", [
    ({}, 1, False, False, "single"),
    ({"dp_replicate": 4, "dp_shard": 1}, 4, False, True, "ddp"),
    ({}, 8, True, False, "fsdp"),
    ({"dp_replicate": 2}, 8, True, True, "hsdp"),
    ({"tp": 2}, 2, False, False, "single+tp2"),  # TP alone: no data parallel wrapper
    ({"tp": 2, "dp_shard": 1, "dp_replicate": 2}, 4, True, True, "hsdp+tp2"),  # DDP cannot wrap DTensors
    ({"tp": 2}, 8, True, False, "fsdp+tp2"),
])
def test_layout_says_who_owns_the_parameters(degrees, world, sharded, replicated, strategy):
    layout = resolve_layout(ParallelSettings(**degrees), world)
    assert (layout.sharded, layout.replicated, layout.strategy) == (sharded, replicated, strategy)


def test_each_training_stage_reads_its_own_section(tmp_path):
    settings = settings_for(tmp_path, lr=1e-2, sft_lr=5e-4)
    assert training_settings(settings, "pretrain").lr == 1e-2 and training_settings(settings, "sft").lr == 5e-4
    assert (section_name("pretrain"), section_name("sft")) == ("train", "sft")
    with pytest.raises(MurmurError, match="unknown training stage 'finetune'; use one of: pretrain, sft"):
        training_settings(settings, "finetune")
    with pytest.raises(MurmurError, match="sft.global_batch_tokens=100 is not a multiple"):
        make_plan(settings_for(tmp_path, sft_global_batch_tokens=100), "sft", 1)


def test_plan_checks_batch_and_tensor_parallel(tmp_path):
    plan = make_plan(settings_for(tmp_path, micro_batch_size=2, global_batch_tokens=16 * 2 * 4 * 3), "pretrain", 4)
    assert plan.accumulation == 3 and plan.tokens_per_step == 384
    with pytest.raises(MurmurError, match="global_batch_tokens=100 is not a multiple"):
        make_plan(settings_for(tmp_path, global_batch_tokens=100), "pretrain", 1)
    with pytest.raises(MurmurError, match="tp=3 does not divide"):
        make_plan(settings_for(tmp_path, parallel={"tp": 3}), "pretrain", 3)
    with pytest.raises(MurmurError, match="seq_len=64 exceeds model.max_seq_len=32"):
        make_plan(settings_for(tmp_path, seq_len=64), "sft", 1)


def test_dry_run_prints_the_plan_and_fails_clearly(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\ndir = "{tmp_path}"\n[model]\npreset = "8b"\n[train]\nseq_len = 8192\n'
                      'micro_batch_size = 1\nglobal_batch_tokens = 16777216\n[train.parallel]\ntp = 8\n')
    assert cli_main(["train", str(recipe), "--dry-run", "--world-size", "1024"]) == 0
    out = capsys.readouterr().out
    assert "fsdp+tp8: dp_replicate 1 × dp_shard 128 × tp 8 = 1024 processes" in out
    assert "16 accumulation = 16,777,216 tokens per step" in out and "nothing was trained" in out
    assert cli_main(["train", str(recipe), "--dry-run", "--world-size", "12"]) == 1
    assert "not divisible" in capsys.readouterr().err


# --- schedules and optimizers --------------------------------------------------------------------

def test_schedules():
    ts = TrainSettings(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(0, ts) == pytest.approx(0.1) and lr_multiplier(9, ts) == pytest.approx(1.0)
    assert lr_multiplier(10, ts) == pytest.approx(1.0) and lr_multiplier(99, ts) == pytest.approx(0.1, abs=1e-3)
    assert lr_multiplier(55, ts) == pytest.approx(0.55, abs=0.01)
    wsd = ts.model_copy(update={"schedule": "wsd", "decay_fraction": 0.2})
    assert lr_multiplier(50, wsd) == 1.0 and lr_multiplier(79, wsd) == 1.0
    assert lr_multiplier(90, wsd) == pytest.approx(0.55) and lr_multiplier(100, wsd) == pytest.approx(0.1)
    const = ts.model_copy(update={"schedule": "constant"})
    assert lr_multiplier(80, const) == 1.0


def test_muon_orthogonalises_and_trains():
    torch.manual_seed(0)
    g = torch.randn(32, 16)
    singular = torch.linalg.svdvals(orthogonalize(g).float())
    assert singular.min() > 0.5 and singular.max() < 1.5  # near-orthogonal: all singular values near one
    w = torch.nn.Parameter(torch.randn(16, 16) * 0.1)
    target = torch.randn(16, 16) * 0.3
    opt = Muon([w], lr=0.05)
    first = None
    for _ in range(30):
        loss = ((w - target) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        w.grad = None
    assert loss.item() < 0.3 * first


def test_muon_run(tokens, tmp_path):
    link_tokens(tmp_path, tokens)
    run_stage(settings_for(tmp_path, optimizer="muon", steps=6, checkpoint_interval=6), tmp_path, "pretrain")
    losses = read_losses(tmp_path / "pretrain")
    assert losses[6] < losses[1]


def test_cpu_without_compiler_or_native_bf16_trains_uncompiled_in_float32(tokens, tmp_path, monkeypatch, capsys):
    from murmur import accel
    from murmur.train import parallel

    monkeypatch.setattr(accel, "cpu_compile_unavailable", lambda: "no C++ compiler (test)")
    monkeypatch.setattr(accel, "cpu_bf16_fast", lambda: False)
    compiled = []
    monkeypatch.setattr(parallel, "apply_compile", compiled.append)
    link_tokens(tmp_path, tokens)
    run_stage(settings_for(tmp_path, steps=2, checkpoint_interval=2, compile=True, dtype="bfloat16"), tmp_path,
              "pretrain")
    out = capsys.readouterr().out
    assert "compile is off: no C++ compiler (test)" in out and "training in float32 instead" in out
    assert compiled == [] and len(read_losses(tmp_path / "pretrain")) == 2
    float32 = tmp_path / "float32"
    link_tokens(float32, tokens)
    run_stage(settings_for(float32, steps=2, checkpoint_interval=2), float32, "pretrain")
    assert read_losses(float32 / "pretrain") == read_losses(tmp_path / "pretrain")  # the same run, in float32


# --- metrics -------------------------------------------------------------------------------------

def test_peak_flops_table_says_when_a_gpu_is_unknown(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert metrics.peak_flops(cuda) == (989e12, "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(cuda)[0] == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    assert metrics.peak_flops(cuda) == (None, "Imaginary GPU 9000")
    assert "not in Murmur's peak FLOP/s table" in metrics.peak_flops_note(cuda)
    assert "GFLOP/s" in metrics.peak_flops_note(torch.device("cpu"))


def test_interval_meter_counts_updates_tokens_and_training_time():
    now = [10.0]
    meter = metrics.IntervalMeter("cpu", clock=lambda: now[0])
    meter.count_step(64, torch.tensor(0.5), loss_sum=torch.tensor(96.0), targets=48)
    now[0] += 2.0
    with meter.paused():  # an evaluation: 30 s that are not training
        now[0] += 30.0
    meter.count_step(64, torch.tensor(float("nan")))  # skipped: tokens seen, no loss, no targets
    meter.count_step(64, torch.tensor(0.25), loss_sum=torch.tensor(32.0), targets=tensor_targets(16))
    now[0] += 1.0
    first = meter.close(reduce=lambda t: t * 2)  # as if a second process held the same sums
    assert first == metrics.Interval(loss_sum=256.0, targets=64, tokens=192, seconds=3.0, grad_norm=0.25,
                                     skipped_steps=1)
    meter.count_step(64, torch.tensor(0.125), loss_sum=torch.tensor(8.0), targets=8)
    now[0] += 0.5
    second = meter.close()
    # A new interval: sums restart, the clock restarts at the last close; skipped steps count for the session.
    assert second == metrics.Interval(loss_sum=8.0, targets=8, tokens=64, seconds=0.5, grad_norm=0.125,
                                      skipped_steps=1)


def tensor_targets(n: int) -> torch.Tensor:
    """A target count as several processes hold it: a device tensor, read only when the interval closes."""
    return torch.tensor(n, dtype=torch.int64)


def test_evaluation_logging_and_checkpoints_are_due_at_their_intervals_and_the_last_step(tmp_path):
    settings = settings_for(tmp_path, steps=10, log_interval=3, eval_interval=4, checkpoint_interval=5)
    trainer = Trainer(settings, tmp_path, "pretrain", Runtime(0, 1, 0, 1, torch.device("cpu"), False))
    steps = range(1, 11)
    assert [s for s in steps if trainer.should_log(s)] == [3, 6, 9, 10]
    assert [s for s in steps if trainer.should_evaluate(s)] == [4, 8, 10]
    assert [s for s in steps if trainer.should_checkpoint(s)] == [5, 10]
    sft = Trainer(settings_for(tmp_path, sft_steps=6, sft_eval_interval=2, sft_checkpoint_interval=6), tmp_path,
                  "sft", Runtime(0, 1, 0, 1, torch.device("cpu"), False))
    assert [s for s in range(1, 7) if sft.should_evaluate(s)] == [2, 4, 6]
    assert [s for s in range(1, 7) if sft.should_checkpoint(s)] == [6]


def test_pretrain_outputs(pretrained):
    run, summary = pretrained
    stage = run / "pretrain"
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "gflops_per_sec"):
        assert key in train[0]
    assert train[0]["mfu"] is None and train[0]["gflops_per_sec"] > 0
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    val = read_val(stage)
    assert sorted(val) == [0, 10, 20] and val[20] < val[0]
    assert (stage / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((stage / "tb").iterdir())
    steps = sorted(p.name for p in (stage / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000010", "step_00000020"]
    meta = json.loads((stage / "checkpoints" / "step_00000020" / "murmur.json").read_text())
    assert meta["step"] == 20 and meta["stage"] == "pretrain" and meta["model"]["dim"] == 32
    assert meta["tokens"] == 20 * 4 * 16 and summary["val_loss"] == pytest.approx(val[20])


def test_tokens_per_sec_leaves_out_evaluation_and_checkpoints_whatever_the_intervals(tokens, tmp_path, monkeypatch):
    """A fake clock: each training step takes 1 s, each evaluation and checkpoint 100 s. Every interval of two
    steps then trains at 2 steps' tokens / 2 s, also when an evaluation (step 3) or a checkpoint (step 5) falls
    inside it rather than at its end."""
    import time

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def taking(seconds, method):
        def timed(self, *args):
            now[0] += seconds
            return method(self, *args)
        return timed

    monkeypatch.setattr(Trainer, "train_step", taking(1.0, Trainer.train_step))
    monkeypatch.setattr(Trainer, "evaluate", taking(100.0, Trainer.evaluate))
    monkeypatch.setattr(Trainer, "save", taking(100.0, Trainer.save))
    link_tokens(tmp_path, tokens)
    run_stage(settings_for(tmp_path, steps=6, log_interval=2, eval_interval=3, checkpoint_interval=5), tmp_path,
              "pretrain")
    records = [json.loads(x) for x in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["tokens_per_sec"] for r in records if "loss" in r}
    assert rates == {2: 64.0, 4: 64.0, 6: 64.0}  # 4 sequences × 16 tokens per step, one step a second


# --- checkpoints ---------------------------------------------------------------------------------

def test_load_for_inference_reproduces_validation_loss(pretrained):
    run, summary = pretrained
    for source in (run, run / "pretrain", run / "pretrain" / "checkpoints" / "step_00000020"):
        assert ckpt.is_checkpoint_source(source)
    assert not ckpt.is_checkpoint_source(run / "tokens")
    model, settings, tokenizer_dir = ckpt.load_for_inference(run, device="cpu", dtype=torch.float32)
    assert tokenizer_dir is None and settings.n_layers == 2
    from murmur.shards import TokenLoader

    loader = TokenLoader(run / "tokens", "pretrain", "validation", seq_len=16, batch_size=4, loop=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 4:
                break
            logits = model(batch["inputs"])
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((batch["targets"] != -100).sum())
    assert total / count == pytest.approx(summary["val_loss"], rel=1e-5)


def test_checkpoint_metadata_never_unpickles_arbitrary_objects(pretrained, tmp_path):
    import shutil

    step = tmp_path / "step_00000001"
    shutil.copytree(pretrained[0] / "pretrain" / "checkpoints" / "step_00000020", step)

    class Evil:
        def __reduce__(self):
            return (eval, ("1",))  # not print: Ray swaps builtins.print for its own in a process it ran in

    (step / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(MurmurError, match="builtins.eval.*refusing"):
        ckpt.load_for_inference(step)


# --- failing well --------------------------------------------------------------------------------

def test_run_folder_of_other_settings_is_refused(pretrained, tmp_path):
    run = tmp_path
    link_tokens(run, pretrained[0] / "tokens")
    run_stage(settings_for(run, steps=2, checkpoint_interval=2), run, "pretrain")
    other = settings_for(run, steps=2)
    other.model.dim = 64
    with pytest.raises(MurmurError, match=r"different settings \(model.dim\).*--overwrite"):
        run_stage(other, run, "pretrain")
    summary = run_stage(other, run, "pretrain", overwrite=True)
    assert summary["new_steps"] == 2


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(policy, tokens, tmp_path, monkeypatch):
    link_tokens(tmp_path, tokens)
    original = Trainer._loss_sum

    def poisoned(self, inputs, targets):
        loss = original(self, inputs, targets)
        return loss * float("nan") if self.step == 4 and self.model.training else loss

    monkeypatch.setattr(Trainer, "_loss_sum", poisoned)
    settings = settings_for(tmp_path, steps=6, checkpoint_interval=3, nan_policy=policy)
    if policy == "stop":
        with pytest.raises(MurmurError, match=r"NaN/infinite at step 5; the last good checkpoint is .*step_00000003"):
            run_stage(settings, tmp_path, "pretrain")
    else:
        run_stage(settings, tmp_path, "pretrain")
        records = [json.loads(x) for x in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and train[4]["loss"] is None
        assert train[-1]["skipped_steps"] == 1 and all(math.isfinite(r["loss"]) for r in train if r["step"] != 5)


def test_missing_shards_and_missing_pretraining(tmp_path):
    with pytest.raises(MurmurError, match="murmur tokenize"):
        run_stage(settings_for(tmp_path), tmp_path, "pretrain")
    with pytest.raises(MurmurError, match="has none; run `murmur train RECIPE --stage pretrain` first"):
        run_stage(settings_for(tmp_path), tmp_path, "sft")


# --- chat finetuning -----------------------------------------------------------------------------

def test_sft_lowers_held_out_loss(pretrained, tmp_path):
    run = pretrained[0]
    summary = run_stage(settings_for(run, sft_steps=30, sft_lr=1e-2, sft_eval_interval=30,
                                     sft_checkpoint_interval=30), run, "sft")
    val = read_val(run / "sft")
    assert sorted(val) == [0, 30]
    assert val[30] < 0.6 * val[0], val  # the three canned replies are learnt
    assert summary["stage"] == "sft"
    assert (run / "sft" / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    meta = json.loads((run / "sft" / "checkpoints" / "step_00000030" / "murmur.json").read_text())
    assert meta["stage"] == "sft"
    # The run folder now resolves to the finetuned model.
    assert ckpt.resolve_step_dir(run).parent.parent.name == "sft"


def test_sft_from_hugging_face_directory(pretrained, tmp_path):
    from murmur.hf import save_hf_model

    model, _, _ = ckpt.load_for_inference(pretrained[0] / "pretrain")
    hf_dir = save_hf_model(model, tmp_path / "hf")
    run = tmp_path / "run"
    link_tokens(run, pretrained[0] / "tokens")
    run_stage(settings_for(run, sft_steps=1, sft_init_from=str(hf_dir)), run, "sft")
    # Same weights as the checkpoint, so the same starting loss as any SFT from that checkpoint.
    start = read_val(run / "sft")[0]
    other = tmp_path / "other"
    link_tokens(other, pretrained[0] / "tokens")
    run_stage(settings_for(other, sft_steps=1, sft_init_from=str(pretrained[0] / "pretrain")), other, "sft")
    assert read_val(other / "sft")[0] == pytest.approx(start, rel=1e-6)
