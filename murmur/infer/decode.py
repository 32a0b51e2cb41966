"""The engine's decode step in few operations: one new token for each of slots 0..B-1.

The model's own `forward` serves every pass (prefill, prompt log-probabilities, the compiled step), but one
decode token through it is ~50 small operations a layer (seven projections, the norms' casts, rope's slices
and concatenations, the cache's advanced indexing, views). On SmolLM2 at one thread the products were still
79% of the step: fewer, larger products read the weights faster, and that is most of what this gains
(docs/journal.md, "Serving: a decode path with fewer ops"). `PackedDecoder` computes the same function with
about a dozen operations a layer:

- each layer's q/k/v projections are one product, and gate/up one product: at load their weights (int8
  weights and scales too) are copied once into one packed tensor per layer, and the model's own layers are
  pointed at row slices of it, so the model and this step share the weights and no memory is added;
- rope rotates q and k together, written back in place into the packed product's output, so the new keys and
  values sit side by side and go into the cache in one `index_copy_`;
- the cache is written through flat row indices computed once per step for every layer, the attention mask
  (additive) and the rotary angles are computed once per step too, and nothing reads a value back to Python.

On a CPU where Murmur's own kernels build (murmur/infer/cpu_kernels), the products, the norms with their
residual adds, silu * up, and each layer's rope + cache write + attention are one C++ call each; elsewhere
(CUDA, no compiler) the same step runs through PyTorch's ops.

The model code knows nothing of this: the engine builds a `PackedDecoder` over a plain `Transformer` (or an
int8 one from `quantize_model`) and falls back to the model's forward for anything else (`why_not`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from murmur.infer import cpu_kernels
from murmur.infer.kv_cache import SlotKVCache
from murmur.infer.quantize import Int8Linear
from murmur.model import MLP, Attention, Block, RMSNorm, Transformer


def why_not(model: nn.Module) -> str | None:
    """Why `PackedDecoder` cannot serve `model` (its forward must then do it), or None when it can."""
    if not isinstance(model, Transformer):
        return "not a murmur Transformer"
    if type(model).forward is not Transformer.forward:
        return f"{type(model).__name__} overrides forward"
    if model.embed_tokens is None or model.norm is None or model.lm_head is None:
        return "a part of a model (no embedding, final norm or head)"
    for block in model.blocks():
        attn, mlp = block.self_attn, block.mlp
        if (type(block), type(attn), type(mlp)) != (Block, Attention, MLP) or type(block.input_layernorm) is not RMSNorm:
            return "a block of another kind"
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        kinds = {type(linear) for linear in linears}
        if not (kinds <= {nn.Linear} or kinds <= {Int8Linear}):
            return "layers other than nn.Linear or Int8Linear (LoRA adapters kept apart?)"
        if kinds == {Int8Linear} and len({(lin.kernel, lin.int8_activations) for lin in linears}) > 1:
            return "int8 layers with different kernels"
    return None


def _pack(layers: list[nn.Module]) -> nn.Module:
    """One layer computing `layers` side by side (their outputs concatenated), whose weights the layers then
    view: the packed copy replaces theirs, so memory does not grow."""
    first = layers[0]
    biases = [layer.bias for layer in layers]
    with torch.no_grad():
        if isinstance(first, Int8Linear):
            packed = Int8Linear(torch.cat([layer.weight for layer in layers]),
                                torch.cat([layer.scales for layer in layers]),
                                None if biases[0] is None else torch.cat(biases), first.kernel,
                                first.int8_activations)
            start = 0
            for layer in layers:
                end = start + layer.out_features
                layer.weight, layer.scales = packed.weight[start:end], packed.scales[start:end]
                if layer.bias is not None:
                    layer.bias = packed.bias[start:end]
                start = end
            return packed
        weight = torch.cat([layer.weight.detach() for layer in layers])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        packed = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        packed.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            packed.bias = nn.Parameter(bias, requires_grad=False)
        start = 0
        for layer in layers:
            end = start + layer.out_features
            layer.weight = nn.Parameter(packed.weight[start:end], requires_grad=False)
            if layer.bias is not None:
                layer.bias = nn.Parameter(packed.bias[start:end], requires_grad=False)
            start = end
        return packed


def product_of(layer: nn.Module, weight_major_batches: bool = False):
    """`layer`'s function for a decode step without nn.Module's call overhead.

    On a CPU where Murmur's kernels load (murmur/infer/cpu_kernels), products of up to 31 rows go through
    them: each weight read once for every row, where MKL's gemm over 8 rows ran 2-3x slower than the read
    and torch's int8 kernel read at half speed (docs/journal.md). Otherwise an int8 layer's forward, and for
    a float layer W @ x^T for one row (MKL's gemv reads the weight 10-20% faster that way than `linear`'s
    x @ W^T, measured over SmolLM2's 30 layers, weights out of cache), and for more rows too when
    `weight_major_batches`, else `linear`.
    """
    weight, bias = layer.weight, layer.bias
    if isinstance(layer, Int8Linear):
        if layer.kernel != "murmur":
            return layer.forward
        int8_op, scales = torch.ops.murmur_cpu.linear_int8.default, layer.scales

        def int8_product(x: Tensor) -> Tensor:
            return int8_op(x, weight, scales, bias) if x.shape[0] <= cpu_kernels.MAX_ROWS else layer.forward(x)

        return int8_product
    if type(layer) is not nn.Linear:
        return layer.forward
    own_kernel = weight.dtype == torch.float32 and cpu_kernels.serves(weight.device)
    float_op = torch.ops.murmur_cpu.linear_float.default if own_kernel else None

    def product(x: Tensor) -> Tensor:
        rows = x.shape[0]
        if float_op is not None and rows <= cpu_kernels.MAX_ROWS and x.dtype == torch.float32:
            return float_op(x, weight, bias)
        if rows != 1 and not weight_major_batches:
            return F.linear(x, weight, bias)
        out = torch.mm(weight, x.t()).t()  # (1, out): a view of (out, 1), contiguous as it is one row
        return out if bias is None else out + bias

    return product


class _Layer:
    """What one block's decode step reads: the packed products, the norms' weights, the cache's storage."""

    def __init__(self, block: nn.Module, kv: Tensor):
        attn, mlp = block.self_attn, block.mlp
        self.qkv = product_of(_pack([attn.q_proj, attn.k_proj, attn.v_proj]))
        self.gate_up = product_of(_pack([mlp.gate_proj, mlp.up_proj]))
        self.o_proj, self.down_proj = product_of(attn.o_proj), product_of(mlp.down_proj)
        self.input_norm, self.post_norm = block.input_layernorm, block.post_attention_layernorm
        self.next_norm: RMSNorm | None = None  # set by PackedDecoder: what normalises this layer's output
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.kv = kv  # (2, slots, kv_heads, max_len, head_dim)
        self.kv_rows = kv.view(-1, kv.shape[-1])  # (2 x slots x kv_heads x max_len, head_dim)
        self.keys, self.values = kv[0], kv[1]


def _norm(norm: RMSNorm, x: Tensor) -> Tensor:
    """The model's RMSNorm (normalise in float32, round, multiply by the weight) in fewer ops, bitwise equal:
    for float32 one fused call with the weight; for bfloat16 `rms_norm` computes in float32 and rounds once,
    which is the model's cast-normalise-round without its two casts (half the norm's time at 8 rows)."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    if x.dtype == torch.bfloat16:
        return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=norm.eps)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype)


class _Elementwise:
    """The step's work between products: the norms, the residual adds, SwiGLU's silu(gate) * up.

    Through Murmur's CPU kernels where they load (one call each, ~40x faster than PyTorch's rms_norm at one row
    on CPU, docs/journal.md), else through PyTorch's ops; the same function either way, only sums ordered
    differently.
    """

    def __init__(self, model: Transformer):
        dtype = model.embed_tokens.weight.dtype
        norms_match = all(m.weight.dtype == dtype for m in model.modules() if isinstance(m, RMSNorm))
        self.own = (norms_match and dtype in (torch.float32, torch.bfloat16)
                    and cpu_kernels.serves(model.embed_tokens.weight.device))
        if self.own:
            ops = torch.ops.murmur_cpu
            self._rms_norm, self._add_rms_norm = ops.rms_norm.default, ops.add_rms_norm_.default
            self._silu_mul = ops.silu_mul.default

    def norm(self, norm: RMSNorm, x: Tensor) -> Tensor:
        return self._rms_norm(x, norm.weight, norm.eps) if self.own else _norm(norm, x)

    def add_norm(self, x: Tensor, delta: Tensor, norm: RMSNorm) -> Tensor:
        """x += delta in place (the residual stream), then the norm of the new x."""
        if self.own:
            return self._add_rms_norm(x, delta, norm.weight, norm.eps)
        return _norm(norm, x.add_(delta))

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        if self.own:
            return self._silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)


class PackedDecoder:
    """The decode step over `model` and the engine's `cache`; see the module docstring. Build it after any
    quantization (it packs the layers the model has then)."""

    def __init__(self, model: Transformer, cache: SlotKVCache):
        if (reason := why_not(model)) is not None:
            raise ValueError(f"PackedDecoder cannot serve this model: {reason}")
        settings = model.settings
        self.model = model
        self.n_heads, self.n_kv_heads = settings.n_heads, settings.kv_heads
        self.head_dim = settings.attention_head_dim
        self.slots, self.max_len = cache.k[0].shape[0], cache.max_len
        self.layers = [_Layer(block, cache.kv[i]) for i, block in enumerate(model.blocks())]
        # The norm after each layer's residual stream: the next layer's input norm, the model's after the last.
        for layer, following in zip(self.layers, [*self.layers[1:], None]):
            layer.next_norm = model.norm if following is None else following.input_norm
        device = model.embed_tokens.weight.device
        # Flat row of (key/value, row, kv head) at position 0 of the cache's (2, slots, kv_heads, max_len) rows.
        which = torch.arange(2, device=device)[None, :, None]
        heads = torch.arange(self.n_kv_heads, device=device)[None, None, :]
        rows = torch.arange(self.slots, device=device)[:, None, None]
        self._row_base = ((which * self.slots + rows) * self.n_kv_heads + heads) * self.max_len  # (slots, 2, kvh)
        self._half = self.head_dim // 2
        self.elementwise = _Elementwise(model)
        # Murmur's CPU kernel for rope + cache write + attention, where the element-wise ones serve and the
        # model has no q/k norms (which come between the product and rope).
        own_attention = self.elementwise.own and self.layers[0].q_norm is None
        self._attend = torch.ops.murmur_cpu.attend_.default if own_attention else None

    def __call__(self, tokens: Tensor, positions: Tensor, keys: Tensor) -> Tensor:
        """Final normed hidden states (B, dim) for tokens (B, 1) at positions (B,), attending to `keys` (L,)."""
        model = self.model
        batch = tokens.shape[0]
        x = F.embedding(tokens[:, 0], model.embed_tokens.weight)
        dtype = x.dtype
        # Once per step for every layer: rotary angles, where each row's key and value go, the mask.
        angles = positions[:, None].float() * model.inv_freq.float()  # (B, head_dim/2)
        cos = angles.cos().to(dtype).repeat(1, 2)[:, None]  # (B, 1, head_dim), HF's half-split layout
        sin = angles.sin().to(dtype)
        sin = torch.cat((-sin, sin), dim=-1)[:, None]  # rotate_half(x) * sin == roll(x, half) * this
        if self._attend is None:
            kv_index = (self._row_base[:batch] + positions[:, None, None]).view(-1)
            # Additive (0 / -inf, as SDPA turns a boolean mask into) once here rather than in every layer's SDPA.
            allowed = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (B, 1, 1, L)
            mask = torch.full(allowed.shape, float("-inf"), dtype=dtype, device=x.device).masked_fill_(allowed, 0.0)
        else:
            positions = positions.contiguous()
        ew = self.elementwise
        normed = ew.norm(self.layers[0].input_norm, x)
        for layer in self.layers:
            qkv = layer.qkv(normed)  # (B, (H + 2 KVH) * D)
            if self._attend is not None:  # rope, the cache write and attention in one call
                attended = self._attend(qkv, cos[:, 0], sin[:, 0], layer.kv, positions, self.n_heads, self.n_kv_heads)
            else:
                attended = self._attention(layer, qkv, cos, sin, kv_index, mask, keys.shape[0])
            normed = ew.add_norm(x, layer.o_proj(attended), layer.post_norm)
            normed = ew.add_norm(x, layer.down_proj(ew.silu_mul(layer.gate_up(normed))), layer.next_norm)
        return normed

    def _attention(self, layer: _Layer, qkv: Tensor, cos: Tensor, sin: Tensor, kv_index: Tensor, mask: Tensor,
                   length: int) -> Tensor:
        """Rope, the cache write and attention through PyTorch's ops: (B, H * D)."""
        batch = qkv.shape[0]
        q_heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        rotated = q_heads + kv_heads  # q and k heads, side by side in the qkv product
        qk = qkv[:, :rotated * head_dim].view(batch, rotated, head_dim)
        if layer.q_norm is not None:
            qk = torch.cat((layer.q_norm(qk[:, :q_heads]), layer.k_norm(qk[:, q_heads:])), dim=1)
        # x * cos + rotate_half(x) * sin as the model rounds it (addcmul rounds once: bf16 tokens drift),
        # written over q and k in place.
        torch.add(qk * cos, torch.roll(qk, self._half, -1).mul_(sin),
                  out=qkv[:, :rotated * head_dim].view(batch, rotated, head_dim))
        layer.kv_rows.index_copy_(0, kv_index, qkv[:, q_heads * head_dim:].reshape(-1, head_dim))
        q = qkv[:, :q_heads * head_dim].view(batch, q_heads, 1, head_dim)
        return F.scaled_dot_product_attention(q, layer.keys[:batch, :, :length], layer.values[:batch, :, :length],
                                              attn_mask=mask, enable_gqa=q_heads != kv_heads).view(batch, -1)
