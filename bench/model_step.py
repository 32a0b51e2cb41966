"""Forward+backward tokens per second: Murmur's Transformer against a plain-PyTorch reference of the same shape.

    .venv/bin/python bench/model_step.py [--preset tiny-cpu] [--batch 8] [--seq 256] [--repeats 7]

The reference is a deliberately ordinary implementation (torch.nn.RMSNorm, one fused QKV projection,
repeat_interleave for GQA, SDPA) — what a careful engineer writes without a framework. Both models
get the same weights shape, batch and thread count; runs alternate so load drifts hit both alike.
Prints the median tokens/s of each and the ratio (target: Murmur >= 0.95 of the reference).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from murmur.model import Transformer
from murmur.settings.model import ModelSettings


class RefBlock(nn.Module):
    def __init__(self, s: ModelSettings):
        super().__init__()
        self.s = s
        hd = s.attention_head_dim
        self.n1, self.n2 = nn.RMSNorm(s.dim, eps=s.norm_eps), nn.RMSNorm(s.dim, eps=s.norm_eps)
        self.qkv = nn.Linear(s.dim, (s.n_heads + 2 * s.kv_heads) * hd, bias=False)
        self.o = nn.Linear(s.n_heads * hd, s.dim, bias=False)
        self.w13 = nn.Linear(s.dim, 2 * s.hidden_dim, bias=False)
        self.w2 = nn.Linear(s.hidden_dim, s.dim, bias=False)

    def forward(self, x, cos, sin):
        s, (B, T, _) = self.s, x.shape
        hd = s.attention_head_dim
        q, k, v = self.qkv(self.n1(x)).split([s.n_heads * hd, s.kv_heads * hd, s.kv_heads * hd], -1)
        q = q.view(B, T, s.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, s.kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, s.kv_heads, hd).transpose(1, 2)

        def rot(t):
            a, b = t.chunk(2, -1)
            return t * cos + torch.cat((-b, a), -1) * sin

        q, k = rot(q), rot(k)
        rep = s.n_heads // s.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        g, u = self.w13(self.n2(x)).chunk(2, -1)
        return x + self.w2(F.silu(g) * u)


class Reference(nn.Module):
    def __init__(self, s: ModelSettings):
        super().__init__()
        self.emb = nn.Embedding(s.vocab_size, s.dim)
        self.blocks = nn.ModuleList(RefBlock(s) for _ in range(s.n_layers))
        self.norm = nn.RMSNorm(s.dim, eps=s.norm_eps)
        hd = s.attention_head_dim
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(s.max_seq_len).float(), inv)
        ang = torch.cat((ang, ang), -1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x, self.cos[:T], self.sin[:T])
        return self.norm(x) @ self.emb.weight.T


def step_time(model, tokens, targets, opt) -> float:
    start = time.perf_counter()
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    s = ModelSettings(preset=args.preset, max_seq_len=max(args.seq, 1))
    torch.manual_seed(0)
    models = {"murmur": Transformer(s), "reference": Reference(s)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tokens = torch.randint(0, s.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, s.vocab_size, (args.batch, args.seq))
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.repeats):
        for name, model in models.items():  # alternate, so machine load drifts hit both
            t = step_time(model, tokens, targets, opts[name])
            if i >= args.warmup:
                times[name].append(t)
    ntok = args.batch * args.seq
    tps = {k: ntok / statistics.median(v) for k, v in times.items()}
    print(f"preset {args.preset}, batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for k, v in tps.items():
        print(f"  {k:10s} {v:10.0f} tokens/s (forward+backward+AdamW)")
    print(f"ratio murmur/reference: {tps['murmur'] / tps['reference']:.3f}")


if __name__ == "__main__":
    main()
