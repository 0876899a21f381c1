"""Tiny random models of every supported MoE family (2 MoE layers, hidden 32, 4-8 experts), built
from configs in memory (nothing is downloaded), a word-level tokenizer over their vocabulary and
random token batches."""

from __future__ import annotations

import torch

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # larger than the usual 0.02 so that experts differ clearly and selections are not near-ties
    initializer_range=0.2, tie_word_embeddings=False,
)
_DEEPSEEK = dict(
    num_key_value_heads=4,  # deepseek's attention needs as many kv heads as heads
    intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, num_hidden_layers=3,  # one dense layer first, then two MoE layers
    kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
)

TINY_CONFIGS: dict[str, dict] = {
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      head_dim=8, norm_topk_prob=True),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1, routed_scaling_factor=1.5),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=16, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True),
    "granitemoe": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, input_jitter_noise=0.1,
                   router_jitter_noise=0.1),
}
FAMILY_NAMES = sorted(TINY_CONFIGS)
JITTERING = ("mixtral", "phimoe")


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_COMMON, **TINY_CONFIGS[family], **overrides})


def tiny_model(family: str, seed: int = 0, experts_implementation: str | None = None, **overrides):
    """A randomly initialised tiny model of `family` in eval mode (same seed -> same weights)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if family == "deepseek_v3":
        # a non-zero correction bias, so the router's choice differs from the top-k of its scores
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


def save_tokenizer(directory) -> None:
    """A word-level tokenizer over the tiny vocabulary ("w4" ... "w95"), saved the Hugging Face way."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(directory)


def token_batches(seed: int = 0, batches: int = 2, batch_size: int = 2, length: int = 12) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch_size, length), generator=generator) for _ in range(batches)]
