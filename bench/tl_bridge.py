"""TransformerLens' TransformerBridge as a peer in bench/overhead.py and bench/patching.py.

The bridge (transformer-lens >= 3) wraps a Hugging Face model instead of re-implementing it,
and exposes TransformerLens hook names on it. Two facts shape how it is used here:

- `boot_transformers(..., hf_model=hf)` rewires the module tree of `hf` in place (each
  decoder layer becomes a BlockBridge, each Linear a LinearBridge), so it gets a private copy
  of the weights, never interplab's model: hooks of one must not run inside the other.
- The bridge computes attention itself (eagerly, to expose hook_attn_scores / hook_pattern),
  so its activations equal an eager-attention HF model bit for bit and differ from HF's
  default SDPA kernels by float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

import copy


def boot_bridge(model):
    """A TransformerBridge over a private copy of `model.hf` (see the module docstring)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(model.source), hf_model=copy.deepcopy(model.hf),
                                               tokenizer=model.tokenizer, device=str(model.device),
                                               dtype=model.hf.dtype)


def patch_grid(bridge, enc, names):
    """Denoising activation patching with the bridge's own hooks, one forward per cell: the metric
    (enc.score at the last token, mean over prompts) for each hook name (rows) and position
    (columns) of the corrupted run, that position's activation taken from the clean run."""
    import torch

    ids, mask = enc.run("corrupted")
    clean_ids, clean_mask = enc.run("clean")
    if not torch.equal(mask, clean_mask):
        raise ValueError("the bridge reference needs clean and corrupted prompts of equal token lengths")
    with torch.no_grad():
        _, clean = bridge.run_with_cache(clean_ids, attention_mask=clean_mask, names_filter=lambda n: n in names)
        rows, last = torch.arange(len(enc)), enc.last("corrupted")
        out = torch.zeros(len(names), ids.shape[1])
        for i, name in enumerate(names):
            for p in range(ids.shape[1]):
                logits = bridge.run_with_hooks(ids, attention_mask=mask,
                                               fwd_hooks=[(name, _writer(clean[name], mask[:, p].bool(), p))])
                out[i, p] = enc.score(logits[rows, last]).mean()
    return out  # (names, positions)


def _writer(source, rows, p):
    """A TransformerLens hook that writes source[rows, p] into the activation (a new tensor)."""
    def hook(act, hook):
        act = act.clone()
        act[rows, p] = source[rows, p].to(act.dtype)
        return act
    return hook


def steered_tokens(bridge, ids, name, vector, scale, new_tokens, *, kv_cache: bool = False):
    """Greedy continuation of `ids` (1, seq) with scale * vector added to the activation at hook
    `name` at every position; the new token ids (new_tokens,), EOS not stopping it.

    kv_cache=False by default: with transformers 5.24 the bridge's attention looks for the cache
    under the `past_key_values` keyword while HF passes it as `cache`, so with the cache on each
    step sees only its own token and the continuation is wrong (measured on TinyStories-656K
    and SmolLM2)."""
    import torch

    def add(act, hook):
        return act + scale * vector.to(act.device, act.dtype)

    with torch.no_grad(), bridge.hooks(fwd_hooks=[(name, add)]):
        out = bridge.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_past_kv_cache=kv_cache,
                              stop_at_eos=False, return_type="tokens", verbose=False)
    return out[0, ids.shape[1]:]
