"""The llama family: llama (SmolLM2, Llama 3) and qwen2 (Qwen2.5).

Pre-norm decoder layers of RMSNorm, rotary grouped-query attention (qwen2 adds q/k/v biases) and
a SwiGLU MLP; the output head is `output.weight` or, when the file has none, the tied embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker_orcd.engine.forward_batch import ForwardBatch
from worker_orcd.gguf.reader import GGUFError, GGUFFile
from worker_orcd.layers.attention import Attention, KVCache
from worker_orcd.layers.norm import RMSNorm
from worker_orcd.layers.quant_linear import QKVLinear, QuantEmbedding, QuantLinear, QuantSwiGLU
from worker_orcd.layers.rotary import RopeStyle, RotaryEmbedding
from worker_orcd.models.registry import register
from worker_orcd.models.weights import WeightLoader

ROPE_STYLES = {"llama": RopeStyle.INTERLEAVED, "qwen2": RopeStyle.NEOX}


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_style: RopeStyle
    context_length: int

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> LlamaConfig:
        arch = gguf.architecture

        def key(name: str, default: object = None) -> object:
            value = gguf.metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise GGUFError(gguf.path, f"expected metadata key {arch}.{name}, found none")
            return value

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        return cls(
            architecture=arch,
            vocab_size=gguf.tensors["token_embd.weight"].shape[0],
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("attention.key_length", hidden // heads)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10_000.0)),
            rope_style=ROPE_STYLES[arch],
            context_length=int(key("context_length")),
        )


class LlamaAttention(nn.Module):
    def __init__(
        self, config: LlamaConfig, index: int, weights: WeightLoader, rotary: RotaryEmbedding
    ):
        super().__init__()

        def projection(name: str) -> QuantLinear:
            prefix = f"blk.{index}.attn_{name}"
            return QuantLinear(
                weights.quant(f"{prefix}.weight"), weights.optional_vector(f"{prefix}.bias")
            )

        self.qkv_proj = QKVLinear(projection("q"), projection("k"), projection("v"))
        self.o_proj = projection("output")
        self.attn = Attention(index, config.num_heads, config.num_kv_heads, config.head_dim, rotary)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache, norm: RMSNorm
    ) -> torch.Tensor:
        """x + attention(norm(x)): the norm rides in the q/k/v projections, the residual add
        in the output projection."""
        q, k, v = self.qkv_proj(x, norm)
        return self.o_proj(self.attn(q, k, v, batch, cache), residual=x)


class LlamaMLP(nn.Module):
    def __init__(self, index: int, weights: WeightLoader):
        super().__init__()
        self.gate_up_proj = QuantSwiGLU(
            QuantLinear(weights.quant(f"blk.{index}.ffn_gate.weight")),
            QuantLinear(weights.quant(f"blk.{index}.ffn_up.weight")),
        )
        self.down_proj = QuantLinear(weights.quant(f"blk.{index}.ffn_down.weight"))

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x + mlp(norm(x))."""
        return self.down_proj(self.gate_up_proj(x, norm), residual=x)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: LlamaConfig, index: int, weights: WeightLoader, rotary: RotaryEmbedding
    ):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(weights.vector(f"blk.{index}.attn_norm.weight"), eps)
        self.self_attn = LlamaAttention(config, index, weights, rotary)
        self.post_attention_norm = RMSNorm(weights.vector(f"blk.{index}.ffn_norm.weight"), eps)
        self.mlp = LlamaMLP(index, weights)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        x = self.self_attn(x, batch, cache, self.input_norm)
        return self.mlp(x, self.post_attention_norm)


@register("llama", "qwen2")
class LlamaForCausalLM(nn.Module):
    def __init__(self, weights: WeightLoader):
        super().__init__()
        config = LlamaConfig.from_gguf(weights.gguf)
        self.config = config
        self.device = weights.device
        rotary = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_style, config.context_length
        ).to(self.device)
        embedding = weights.quant("token_embd.weight")
        self.embed_tokens = QuantEmbedding(embedding)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, weights, rotary) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(weights.vector("output_norm.weight"), config.rms_norm_eps)
        has_head = weights.has("output.weight")
        self.lm_head = QuantLinear(weights.quant("output.weight") if has_head else embedding)

    def kv_block_bytes(self, block_size: int) -> int:
        c = self.config
        return KVCache.bytes_per_block(
            c.num_layers, block_size, c.num_kv_heads, c.head_dim, self.device
        )

    def new_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        c = self.config
        return KVCache(
            c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.device
        )

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Hidden states (before the final norm) of the batch's tokens."""
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, batch, cache)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (tokens, vocab) of hidden states (tokens, hidden); the final norm rides in the
        output head."""
        return self.lm_head(hidden, norm=self.norm)
