"""Autocast for meta tensors: `hvtune plan`'s step gets the GPU's dtypes and attention kernels.

`MetaAutocast` (a TorchFunctionMode) applies autocast's casting rules to meta tensors, which PyTorch's autocast
ignores: matmuls, convolutions and attention in bf16, the ops CUDA autocast runs in float32 in float32 (cast copies
of trainable weights cached for the forward, as autocast does), so saved activations have the GPU's dtypes. It also
runs SDPA on meta tensors through the GPU's fused kernels (flash, memory-efficient: O(S) memory), where PyTorch would
take the math path and materialise S x S scores. `recompute_under` keeps it active in gradient checkpointing's
recompute.
"""

from __future__ import annotations

from typing import Any


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a GPU runs it: the flash kernel without a mask, the memory-efficient one with a key mask; both keep
    O(S) memory (output + logsumexp). On meta, PyTorch would otherwise pick the math path and materialise S x S."""
    import torch

    aten = torch.ops.aten
    if attn_mask is None:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask.dtype == torch.bool:  # what SDPA does with a boolean mask: an additive bias of the same shape
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    b, h, s_q, _ = query.shape
    bias = attn_mask.expand(b, h, s_q, key.shape[-2])
    return aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, dropout_p, is_causal, scale=scale
    )[0]


def lower_precision_ops() -> set:
    """The functions autocast runs in its lower precision (bf16): matmuls, convolutions, attention."""
    import torch
    import torch.nn.functional as F

    lower = [
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.scaled_dot_product_attention,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.bmm,
        torch.baddbmm,
        torch.addmm,
        torch.addbmm,
    ]
    return set(lower)


def float32_ops(device_type: str) -> set:
    """The functions autocast runs in float32 on `device_type`: losses everywhere, and on CUDA also norms, softmax,
    pow, exp, log, sums and the like."""
    import torch
    import torch.nn.functional as F

    fp32 = [F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.cross_entropy, F.nll_loss, F.kl_div]
    if device_type == "cuda":
        fp32 += [
            F.layer_norm,
            F.group_norm,
            F.softmax,
            F.log_softmax,
            F.normalize,
            F.softplus,
            torch.softmax,
            torch.Tensor.softmax,
            torch.log_softmax,
            torch.pow,
            torch.Tensor.pow,
            torch.Tensor.__pow__,
            torch.rsqrt,
            torch.Tensor.rsqrt,
            torch.exp,
            torch.Tensor.exp,
            torch.log,
            torch.Tensor.log,
            torch.sum,
            torch.Tensor.sum,
            torch.norm,
            torch.Tensor.norm,
            torch.cumsum,
            torch.prod,
            torch.reciprocal,
        ]
    return set(fp32)


class MetaAutocast:
    """A TorchFunctionMode for meta execution. (1) Autocast's casting rules for meta tensors (torch.autocast only
    acts on real device tensors): while CPU autocast is on (the trainer's `accelerator.autocast()`), ops on the
    lower-precision list compute in `dtype`, ops on the device's float32 list in float32. `device_type` picks the
    lists: "cuda" (layer_norm, softmax, pow, sum... in float32) or "cpu" (only losses and linear algebra).
    (2) SDPA on meta tensors runs the GPU's fused kernels' meta implementations (`fused_attention`)."""

    def __init__(self, device_type: str = "cuda", dtype=None, *, enabled: bool = True):
        import torch
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        self.enabled = enabled
        self.dtype = dtype or torch.bfloat16
        self.lower, self.fp32 = lower_precision_ops(), float32_ops(device_type)
        self.cache: dict[int, Any] = {}
        outer = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if outer.enabled and torch.is_autocast_enabled("cpu"):  # the trainer's accelerator.autocast()
                    if func in outer.lower:
                        args, kwargs = outer._cast(args, kwargs, outer.dtype)
                    elif func in outer.fp32:
                        args, kwargs = outer._cast(args, kwargs, torch.float32)
                if func is F.scaled_dot_product_attention:
                    query = args[0] if args else kwargs["query"]
                    if query.device.type == "meta":
                        return fused_attention(*args, **kwargs)
                return func(*args, **kwargs)

        self._mode = _Mode()

    def _cast(self, args, kwargs, dtype):
        import torch
        from torch.utils._pytree import tree_map

        def cast(x):
            if not (isinstance(x, torch.Tensor) and x.device.type == "meta" and x.is_floating_point()):
                return x
            if x.dtype in (dtype, torch.float64):
                return x
            if x.is_leaf and x.requires_grad:  # autocast caches casts of trainable weights for the forward
                if id(x) not in self.cache:
                    self.cache[id(x)] = (x, x.to(dtype))
                return self.cache[id(x)][1]
            return x.to(dtype)

        return tree_map(cast, args), tree_map(cast, kwargs)

    def __enter__(self):
        self.cache.clear()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.cache.clear()
        return self._mode.__exit__(*exc)


def recompute_under(transformer, autocast: MetaAutocast) -> None:
    """Checkpointed blocks recompute their forward inside backward, where a TorchFunctionMode entered around the
    step is not active (torch.autocast is: checkpoint restores it). diffusers' own checkpointing function is
    `torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)`; this is the same call with a
    `context_fn` that re-enters `autocast` for the recompute."""
    import contextlib
    import functools

    from torch.utils.checkpoint import checkpoint

    def contexts():
        return contextlib.nullcontext(), autocast._mode.__class__()  # same rules, fresh mode object

    def checkpointed(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    for module in transformer.modules():
        if getattr(module, "_gradient_checkpointing_func", None) is not None:
            module._gradient_checkpointing_func = functools.partial(checkpointed)
