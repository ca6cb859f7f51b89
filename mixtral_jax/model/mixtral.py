"""The Mixtral decoder in Flax NNX, read top to bottom: norm, rotary embedding, attention, MoE, block, model.

References: Mixtral of Experts (Jiang et al., 2024, arXiv:2401.04088); Hugging Face
`transformers.models.mixtral.modeling_mixtral` (the numerical reference our tests compare against).

Every parameter carries `logical_axes` metadata; `mixtral_jax.sharding` maps those names to mesh axes.
Weights are stored in the layout that makes the einsums natural (inputs first), converted once on load.

Einsum letters: b batch, t query positions, s key positions, d model dim, h query heads, k kv heads,
g query heads per kv head, x head dim, e experts, f expert hidden dim, v vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.kernels import cpu as cpu_kernels
from mixtral_jax.model import compiled, lora
from mixtral_jax.model.attention import Span, attention
from mixtral_jax.model.kv_cache import KVCache, PagedBatch, PagedKVCache
from mixtral_jax.model.moe import expert_views, resolve_strategy, route, run_experts, without_padding
from mixtral_jax.model.paged_attention import ragged_paged_attention, write_pages
from mixtral_jax.model.quant import qeinsum, qeinsums, quantize_jax, read
from mixtral_jax.model.remat import remat_in_order
from mixtral_jax.sharding.expert_parallel import moe_expert_parallel
from mixtral_jax.sharding.rules import ACTIVATION_AXES, constrain

_INIT_STD = 0.02  # transformers' initializer_range


def _param(rngs: nnx.Rngs, shape, dtype, axes, init="normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _weight(module: nnx.Module, name: str, rngs, shape, dtype, axes, contract: tuple[int, ...], quantize: bool):
    """Set `module.<name>` to a weight; quantized, an int8 `<name>` and a float32 `<name>_scale` whose
    logical axes are the weight's minus the contracted ones (`mixtral_jax.model.quant`)."""
    if not quantize:
        setattr(module, name, _param(rngs, shape, dtype, axes))
        return
    q, scale = quantize_jax(_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32), contract)
    setattr(module, name, nnx.Param(q, logical_axes=axes))
    setattr(module, name + "_scale",
            nnx.Param(scale, logical_axes=tuple(a for i, a in enumerate(axes) if i not in contract)))


