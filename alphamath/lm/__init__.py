"""One local model serving both the policy (generation) and the value head, with a prefix KV cache.

MCTS asks for the same text over and over: every expansion of a question starts with the same
few-shot prompt, the n siblings of an expansion share their parent state, and the value of a child
is the parent state plus the sampled step plus a few appended tokens (the code output, "</step>").
`LocalLM` keeps the KV states (and the value-head output) of every token it has computed in a
radix tree keyed by token ids, so each token of the tree is run through the trunk once.

The package, one concern a module (in the manner of sglang's mem_cache/ and managers/):
- `radix_cache`: the prefix cache (`PrefixCache`);
- `kv`: cache layers with room to grow in place, the running decode batch, its samples and requests;
- `scheduler`: admission of waiting requests into the running batch, the decode loop;
- `lock`: the fair lock around the model, the cache and the tokenizer;
- `local_lm`: `LocalLM` itself (prefill, score, generate, sampling).
"""
from alphamath.lm.local_lm import LocalLM
from alphamath.lm.radix_cache import PrefixCache

__all__ = ["LocalLM", "PrefixCache"]
