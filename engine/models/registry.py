"""HF architecture name -> model class."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # same graph; q/k/v biases come from ModelConfig.qkv_bias
}
