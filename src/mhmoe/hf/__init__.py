"""Hugging Face transformers integration (extra `hf`): `MHMoEConfig`, `MHMoEModel`, `MHMoEForCausalLM`, run
conversion.

Importing this package registers model_type "mhmoe" with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, so
`AutoModelForCausalLM.from_pretrained(path)` loads a saved model after `import mhmoe.hf`; it also registers
"mhmoe" and "mhmoe_triton" in transformers' experts registry (`mhmoe.hf.experts`), so
`from_pretrained(..., experts_implementation="mhmoe")` runs transformers' own MoE models' experts through mhmoe.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from mhmoe.hf import experts
from mhmoe.hf.configuration_mhmoe import MHMoEConfig
from mhmoe.hf.modeling_mhmoe import (
    MHMoECausalLMOutput,
    MHMoEForCausalLM,
    MHMoEModel,
    MHMoEModelOutput,
    MHMoEPreTrainedModel,
)

AutoConfig.register(MHMoEConfig.model_type, MHMoEConfig, exist_ok=True)
AutoModel.register(MHMoEConfig, MHMoEModel, exist_ok=True)
AutoModelForCausalLM.register(MHMoEConfig, MHMoEForCausalLM, exist_ok=True)
experts.register()

__all__ = [
    "MHMoECausalLMOutput",
    "MHMoEConfig",
    "MHMoEForCausalLM",
    "MHMoEModel",
    "MHMoEModelOutput",
    "MHMoEPreTrainedModel",
]
