"""A Llama whose MLP width differs per decoder layer: a LoNAS subnet with per-layer widths, saved as a model folder.

Transformers' Llama has one `intermediate_size` for every layer. This file adds `layer_intermediate_sizes` and
builds each layer's MLP at its own width. It imports only transformers and torch: `adapters.width` copies it into
the saved folder with an `auto_map`, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
loads the model without nlsflow installed.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP


@strict
class PerLayerLlamaConfig(LlamaConfig):
    model_type = "nlsflow_llama"

    layer_intermediate_sizes: list[int] | None = None  # one MLP width per decoder layer; None: intermediate_size

    def validate_architecture(self):
        super().validate_architecture()
        sizes = self.layer_intermediate_sizes
        if sizes is not None and len(sizes) != self.num_hidden_layers:
            raise ValueError(f"layer_intermediate_sizes has {len(sizes)} entries for {self.num_hidden_layers} layers")


class PerLayerLlamaForCausalLM(LlamaForCausalLM):
    config_class = PerLayerLlamaConfig

    def __init__(self, config: PerLayerLlamaConfig):
        super().__init__(config)
        for layer, size in zip(self.model.layers, config.layer_intermediate_sizes or ()):
            if size != layer.mlp.intermediate_size:
                layer_config = copy.copy(config)
                layer_config.intermediate_size = size
                layer.mlp = LlamaMLP(layer_config)
        self.post_init()
