"""The language model: a decoder-only transformer in plain PyTorch, in the Hugging Face Llama layout.

This file owns the network (RMSNorm, RoPE, grouped-query attention, SwiGLU), its KV cache and
``generate``, the parameter / FLOP formulas, and the on-disk format (``config.json`` +
``model.safetensors``) that ``transformers.LlamaForCausalLM`` and vLLM read as they are. It knows
nothing about tokenizers, storage, serving or distributed training; ``generate`` samples and checks its
arguments with lm.sampling, as the serving engine does.

    model = Transformer(cfg.model)                    # cfg.model: lm.config.ModelConfig
    logits, loss = model(x, y)                        # x, y: [B, T] int64; y may hold IGNORE (-100: no loss)
    new_ids = model.generate([[1, 2, 3], [4]], 50, temperature=0.8, top_k=200, eos_id=0, seed=0)

Parameter names follow Llama (``model.layers.{i}.self_attn.q_proj.weight``, ...); with tied
embeddings ``lm_head.weight`` is the embedding matrix and is left out of the file, as HF does.
RoPE uses the "rotate_half" convention (first/second half of each head are the pair), so HF
loads the weights without any permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.config import ModelConfig
from lm.head_loss import linear_cross_entropy
from lm.loss_mask import IGNORE
from lm.sampling import check_prompt, check_settings, row_settings, sample_rows

# ----------------------------------------------------------------------------------------- formulas


def num_params(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (a tied embedding counted once)."""
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    attn = d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + cfg.n_heads * hd * d
    per_layer = attn + 3 * d * cfg.ff_dim + 2 * d + (2 * hd if cfg.qk_norm else 0)  # + the RMSNorm weights
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embed + L * per_layer + d  # + final norm


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), for MFU: ``6·N_matmul + 12·L·H·head_dim·T``.

    ``N_matmul`` counts every weight used in a matmul (q/k/v/o, gate/up/down, and the lm_head even
    when it is tied to the embedding) but not the embedding lookup nor the norms; the second term
    is the attention scores and weighted sum (QKᵀ and AV: 2 matmuls x 2 FLOPs x 3 for fwd+bwd).
    """
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    per_layer = 2 * d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + 3 * d * cfg.ff_dim
    n_matmul = L * per_layer + cfg.vocab_size * d
    return 6 * n_matmul + 12 * L * cfg.n_heads * hd * seq_len


# ------------------------------------------------------------------------------------------ modules


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as HF Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., dim] -> [..., dim]
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos/sin [max_seq_len, head_dim] in fp32, halves duplicated (HF "rotate_half" layout)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    freqs = torch.arange(cfg.max_seq_len, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, hd] by cos/sin [B|1, 1, T, hd]: pairs are (i, i + hd/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values for every layer, [B, n_kv_heads, max_len, head_dim] each.

    ``Transformer.forward(..., kv_cache=cache)`` writes the new positions at ``cache.length``,
    attends over everything cached so far and advances ``length``.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, hd] at ``length``; every cached key / value [B, Hkv, length + T, hd]."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class AttentionMask(NamedTuple):
    """What each query may attend to: ``causal`` (the plain causal mask: SDPA's fast path), or ``allowed``
    (bool [B|1, 1, T, S], True = the query may see the key; left padding, a KV cache), or neither (every
    key: one new token over a cache without padding)."""

    causal: bool = False
    allowed: Tensor | None = None


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (and optional QK-norm), through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.attn_dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:  # Qwen3: each head's queries and keys normalised over head_dim, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, cache: KVCache | None,
                layer: int) -> Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; cos / sin [B|1, 1, T, hd]; ``cache``: append, attend to
        everything cached."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # [B, T, Hkv, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, Hkv, S, hd], S = cached + T
        y = F.scaled_dot_product_attention(  # [B, H, T, hd]
            q, k, v,
            attn_mask=mask.allowed,
            is_causal=mask.causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, H*hd] -> [B, T, d_model]


ACTIVATIONS = {"silu": F.silu, "relu2": lambda x: F.relu(x).square()}  # model.activation -> function


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, gated ReLU² with relu2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d_model] -> [B, T, ff_dim] -> [B, T, d_model]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, cache: KVCache | None,
                layer: int) -> Tensor:  # [B, T, d_model] -> [B, T, d_model]
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class LMHead(nn.Linear):
    """The vocabulary projection: hidden [..., d_model] -> logits [..., V]. Called with targets and a fused
    ``kernel`` (lm.head_loss: chunked, liger), it returns the mean cross-entropy instead, without the whole
    logits (a call of this module, so that ZeRO-3 gathers its weight as for any layer)."""

    def forward(self, hidden: Tensor, targets: Tensor | None = None, kernel: str = "torch") -> Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), self.weight, targets.reshape(-1), kernel)


class Transformer(nn.Module):
    """Token ids → next-token logits. ``.model`` holds embed_tokens / layers / norm, then ``.lm_head``.

    Init: embeddings and linears ~ N(0, init_std); o_proj and down_proj (the projections writing
    into the residual stream) ~ N(0, init_std/sqrt(2·n_layers)); norm weights 1.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(
            {
                "embed_tokens": nn.Embedding(cfg.vocab_size, cfg.d_model),
                "layers": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
                "norm": RMSNorm(cfg.d_model, cfg.norm_eps),
            }
        )
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.drop = nn.Dropout(cfg.dropout)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():  # a tied weight is listed once
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, cfg.init_std)

    def num_parameters(self) -> int:
        """Parameters actually held (a tied weight counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                last_only: bool = False, loss_kernel: str = "torch") -> tuple[Tensor | None, Tensor | None]:
        """input_ids [B, T] → (float32 logits [B, T, V], cross-entropy loss or None).

        position_ids: [B, T] or [1, T]; default: consecutive positions after what ``kv_cache`` holds.
        attention_mask: [B, T_total] 1 = real token, 0 = (left) padding, T_total = cached + T.
        kv_cache: a :class:`KVCache`; the new keys/values are appended and ``length`` advances.
        last_only: logits of the last position only ([B, 1, V]; a prefill needs no more); no targets.
        loss_kernel: with targets, chunked or liger (lm.head_loss) give the loss and no logits (None).
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True computes no loss; pass targets=None")
        hidden = self.hidden_states(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    kv_cache=kv_cache, last_only=last_only)
        if targets is not None and loss_kernel != "torch":
            if self.cfg.logit_softcap:
                raise ValueError(f"model.logit_softcap needs loss_kernel torch, not {loss_kernel}")
            return None, self.lm_head(hidden, targets, loss_kernel)
        logits = self.lm_head(hidden).float()  # [B, T, V]
        if cap := self.cfg.logit_softcap:
            logits = cap * torch.tanh(logits / cap)  # [B, T, V] within (-cap, cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
        return logits, loss

    def hidden_states(self, input_ids: Tensor, *, position_ids: Tensor | None = None,
                      attention_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                      last_only: bool = False) -> Tensor:
        """The final normed hidden states [B, T (1 with last_only), d_model]: what ``lm_head`` reads
        (arguments as in :meth:`forward`)."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {start} used + {T} new "
                             "do not fit")
        if position_ids is None:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {start + T} exceeds max_seq_len {self.cfg.max_seq_len}")
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None]
        cos = self.rope_cos[position_ids][:, None]  # [B|1, 1, T, hd]
        sin = self.rope_sin[position_ids][:, None]
        mask = self._attention_mask(B, T, start, attention_mask, input_ids.device)
        x = self.drop(self.model.embed_tokens(input_ids))  # [B, T, d_model]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.model.norm(x[:, -1:] if last_only else x)  # [B, T or 1, d_model]

    @staticmethod
    def _attention_mask(B: int, T: int, start: int, attention_mask: Tensor | None,
                        device: torch.device) -> AttentionMask:
        """Plain causal when nothing is cached nor padded, none for one new token over an unpadded cache,
        else ``allowed`` [B|1, 1, T, start + T]: causal, and (``attention_mask`` [B, start + T]) no
        padding."""
        if attention_mask is None and start == 0:
            return AttentionMask(causal=T > 1)
        if attention_mask is None and T == 1:
            return AttentionMask()
        q_pos = torch.arange(start, start + T, device=device)[:, None]  # [T, 1]
        k_pos = torch.arange(start + T, device=device)[None, :]  # [1, S]
        allowed = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
        if attention_mask is not None:
            # a query may always see itself, so padding rows never get an all-masked (NaN) softmax
            allowed = (allowed & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)  # [B, 1, T, S]
        return AttentionMask(allowed=allowed)

    # ------------------------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
        stop: Callable[[int, list[int]], bool] | None = None,
    ) -> list[list[int]]:
        """Continue each prompt; return only the new tokens of each, in order.

        Prompts of different lengths are left-padded into one batch (attention mask + per-row
        positions), prefilled once, then decoded one token per step through a KV cache.
        temperature 0 = greedy; top_k / top_p filter before sampling (lm.sampling.sample_rows, the
        serving engine's sampler: one uniform number per row and step, from a CPU generator, so a seed
        gives the same tokens on any device, and one prompt the engine's tokens for a request with that
        seed and these settings). A row stops at ``eos_id``
        (not included in its output), when ``stop(row, new_ids)`` returns True (the token that
        triggered it *is* included), or after ``max_new_tokens``, capped so that prompt + new
        tokens fit ``max_seq_len``. ``seed`` makes sampling deterministic (for the same batch).
        Arguments are checked as the serving engine checks a request (lm.sampling).
        """
        check_settings(max_new_tokens, temperature, top_k, top_p, where="generate",
                       max_tokens_name="max_new_tokens")
        for i, p in enumerate(prompts):
            check_prompt(p, vocab_size=self.cfg.vocab_size, context_length=self.cfg.max_seq_len,
                         where=f"prompts[{i}]")
        budgets = [min(max_new_tokens, self.cfg.max_seq_len - len(p)) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        if not prompts or max(budgets) == 0:
            return out
        was_training = self.training
        self.eval()
        try:
            self._decode(prompts, budgets, out, (temperature, top_k, top_p), eos_id, seed, stop)
        finally:
            self.train(was_training)
        return out

    def _decode(self, prompts: list[list[int]], budgets: list[int], out: list[list[int]],
                sampling: tuple[float, int | None, float | None], eos_id: int | None, seed: int | None,
                stop: Callable[[int, list[int]], bool] | None) -> None:
        """:meth:`generate`'s loop: prefill the left-padded batch, then one token per step for every row
        until each is done, its new tokens appended to ``out``."""
        device, B, steps = self.rope_cos.device, len(prompts), max(budgets)
        lens = [len(p) for p in prompts]
        P = max(lens)
        ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=device)  # [B, P]
        mask = torch.tensor([[0] * (P - n) + [1] * n for n in lens], device=device)  # [B, P], 0: left pad
        cache = KVCache(self.cfg, B, P + steps, device=device, dtype=self.model.embed_tokens.weight.dtype)
        temperature, top_k, top_p = row_settings(B, *sampling, self.cfg.vocab_size, device)  # [B] each
        gen = torch.Generator().manual_seed(seed) if seed is not None else None  # CPU: any device draws alike
        next_pos = torch.tensor(lens, device=device)  # [B]
        done = [b == 0 for b in budgets]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        logits, _ = self(ids, position_ids=positions, attention_mask=mask, kv_cache=cache)  # [B, P, V]
        for step in range(steps):
            draw = sampling[0] > 0  # greedy draws no number (and leaves the global RNG alone)
            uniforms = (torch.rand(B, generator=gen) if draw else torch.zeros(B)).to(device)  # [B]
            tokens = sample_rows(logits[:, -1], temperature, top_k, top_p, uniforms)  # [B]
            for i, t in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if t == eos_id:
                    done[i] = True
                    continue
                out[i].append(t)
                done[i] = len(out[i]) >= budgets[i] or (stop is not None and bool(stop(i, list(out[i]))))
            if all(done):
                return
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # [B, P + step + 1]
            pos = (next_pos + step).clamp(max=self.cfg.max_seq_len - 1)  # finished rows idle
            logits, _ = self(tokens[:, None], position_ids=pos[:, None], attention_mask=mask, kv_cache=cache)
