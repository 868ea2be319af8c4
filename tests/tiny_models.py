"""Tiny randomly initialised transformers models (no download) for fast tests."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


# the shape every tiny Llama-style model shares
_LLAMA_STYLE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)


def tiny_llama(seed: int = 0, *, num_key_value_heads: int = 2) -> LlamaForCausalLM:
    """Grouped-query attention by default (2 key/value heads for 4 query heads), as SmolLM2."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_LLAMA_STYLE, num_key_value_heads=num_key_value_heads)).eval()


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    """Multi-head attention (as many key/value heads as query heads)."""
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**_LLAMA_STYLE, num_key_value_heads=4, head_dim=8)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Multi-head attention, and biases on q/k/v as Qwen2 has."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**_LLAMA_STYLE, num_key_value_heads=4)).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for block in model.model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.bias.normal_()
    return model


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
    )
    return OPTForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


TINY_MODELS = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}
# Other Llama-style families, for what differs between them (attention layout, biases): tests of surgery.
LLAMA_STYLE_MODELS = {"mistral": tiny_mistral, "qwen2": tiny_qwen2}


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models run their microsecond-sized ops fastest on one thread: with several, every op
    pays for waking the others (and on a busy machine, for waiting on a descheduled one).
    Tests marked slow (the course model) keep torch's thread count."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