def _read(module: nnx.Module, name: str, dtype):
    """A weight for `qeinsum` and the MoE strategies: a `QArray` when quantized, else cast to `dtype`."""
    scale = getattr(module, name + "_scale", None)
    return read(getattr(module, name)[...], None if scale is None else scale[...], dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), param_dtype, ("norm",), init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)  # HF order: cast, then scale


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (b, t, head_dim) in float32, duplicated halves (HF's `rotate_half` convention)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq       # (b, t, x/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)                     # (b, t, x)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + x/2) of each head: x (b, t, heads, x)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: MixtralConfig, rt: RuntimeConfig, *, rngs: nnx.Rngs):
        pd, quant = rt.param_dtype, rt.quantize is not None
        _weight(self, "wq", rngs, (cfg.dim, cfg.n_heads, cfg.head_dim), pd, ("embed", "q_heads", "head_dim"), (0,),
                quant)
        _weight(self, "wk", rngs, (cfg.dim, cfg.n_kv_heads, cfg.head_dim), pd, ("embed", "kv_heads", "head_dim"), (0,),
                quant)
        _weight(self, "wv", rngs, (cfg.dim, cfg.n_kv_heads, cfg.head_dim), pd, ("embed", "kv_heads", "head_dim"), (0,),
                quant)
        _weight(self, "wo", rngs, (cfg.n_heads, cfg.head_dim, cfg.dim), pd, ("q_heads", "head_dim", "embed"), (0, 1),
                quant)
        self.window = cfg.sliding_window
        self.impl = rt.attention
        self.mesh = rt.mesh

    def project_qkv(self, x, cos, sin, lora_mask=None, lora_key=None):
        """q (b, t, h, x); k, v in the cache layout (b, k, t, x). `lora_mask` (b, t, l): each token's
        columns of stacked adapters (`lora.stack_adapters`), as everywhere below; `lora_key`: the layer's
        LoRA dropout key (training)."""
        dt = x.dtype
        kernel = self.mesh is None  # decode-sized products on one CPU device: mixtral_jax.kernels.cpu
        q, k, v = qeinsums(("btd,dhx->bthx", "btd,dkx->btkx", "btd,dkx->btkx"), x,
                           [_read(self, name, dt) for name in ("wq", "wk", "wv")], cpu_kernel=kernel)
        q, k, v = (lora.plus(self, name, x, y, lora_mask, lora_key) for name, y in zip(("wq", "wk", "wv"),
                                                                                        (q, k, v), strict=True))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def project_out(self, out, lora_mask=None, lora_key=None):
        return lora.plus(self, "wo", out, qeinsum("bthx,hxd->btd", out, _read(self, "wo", out.dtype),
                                                  cpu_kernel=self.mesh is None), lora_mask, lora_key)

    def __call__(self, x, cos, sin, span: Span, cache=None, start=None, lora_mask=None, lora_key=None):
        """Without a cache: self-attention over `x`'s own tokens. With `cache` = this layer's `LayerKV`,
        writes this call's keys/values at slot `start` and attends over the whole cache (the attention
        skips slots not written yet); returns (output, updated cache or None)."""
        q, k, v = self.project_qkv(x, cos, sin, lora_mask, lora_key)
        k_scale = v_scale = None
        if cache is not None:
            cache = cache.write(k, v, start, self.mesh)
            k, v, k_scale, v_scale = cache
        out = attention(q, k, v, span, window=self.window, k_scale=k_scale, v_scale=v_scale,
                        self_attention=cache is None, impl=self.impl, mesh=self.mesh)
        return self.project_out(out, lora_mask, lora_key), cache

    def paged(self, x, cos, sin, pages, scales, batch: PagedBatch, lora_mask=None):
        """A ragged step's tokens x (S, T, d): their keys/values written into their pages, then each token
        attends over its own sequence's pages. Returns (output, pages, scales)."""
        q, k, v = self.project_qkv(x, cos, sin, lora_mask)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                  # (S, T, k, x)
        pages, scales = write_pages(pages, k, v, batch.slot_mapping, scales, mesh=self.mesh)
        out = ragged_paged_attention(q, pages, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs,
                                     sm_scale=q.shape[-1] ** -0.5, sliding_window=self.window, kv_scales=scales,
                                     mesh=self.mesh)
        return self.project_out(out, lora_mask), pages, scales


class MoE(nnx.Module):
    def __init__(self, cfg: MixtralConfig, rt: RuntimeConfig, *, rngs: nnx.Rngs):
        pd, quant = rt.param_dtype, rt.quantize is not None
        e, d, f = cfg.n_experts, cfg.dim, cfg.hidden_dim
        self.router = _param(rngs, (d, e), pd, ("embed", "router"))
        _weight(self, "w1", rngs, (e, d, f), pd, ("expert", "embed", "mlp"), (1,), quant)
        _weight(self, "w3", rngs, (e, d, f), pd, ("expert", "embed", "mlp"), (1,), quant)
        _weight(self, "w2", rngs, (e, f, d), pd, ("expert", "mlp", "embed"), (1,), quant)
        self.top_k = cfg.top_k
        self.strategy = rt.moe_strategy
        self.capacity_factor = rt.capacity_factor
        self.mesh = rt.mesh

    def __call__(self, x: jax.Array, expert_weights=None, lora_mask=None, valid=None) -> tuple[jax.Array, jax.Array]:
        """x (b, t, d) -> (output (b, t, d), router logits (b, t, e)).

        `expert_weights`: this layer's (w1, w3, w2) as per-expert arrays from `Mixtral.expert_views`, read
        by the `grouped` strategy in place of static slices of the stacked parameters. `valid` (b, t): the
        real tokens (others are padding, whose output is 0 and which read no experts of their own; on one
        device, where that saves weight reads)."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        dt = x.dtype
        w1, w3, w2 = (_read(self, name, dt) for name in ("w1", "w3", "w2"))
        adapters = lora.experts(self, None if lora_mask is None else lora_mask.reshape(b * t, -1))
        if self.mesh is not None:
            out, logits = moe_expert_parallel(flat, self.router[...], w1, w3, w2, top_k=self.top_k, mesh=self.mesh,
                                              strategy=self.strategy, capacity_factor=self.capacity_factor,
                                              lora=adapters)
        else:
            routing = route(flat, self.router[...], self.top_k)
            if valid is not None:
                valid = valid.reshape(b * t)
                routing = without_padding(routing, valid)
            out = run_experts(flat, routing, w1, w3, w2, self.strategy, self.capacity_factor, expert_weights,
                              cpu_kernel=True, lora=adapters, valid=valid)
            logits = routing.logits
        return out.reshape(b, t, d), logits.reshape(b, t, -1)


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + MoE(RMSNorm(h))."""

    def __init__(self, cfg: MixtralConfig, rt: RuntimeConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=rt.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rt, rngs=rngs)
        self.moe_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=rt.param_dtype, rngs=rngs)
        self.moe = MoE(cfg, rt, rngs=rngs)

    def __call__(self, x, cos, sin, span, kv=None, start=None, expert_weights=None, lora_mask=None, lora_key=None):
        attn_out, kv = self.attn(self.attn_norm(x), cos, sin, span, kv, start, lora_mask, lora_key)
        h = x + attn_out
        moe_out, router_logits = self.moe(self.moe_norm(h), expert_weights, lora_mask)
        return h + moe_out, router_logits, kv

    def paged(self, x, cos, sin, pages, scales, batch: PagedBatch, expert_weights=None, lora_mask=None):
        attn_out, pages, scales = self.attn.paged(self.attn_norm(x), cos, sin, pages, scales, batch, lora_mask)
        h = x + attn_out
        moe_out, _ = self.moe(self.moe_norm(h), expert_weights, lora_mask, valid=batch.slot_mapping >= 0)
        return h + moe_out, pages, scales


