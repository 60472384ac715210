"""The attention of the transformer's dual-stream blocks: no mask when nothing is padded, a key mask when something is.

diffusers 0.42.1's `HunyuanVideo15AttnProcessor2_0` turns the (B, S_text) token mask into a dense (B, 1, S, S) boolean
mask `valid(query) & valid(key)` and hands it to SDPA, even when every token is valid. That costs B*S^2 bytes per
block (0.7 GiB at 480p, 12 GiB at 720p, per sample) and rules out PyTorch's FLASH kernel on CUDA, which takes no
`attn_mask`. `KeyPaddingAttnProcessor` is the same computation with the mask cut to what changes a result:

- no token padded (hvtune's batches of one sample, or of equal-length captions: text is trimmed to the batch's longest
  caption, captions without quoted text get zero ByT5 tokens, t2v gets no image tokens): `attn_mask=None`, so SDPA
  may pick its FLASH kernel;
- padding left (captions of different lengths in one batch): a (B, 1, 1, S) key mask, B*S bytes. Only padded keys
  have to be hidden. A padded query's output differs from the stock processor's, but nothing reads it: padded text
  tokens are masked as keys in every block and the text stream is dropped after the last one, so every valid token,
  and the prediction, are the same (tests/test_attention.py).

The kernel is the dispatcher backend `attention_mechanism` names (`hvtune.config.kernels`): one for steps that
track gradients (training) and one for those that do not (validation), since SimpleTuner runs SageAttention in
inference only by default. A kernel that takes no mask (flash-attn, aiter) hands padded batches to SDPA.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from hvtune.config.kernels import MASKLESS_BACKENDS


class _LastAnswer:
    """Whether the last token mask seen was all valid. The model hands the same mask tensor to all 54 blocks (and to
    their gradient-checkpoint recomputes): asking once per forward saves 100+ host syncs a step, which would stall
    the CPU's kernel queue and cannot be captured by CUDA graphs. Keyed on the tensor itself (a weak reference, so a
    new tensor at a reused address is never mistaken for it) and its version counter (in-place edits)."""

    ref: weakref.ref | None = None
    version = -1
    all_valid = False

    @classmethod
    def all_valid_for(cls, token_mask: torch.Tensor) -> bool:
        if cls.ref is None or cls.ref() is not token_mask or cls.version != token_mask._version:
            cls.all_valid = bool(token_mask.all())
            cls.ref, cls.version = weakref.ref(token_mask), token_mask._version
        return cls.all_valid


def declare_padding_before_each_forward(transformer) -> None:
    """Answer "is any text or image token padded?" once per forward, from the transformer's own inputs and before
    its (compiled) blocks run, the way diffusers' forward builds the joint mask: a text token is padded where its
    mask is 0, and a t2v call's image tokens (all-zero `image_embeds`) are all masked. The answer stays set for the
    gradient-checkpoint recomputes of that forward's blocks, until the next forward replaces it."""

    def before(module, args, kwargs) -> None:
        masks = [kwargs.get(k) for k in ("encoder_attention_mask", "encoder_attention_mask_2")]
        image = kwargs.get("image_embeds")
        text_valid = all(m is None or bool(m.all()) for m in masks)
        image_valid = image is None or image.shape[1] == 0 or bool(image.any())
        for block in module.transformer_blocks:
            block.attn.processor.all_valid_declared = text_valid and image_valid

    transformer.register_forward_pre_hook(before, with_kwargs=True)


def key_padding_mask(
    token_mask: torch.Tensor | None,
    seq_len: int,
    all_valid: bool | None = None,
    part: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """None when every key is valid, else the (B, 1, 1, seq_len) bool mask of valid keys. `token_mask` covers the
    last tokens of the joint sequence (the text); the video tokens before them are always valid. `all_valid`: the
    answer declared before the forward (compiled runs), else asked of the mask.

    `part` = (rank, ranks) under context parallelism: `token_mask` is the whole text's, and this rank's keys are
    its part of it (`chunk`, as diffusers' sharder splits the text).
    The answer "nothing is padded" is taken on the whole mask, so every rank of the group answers alike."""
    if all_valid is None and token_mask is not None:
        all_valid = _LastAnswer.all_valid_for(token_mask)
    if token_mask is None or all_valid:
        return None
    if part is not None:
        rank, ranks = part
        token_mask = token_mask.chunk(ranks, dim=1)[rank]
    keys = F.pad(token_mask.bool(), (seq_len - token_mask.shape[1], 0), value=True)
    return keys[:, None, None, :]


def _context_part(parallel_config) -> tuple[int, int] | None:
    """(rank, ranks) of this process in the context-parallel group while training, else None: validation
    (no gradients) runs unsplit on one process (`hvtune.train.context_parallel`)."""
    if parallel_config is None or not torch.is_grad_enabled():
        return None
    mesh = parallel_config.context_parallel_config._flattened_mesh
    return mesh.get_local_rank(), mesh.size()


class KeyPaddingAttnProcessor(HunyuanVideo15AttnProcessor2_0):
    """`HunyuanVideo15AttnProcessor2_0` with no mask when nothing is padded and a key mask when something is."""

    def __init__(self, training_backend: str | None = None, inference_backend: str | None = None) -> None:
        super().__init__()
        self.backends = (training_backend, inference_backend)
        # set before each forward of a compiled transformer (`declare_padding_before_each_forward`): inside a
        # compiled block `bool(token_mask.all())` breaks the graph and `_LastAnswer`'s checks add guards that
        # recompile; a plain bool read there is one guard, two graphs at most (padded, unpadded)
        self.all_valid_declared: bool | None = None

    def _backend(self, mask: torch.Tensor | None) -> str | None:
        backend = self.backends[0] if torch.is_grad_enabled() else self.backends[1]
        return None if mask is not None and backend in MASKLESS_BACKENDS else backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
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
        part = _context_part(self._parallel_config)
        mask = key_padding_mask(attention_mask, query.shape[1], self.all_valid_declared, part)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._backend(mask) or self._attention_backend,
            parallel_config=self._parallel_config if part is not None else None,
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


def use_key_padding_attention(
    transformer, training_backend: str | None = None, inference_backend: str | None = None
) -> int:
    """Install `KeyPaddingAttnProcessor` with the given dispatcher backends (None: the dispatcher's default, SDPA) on
    every dual-stream block (the token refiner, a few text tokens, keeps its own attention on SDPA). Returns the
    number of blocks changed."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(KeyPaddingAttnProcessor(training_backend, inference_backend))
    return len(transformer.transformer_blocks)
