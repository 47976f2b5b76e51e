"""The policy/value network and the embedded model it starts from.

- `value_head`: `ValueHeadModel`, a causal LM plus a value head stored beside the HF checkpoint;
- `attention`: the grouped-query attention kernel the model loads with;
- `dtype`: which compute dtype to load and train in;
- `embedded`: the embedded SmolLM2-135M-Instruct, materialised once as a safetensors checkpoint.
"""
from alphamath.model.dtype import default_dtype
from alphamath.model.embedded import embedded_checkpoint, embedded_tokenizer
from alphamath.model.value_head import VALUE_HEAD_FILE, ValueHeadModel, ValueHeadOutput

__all__ = ["VALUE_HEAD_FILE", "ValueHeadModel", "ValueHeadOutput", "default_dtype", "embedded_checkpoint",
           "embedded_tokenizer"]