def _rematerialized(layer: DecoderLayer, h, cos, sin, span, lora_key=None):
    """A decoder layer whose activations are recomputed in the backward pass (`remat_in_order`): training
    memory holds one (b, t, d) input per layer instead of every intermediate (attention tiles, expert
    buckets), for about a third more compute."""
    graphdef, state = nnx.split(layer)
    run = lambda state, h, cos, sin, span, key: nnx.merge(graphdef, state)(h, cos, sin, span, lora_key=key)[:2]  # noqa: E731
    return remat_in_order(run)(state, h, cos, sin, span, lora_key)


class Mixtral(nnx.Module):
    """The Mixtral causal language model. `model(tokens)` -> float32 logits (b, t, vocab)."""

    def __init__(self, config: MixtralConfig, runtime: RuntimeConfig | None = None, *, rngs: nnx.Rngs):
        rt = runtime or RuntimeConfig()
        self.config = config
        self.runtime = rt
        self.embed = _param(rngs, (config.vocab_size, config.dim), rt.param_dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(config, rt, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps, param_dtype=rt.param_dtype, rngs=rngs)
        _weight(self, "lm_head", rngs, (config.dim, config.vocab_size), rt.param_dtype, ("embed", "vocab"), (0,),
                rt.quantize is not None and rt.quantize_lm_head)
        self.remat = False  # recompute each layer in the backward pass (training sets it: `TrainConfig.remat`)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed[...][tokens].astype(self.runtime.dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.norm(h)
        return qeinsum("btd,dv->btv", h, _read(self, "lm_head", h.dtype), preferred_element_type=jnp.float32,
                       cpu_kernel=self.runtime.mesh is None)

    def __call__(self, tokens: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, return_router_logits: bool = False,
                 adapter_ids: jax.Array | None = None, lora_dropout_key: jax.Array | None = None):
        """Full causal forward pass, no cache.

        tokens (b, t) int; attention_mask (b, t) with 1 for real tokens and 0 for padding (as HF's);
        positions (b, t) default to the count of real tokens before each one, so left padding is harmless.
        adapter_ids (b,): each row's adapter on a model with stacked adapters (0: the base; see
        `lora.stack_adapters`). lora_dropout_key: training's key for the adapters' dropout (`LoRAConfig.dropout`;
        none, the default, is inference: no dropout).
        Returns logits (b, t, vocab) float32, and with `return_router_logits` also (layers, b, t, e).
        Called outside any jit or grad it runs as one compiled program (`model.compiled.forward`).
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tokens.shape}")
        inputs = (tokens, attention_mask, positions, adapter_ids, lora_dropout_key)
        static = (return_router_logits,)
        graphdef, state = nnx.split(self)
        if compiled.tracing(inputs, state):  # inside a jit or grad already
            return self._forward(*inputs, *static)
        return compiled.forward(graphdef, state, inputs, static)  # eagerly: one compiled program, not op by op

    def _forward(self, tokens, attention_mask, positions, adapter_ids, lora_dropout_key, return_router_logits):
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
        mask = lora.token_mask(self, None if adapter_ids is None else jnp.asarray(adapter_ids)[:, None], (b, t),
                               self.runtime.dtype)
        h, router_logits, _ = self._decoder(tokens, positions, Span(positions, positions, valid), lora_mask=mask,
                                            lora_key=lora_dropout_key)
        logits = self.logits(h)
        return (logits, router_logits) if return_router_logits else logits

    def use_huge_pages(self) -> int:
        """Move this model's large weights, in place and with the same values, into 2 MiB huge pages where
        the machine offers them (CPU, one device; see `cpu_kernels.huge_page_copy`): decoding streams them
        faster. The sampler and the engine call this. Returns the bytes moved (0 when nothing could be)."""
        if self.runtime.mesh is not None:
            return 0
        state, moved = cpu_kernels.huge_page_tree(nnx.state(self))
        if moved:
            nnx.update(self, state)
        return moved

    def expert_views(self, rows: int | None = None) -> tuple | None:
        """Per layer, (w1, w3, w2) as tuples of per-expert arrays sharing the parameters' memory, for
        `extend(..., expert_weights=)`; None where they would not help or would cost a copy (see
        `mixtral_jax.model.moe.expert_views`), or where a decode of `rows` tokens takes the CPU kernels, which
        read the stacked experts in place. Build them again after the parameters change."""
        if self.runtime.mesh is not None or jnp.dtype(self.runtime.param_dtype) != jnp.dtype(self.runtime.dtype):
            return None
        if resolve_strategy(self.runtime.moe_strategy) != "grouped":
            return None
        experts = [[_read(layer.moe, name, None) for name in ("w1", "w3", "w2")] for layer in self.layers]
        if rows is not None and cpu_kernels.usable(rows, *experts[0]):
            return None
        views = tuple(tuple(expert_views(w) for w in layer) for layer in experts)
        return None if any(v is None for layer in views for v in layer) else views

    def _decoder(self, tokens, positions, span: Span, cache: KVCache | None = None, expert_weights=None,
                 lora_mask=None, lora_key=None):
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        mesh = self.runtime.mesh
        h = constrain(self.embed_tokens(tokens), ACTIVATION_AXES, mesh)  # sequences split over data x expert
        router_logits, layers = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            key = None if lora_key is None else jax.random.fold_in(lora_key, i)
            if self.remat and cache is None and lora_mask is None:  # keep only each layer's input for backward
                h, layer_router_logits = _rematerialized(layer, h, cos, sin, span, key)
            else:
                h, layer_router_logits, kv = layer(h, cos, sin, span, kv, None if cache is None else cache.length,
                                                   None if expert_weights is None else expert_weights[i], lora_mask,
                                                   key)
            h = constrain(h, ACTIVATION_AXES, mesh)
            router_logits.append(layer_router_logits)
            layers.append(kv)
        return h, jnp.stack(router_logits), tuple(layers) if cache is not None else None

    def extend(self, cache: KVCache, tokens: jax.Array, valid: jax.Array | None = None, *,
               last_only: bool = False, expert_weights=None) -> tuple[jax.Array, KVCache]:
        """Feed `tokens` (b, t) through the model after what `cache` holds; returns (logits, new cache).

        The cache has one slot per step for every row; `valid` (b, t) marks real tokens (False for left
        padding). Each token's position is the number of real tokens before it in its row. `last_only`
        computes logits for the last position only (all a sampler needs; skips most of the LM head).
        `expert_weights`: `expert_views()`, passed in as a jit argument (faster on CPU; same numbers).
        """
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
        positions = cache.next_position[:, None] + jnp.cumsum(valid, axis=-1) - 1
        positions = jnp.maximum(positions, 0).astype(jnp.int32)
        kv_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.length, axis=1)
        kv_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.length, axis=1)
        h, _, layers = self._decoder(tokens, positions, Span(positions, kv_pos, kv_valid), cache, expert_weights,
                                     lora.token_mask(self, None, (b, t), self.runtime.dtype))
        new_cache = cache.with_layers(layers, positions=kv_pos, valid=kv_valid, length=cache.length + t,
                                      next_position=cache.next_position + valid.sum(-1).astype(jnp.int32)
                                      ).laid_out(self.runtime.mesh)
        return self.logits(h[:, -1:] if last_only else h), new_cache

    def extend_paged(self, cache: PagedKVCache, tokens: jax.Array, batch: PagedBatch, sample_at: jax.Array, *,
                     expert_weights=None, adapter_ids: jax.Array | None = None) -> tuple[jax.Array, PagedKVCache]:
        """One ragged step over a paged cache: tokens (S, T) of several sequences per shard (prefill chunks
        and decode tokens alike; see `PagedBatch`), written into their pages. Returns the logits at the
        token slots `sample_at` (S, R) of each shard's block, (S, R, vocab) float32, and the new cache.
        `adapter_ids` (S, T): each token's adapter on a model with stacked adapters (0: the base)."""
        cos, sin = rope_tables(batch.positions, self.config.head_dim, self.config.rope_theta)
        mesh = self.runtime.mesh
        h = constrain(self.embed_tokens(tokens), ACTIVATION_AXES, mesh)     # (S, T, d): shards over data x expert
        scales = cache.scales or (None,) * len(self.layers)
        mask = lora.token_mask(self, adapter_ids, tokens.shape, self.runtime.dtype)
        new_pages, new_scales = [], []
        for i, layer in enumerate(self.layers):
            h, pages, layer_scales = layer.paged(h, cos, sin, cache.pages[i], scales[i], batch,
                                                 None if expert_weights is None else expert_weights[i], mask)
            h = constrain(h, ACTIVATION_AXES, mesh)
            new_pages.append(pages)
            new_scales.append(layer_scales)
        h = jnp.take_along_axis(h, sample_at[..., None], axis=1)             # (S, R, d)
        cache = PagedKVCache(tuple(new_pages), None if cache.scales is None else tuple(new_scales))
        return self.logits(h), cache.laid_out(mesh)
