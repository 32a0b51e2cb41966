"""The console view of a plan: the model, the fastest layouts as a table, then time, cost and failures."""

from __future__ import annotations

from murmur.plan.memory import GiB


def si(value: float, unit: str = "") -> str:
    """1.23T-style numbers."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def _duration(days: float) -> str:
    return f"{days:.1f} days" if days >= 1 else f"{days * 24:.1f} hours"


def render(plan, top: int = 8) -> str:
    """The plan as text for a terminal."""
    f, s, sch, req = plan.facts, plan.facts.settings, plan.schedule, plan.request
    name = f"preset {s.preset}" if s.preset else "Llama-style shape" if req.model is None else "shape"
    nodes = req.gpus // plan.gpus_per_node
    lines = [
        f"fleet     {req.gpus:,} x {plan.gpu.label} ({nodes:,} node{'s' if nodes > 1 else ''} of "
        f"{plan.gpus_per_node}), {plan.gpu.memory_bytes / GiB:.0f} GiB and {plan.gpu.peak_bf16_flops / 1e12:,.0f} "
        f"bf16 TFLOP/s each",
        f"model     {si(f.params)} parameters ({name}: dim {s.dim}, {s.n_layers} layers, {s.n_heads} heads / "
        f"{s.kv_heads} kv, ffn {s.hidden_dim}, vocab {s.vocab_size}), seq_len {f.seq_len}",
        f"goal      {plan.goal}: {si(sch.tokens)} tokens ({sch.tokens / f.params:.0f} per parameter), "
        f"{sch.flops:.3g} FLOPs ({f.flops_per_token:.3g} per token)",
        f"search    {plan.result.tried:,} layouts tried, {len(plan.result.candidates):,} fit; compute efficiency "
        f"{req.efficiency:.0%} of peak before communication, recomputation and bubbles",
        "",
        f"{'#':>2} {'dp_rep':>6} {'dp_shard':>8} {'tp':>2} {'pp':>3} {'mbs':>3} {'AC':>4} {'reshard':>7} {'accum':>5} "
        f"{'batch':>6} {'GiB/GPU':>7} {'free':>5} {'step s':>7} {'tokens/s':>8} {'MFU':>5}",
    ]
    for index, c in enumerate(plan.result.candidates[:top], 1):
        lay = c.layout
        mark = "*" if index == 1 else " "
        lines.append(
            f"{index:>2}{mark}{lay.dp_replicate:>6} {lay.dp_shard:>8} {lay.tp:>2} "
            f"{lay.pp if lay.virtual_stages == 1 else f'{lay.pp}v{lay.virtual_stages}':>3} "
            f"{lay.micro_batch_size:>3} {lay.activation_checkpointing:>4} "
            f"{'yes' if lay.reshard_after_forward else 'no':>7} {c.microbatches:>5} {si(c.global_batch_tokens):>6} "
            f"{c.memory.total / GiB:>7.1f} {c.headroom(plan.gpu):>5.0%} "
            f"{c.step_seconds:>7.2f} {si(c.tokens_per_second):>8} {c.mfu:>5.1%}")
    lines.append("   * the layout the recipe uses (--write); pp AvB: A stages of B interleaved chunks per rank")
    best = plan.best
    mem = best.memory.as_gib()
    lines += [
        "",
        f"memory    best layout, GiB per GPU: params {mem['params']}, grads {mem['grads']}, optimizer "
        f"{mem['optimizer']}, activations {mem['activations']}, logits {mem['logits']}, buffers {mem['buffers']}, "
        f"fragmentation {mem['fragmentation']}, runtime {mem['runtime']} = {mem['total']}",
        "time      " + ", ".join(f"{k.replace('_', ' ')} {v * 1000:.0f} ms" for k, v in best.times.items() if v)
        + " per micro-batch",
        f"schedule  {_duration(sch.compute_seconds / 86400)} of training, {_duration(sch.days)} wall-clock with "
        f"failures; {sch.gpu_hours:,.0f} GPU-hours"
        + (f", cost {sch.cost:,.0f} at {req.price_per_gpu_hour:g} per GPU-hour" if sch.cost is not None else ""),
    ]
    r = sch.reliability
    if r.failures_per_gpu_hour > 0:
        lines.append(
            f"failures  {sch.interruptions:,.0f} expected interruptions (one every {r.mtbf_seconds / 3600:.1f} h at "
            f"{r.failures_per_gpu_hour:.2g} per GPU-hour); checkpoint every {r.interval_seconds / 60:.0f} min "
            f"(Young/Daly, {r.checkpoint_seconds:g} s to write, {r.restart_seconds:g} s to restart); goodput "
            f"{r.goodput:.1%}")
    else:
        lines.append("failures  none planned (--failure-rate 0)")
    lines += [f"note      {note}" for note in plan.notes]
    return "\n".join(lines)
