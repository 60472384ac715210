"""The attention path of the transformer's dual-stream blocks: no dense mask when nothing is padded.

diffusers 0.42.1's `HunyuanVideo15AttnProcessor2_0` always turns the (B, S) token mask into a dense (B, 1, S, S)
boolean mask and hands it to SDPA, even when every token is valid. A mask rules out PyTorch's FLASH kernel on CUDA
(it takes no `attn_mask`) and costs B*S^2 bytes per block: 0.7 GiB at 480p, 12 GiB at 720p. hvtune's batches usually
have no padding at all (text trimmed to the batch's longest caption, zero ByT5 tokens when no caption quotes text, no
image tokens for t2v), so `MaskFreeAttnProcessor` passes `attn_mask=None` in that case and falls back to the stock
processor, unchanged, whenever a token is padded (e.g. a batch of captions of different lengths, or classifier-free
guidance with a longer negative prompt). Both paths give the same result (tests/test_attention.py).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0


class MaskFreeAttnProcessor(HunyuanVideo15AttnProcessor2_0):
    """`HunyuanVideo15AttnProcessor2_0` that gives the attention backend no mask when no token is padded."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # (B, S_text) mask: one small host sync per block, negligible next to a block at video sequence lengths
        if attention_mask is not None and not bool(attention_mask.all()):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(2, (attn.heads, -1))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if encoder_hidden_states is not None:
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            text_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, encoder_hidden_states
        n_text = encoder_hidden_states.shape[1]
        out, text_out = out[:, : out.shape[1] - n_text], out[:, out.shape[1] - n_text :]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


def use_mask_free_attention(transformer) -> int:
    """Install `MaskFreeAttnProcessor` on every dual-stream block (the token refiner keeps its own attention, which
    does need its padding mask). Returns the number of blocks changed."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(MaskFreeAttnProcessor())
    return len(transformer.transformer_blocks)
