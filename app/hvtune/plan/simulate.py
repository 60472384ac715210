"""`hvtune plan`: the full-size training step run on tensors that hold no memory, to predict what a GPU needs.

The transformer is built from the flavour's real architecture (`architectures.transformer_config`) on PyTorch's
meta device (8.3B parameters, no bytes), then goes through the trainer's own code: `memory.prepare_base` (attention
processor, base precision incl. torchao int8, gradient checkpointing), `memory.add_lora`, `memory.build_optimizer`
and `trainer.training_step` (the objective, backward, clipping, optimizer step), after the optimizer's state has been
allocated by its own first step, so the measured step is a steady-state one. Helpers make the meta execution faithful:

- `TensorTracker` (a TorchDispatchMode) records every tensor storage the step creates on the tracked device
  (`untyped_storage().nbytes()`, freed through `weakref.finalize` on the storage) and keeps the running peak. The same
  tracker measures a real CPU step (`compare_with_cpu`), which is how the prediction is validated.
- Data-dependent code (`torch.all(image_embeds == 0)`, boolean-mask indexing of the text tokens, the attention
  processor's "is any key padded" test) needs values: every small meta tensor whose inputs are known carries a real
  CPU "shadow" computed from them (the batch is real CPU data; masks, zeros and aranges are computed for real), so
  `.item()` and `nonzero` get the true answer and the sequence lengths are exactly the real ones.
- `MetaAutocast` (a TorchFunctionMode) applies autocast's casting rules to meta tensors, which PyTorch's autocast
  ignores: matmuls, convolutions and attention in bf16, the ops CUDA autocast runs in float32 in float32 (cast copies
  of trainable weights cached for the forward, as autocast does), so saved activations have the GPU's dtypes. It
  also runs SDPA on meta tensors through the GPU's fused kernels (flash, memory-efficient: O(S) memory), where PyTorch
  would take the math path and materialise S x S scores.

What meta execution cannot see is accounted for separately, with the estimate stated in `Plan.allowances`:
group offload (diffusers' offload hooks copy real weights CPU <-> GPU; the plan computes the resident groups from the
real module tree instead), the CUDA context, the caching allocator's fragmentation, kernels' workspaces, and the
8-bit optimizer's kernel (its state is allocated by bitsandbytes' own `init_state`, exact).
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

from hvtune.config.schema import TrainConfig
from hvtune.config.settings import ResolvedConfig
from hvtune.errors import UserError
from hvtune.model.architectures import (
    GPU,
    GPUS,
    IMAGE_TOKENS,
    find_gpu,
    forward_flops,
    latent_shape,
    train_step_flops,
    transformer_config,
)

GiB = 2**30
SHADOW_MAX_ELEMENTS = 1 << 23  # shadow values are computed only for tensors up to 8M elements (inputs, masks)
CAPTION_TOKENS = 256  # Qwen tokens per caption assumed when no cache says otherwise (template + a long caption)
# Allowances for what a meta execution cannot see (see docs/PERFORMANCE.md, "hvtune plan"):
CUDA_CONTEXT_GIB = 0.6  # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator, nvidia-smi's first ~500 MB
FRAGMENTATION = 0.08  # the caching allocator's reserved-but-unused share at the peak (expandable_segments lowers it)
ASSUMED_MFU = 0.35  # model FLOPs utilisation assumed for s/step (bench_gpu.py measures the real one on a card)
HOST_RUNTIME_GIB = 4.0  # Python, torch, CUDA libraries, the loader's buffers


class PlanError(UserError):
    pass


class DataDependentOp(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------ tracking


def _storages(t) -> list:
    """The storages holding `t`'s bytes: its own, or its inner tensors' for a wrapper subclass (torchao int8)."""
    import torch

    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _storages(getattr(t, n))]
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError, TypeError):
        return []


def tensor_bytes(t) -> int:
    return sum(s.nbytes() for s in _storages(t))


class TensorTracker:
    """Live bytes of the tensors on `device_type` created while active (plus those `adopt`ed), and their peak."""

    def __init__(self, device_type: str, *, shadows: bool = False, autocast: MetaAutocast | None = None):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakTensorKeyDictionary

        self.device_type = device_type
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.marks: dict[str, int] = {}
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return tracker._dispatch(func, args, kwargs or {})

        self._mode = _Mode()
        self.shadows = WeakTensorKeyDictionary() if shadows else None

    # -- accounting
    def adopt(self, tensors) -> None:
        for t in tensors:
            if t is not None and getattr(t, "device", None) is not None and t.device.type == self.device_type:
                for st in _storages(t):
                    self._add(st)

    def _add(self, st) -> None:
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def mark(self, name: str) -> None:
        self.marks[name] = self.current

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    # -- dispatch
    def _track_out(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                for st in _storages(t):
                    self._add(st)

    def _dispatch(self, func, args, kwargs):
        import torch

        if self.shadows is None:
            out = func(*args, **kwargs)
            self._track_out(out)
            return out
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            real = self.shadows.get(args[0])
            if real is None:
                raise DataDependentOp("a value of a meta tensor was asked for and is not known (no shadow)")
            return real.item()
        if func is aten._to_copy.default and args[0].device.type == "meta" and _leaves_meta(kwargs):
            # a value copied off the device (the objective's detached stats): the true one when known, else zeros
            real = self.shadows.get(args[0])
            if real is None:
                real = torch.zeros(args[0].shape, dtype=args[0].dtype)
            return real.to(**{k: v for k, v in kwargs.items() if k in ("dtype", "device")})
        if func in (aten.nonzero.default, aten.index.Tensor, aten.masked_select.default):
            return self._data_dependent_shape(func, args, kwargs)
        out = func(*args, **kwargs)
        self._track_out(out)
        self._shadow(func, args, kwargs, out)
        return out

    def _real(self, x):
        """The real value of `x`: itself for a non-meta tensor, its shadow for a meta tensor, or None."""
        import torch

        if not isinstance(x, torch.Tensor) or x.device.type != "meta":
            return x
        return self.shadows.get(x)

    def _all_known(self, args, kwargs) -> bool:
        """Whether every meta tensor among the arguments (top level or in a list) has a shadow."""
        import torch

        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, list | tuple) else (a,):
                if isinstance(t, torch.Tensor) and t.device.type == "meta" and t not in self.shadows:
                    return False
        return True

    def _shadow(self, func, args, kwargs, out) -> None:
        import torch
        from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

        mutable = func._schema.is_mutable
        if not mutable and not self._all_known(args, kwargs):  # the common case (activations): nothing to do
            return
        flat_out, _ = tree_flatten(out)
        metas_out = [t for t in flat_out if isinstance(t, torch.Tensor) and t.device.type == "meta"]
        if not metas_out:
            return
        flat_in, spec = tree_flatten((args, kwargs))
        mutated = [a for a, arg in zip(args, func._schema.arguments, strict=False) if _writes(arg)] if mutable else []
        known = all(
            self._real(a) is not None for a in flat_in if isinstance(a, torch.Tensor) and a.device.type == "meta"
        )
        ok = (
            known
            and torch.Tag.nondeterministic_seeded not in func.tags
            and all(t.numel() <= SHADOW_MAX_ELEMENTS for t in metas_out)
        )
        if not ok:
            for a in mutated:  # a meta tensor changed in a way we did not compute: its shadow is stale
                if isinstance(a, torch.Tensor) and a in self.shadows:
                    del self.shadows[a]
            return

        def to_real(x):
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            return self._real(x)

        real_args, real_kwargs = tree_unflatten([to_real(a) for a in flat_in], spec)
        real_kwargs = tree_map(to_real, real_kwargs)
        try:
            real_out = func(*real_args, **real_kwargs)
        except Exception:  # a kernel the CPU lacks for this dtype: no shadow (values stay unknown, shapes exact)
            return
        flat_real, _ = tree_flatten(real_out)
        for m, r in zip(flat_out, flat_real, strict=False):
            meta_out = isinstance(m, torch.Tensor) and m.device.type == "meta"
            if meta_out and isinstance(r, torch.Tensor) and r.shape == m.shape:
                self.shadows[m] = r

    def _data_dependent_shape(self, func, args, kwargs):
        """nonzero / boolean indexing / masked_select: computed on the shadows, the result made meta (+ shadow)."""
        import torch

        aten = torch.ops.aten
        if func is aten.index.Tensor:
            src, indices = args[0], list(args[1])
            converted = []
            for ix in indices:
                if isinstance(ix, torch.Tensor) and ix.dtype == torch.bool and ix.device.type == "meta":
                    real = self._real(ix)
                    if real is None:
                        raise DataDependentOp("boolean-mask indexing with a mask whose values are not known")
                    for col in real.nonzero().unbind(1):
                        converted.append(self._to_meta(col))
                else:
                    converted.append(ix)
            out = aten.index.Tensor(src, converted)
            self._track_out(out)
            self._shadow(aten.index.Tensor, (src, converted), {}, out)
            return out
        if not self._all_known(args, kwargs):
            raise DataDependentOp(f"{func} on a meta tensor whose values are not known")
        real_out = func(*[self._real(a) for a in args], **kwargs)
        return self._to_meta(real_out)

    def _to_meta(self, real):
        meta = real.to("meta")
        self._track_out(meta)
        self.shadows[meta] = real
        return meta


def _leaves_meta(kwargs) -> bool:
    device = kwargs.get("device")
    return device is not None and str(device) != "meta"


def _writes(arg) -> bool:
    return arg.alias_info is not None and arg.alias_info.is_write


# ------------------------------------------------------------------------------------------------------- autocast


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
        self.lower, self.fp32 = set(lower), set(fp32)
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


# --------------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class StepShape:
    """One training batch as the transformer sees it."""

    batch: int
    frames: int
    width: int
    height: int
    task: str
    qwen_tokens: int = CAPTION_TOKENS
    byt5_tokens: int = 0

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return latent_shape(self.frames, self.height, self.width)

    @property
    def video_tokens(self) -> int:
        _, f, h, w = self.latents
        return f * h * w

    @property
    def image_tokens(self) -> int:
        return IMAGE_TOKENS if self.task == "i2v" else 0

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.qwen_tokens + self.byt5_tokens + self.image_tokens

    def label(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}f, batch {self.batch}"


def largest_bucket(resolved: ResolvedConfig) -> tuple[int, int, int]:
    """(W, H, F) of the largest bucket the datasets can produce: the most pixels over the aspect buckets of each
    dataset's `resolution` (the data's own aspects are not read: the worst case), at its longest frame count."""
    from hvtune.data.buckets import dataset_resolution, interval_frames
    from hvtune.data.datasets import crop_size_list, media_datasets

    best = None
    for ds in media_datasets(resolved):
        resolution = dataset_resolution(ds, resolved)
        sizes = (
            [resolution] if isinstance(resolution, tuple) else [(w, h) for h, w in crop_size_list(resolution * 4 / 3)]
        )
        v = ds.video
        frames = 1 if ds.dataset_type == "image" else v.num_frames
        if ds.dataset_type == "video" and v.bucket_strategy == "resolution_frames":
            frames = interval_frames(v.num_frames, v.frame_interval)
        for w, h in sizes:
            key = (w * h * ((frames - 1) // 4 + 1), w, h, frames)
            best = key if best is None or key > best else best
    if best is None:
        w, h = resolved.train.flavour.resolution
        return w, h, 61
    return best[1], best[2], best[3]


# ----------------------------------------------------------------------------------------------------- simulation


@dataclass
class StepMemory:
    """Bytes on the training device during the second training step (steady state)."""

    peak: int
    base_weights: int
    lora_weights: int
    lora_grads: int
    optimizer_state: int
    lora_params: int
    base_params: int
    seconds: float

    @property
    def activations(self) -> int:
        """Everything at the peak that is not a weight or optimizer state: saved activations, temporaries, grads."""
        return self.peak - self.base_weights - self.lora_weights - self.optimizer_state


def _batch_for(shape: StepShape, model_config: dict, seed: int = 0):
    """A Batch of real CPU tensors with the step's shapes (the objective moves them to the device)."""
    import torch

    from hvtune.train.batches import Batch

    g = torch.Generator().manual_seed(seed)
    c, f, h, w = shape.latents
    b = shape.batch
    x0 = torch.randn(b, c, f, h, w, generator=g)
    cond = torch.zeros_like(x0)
    mask = torch.zeros(b, 1, f, h, w)
    image = None
    if shape.task == "i2v":
        cond[:, :, 0] = torch.randn(b, c, h, w, generator=g)
        mask[:, :, 0] = 1.0
        image = torch.randn(b, IMAGE_TOKENS, model_config["image_embed_dim"], generator=g)
    return Batch(
        latents=x0,
        cond_latents=cond,
        cond_mask=mask,
        image_embeds=image,
        prompt_embeds=torch.randn(b, shape.qwen_tokens, model_config["text_embed_dim"], generator=g),
        prompt_mask=torch.ones(b, shape.qwen_tokens, dtype=torch.int64),
        prompt_embeds_2=torch.randn(b, shape.byt5_tokens, model_config["text_embed_2_dim"], generator=g),
        prompt_mask_2=torch.ones(b, shape.byt5_tokens, dtype=torch.int64),
        sample_indices=list(range(b)),
        draws=list(range(b)),
    )


def _accelerator(cfg: TrainConfig, cpu: bool = True):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses another mixed_precision; the sweep simulates several
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, gradient_accumulation_steps=1)


def _release_accelerator() -> None:
    """Forget the simulated step's accelerate state, so that a later Accelerator in this process (a training run after
    `hvtune check` printed its verdict, or the next simulation) may choose its own mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _state_tensors(optimizer) -> list:
    import torch

    out = []
    for state in optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def storage_bytes(tensors, device_type: str) -> int:
    """Bytes of the distinct storages of `tensors` on `device_type` (shared tensors counted once)."""
    seen = {}
    for t in tensors:
        if t.device.type == device_type:
            for st in _storages(t):
                seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def prepare_step(transformer, cfg: TrainConfig, device: str):
    """The trainer's setup on `transformer`: prepare_base, add_lora (seeded as the trainer seeds it),
    build_optimizer, and the optimizer's state allocated. Returns (the config the step runs with, LoRA params,
    optimizer). On meta, diffusers' offload hooks would copy weights to the CPU (there is no data to copy), so
    offload is left out and `offload_resident` accounts for it; a real run keeps it (on the CPU it moves nothing)."""
    import torch

    from hvtune.train.base_model import prepare_base
    from hvtune.train.lora import add_lora
    from hvtune.train.objective import counter_seed
    from hvtune.train.optim import build_optimizer

    meta = device == "meta"
    offload = {"enable_group_offload": False, "group_offload_use_stream": False} if meta else {}
    # the shift changes no tensor size; auto shift (0) would need the scheduler config, which plan does not read
    step_cfg = cfg.model_copy(update={**offload, "flow_schedule_shift": cfg.shift or 1.0})
    prepare_base(transformer, step_cfg, device)
    torch.manual_seed(counter_seed(cfg.seed, purpose="lora_init"))
    add_lora(transformer, step_cfg)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, step_cfg)
    _warm_optimizer(optimizer, params, meta=meta)
    return step_cfg, params, optimizer


def run_step(
    transformer, cfg: TrainConfig, shape: StepShape, *, device: str, autocast_device: str = "cuda", steps: int = 1
) -> StepMemory:
    """`prepare_step`, then `steps` x trainer.training_step on `transformer` (already built on `device`) under a
    TensorTracker for `device`; the peak is the last step's."""
    from hvtune.train.objective import schedule_options
    from hvtune.train.step import training_step

    started = time.perf_counter()
    meta = device == "meta"
    model_config = dict(transformer.config)
    step_cfg, params, optimizer = prepare_step(transformer, cfg, device)
    accelerator = _accelerator(step_cfg)
    batch = _batch_for(shape, model_config)
    image_embed_shape = (0, model_config["image_embed_dim"])
    base = [p for p in transformer.parameters() if not p.requires_grad] + list(transformer.buffers())
    memory = StepMemory(
        peak=0,
        base_weights=sum(tensor_bytes(t) for t in base),
        lora_weights=sum(tensor_bytes(p) for p in params),
        lora_grads=sum(p.numel() * 4 for p in params),
        optimizer_state=0,
        lora_params=sum(p.numel() for p in params),
        base_params=sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
        seconds=0.0,
    )
    autocast = MetaAutocast(autocast_device, enabled=cfg.mixed_precision == "bf16") if meta else None
    if autocast is not None and cfg.gradient_checkpointing:
        _recompute_under(transformer, autocast)
    tracker = TensorTracker(device, shadows=meta)
    tracker.adopt([*base, *params, *_state_tensors(optimizer)])
    transformer.train()
    try:
        for i in range(steps):
            if i == steps - 1:
                tracker.reset_peak()
            with tracker, autocast or _null():
                loss = training_step(
                    accelerator,
                    transformer,
                    optimizer,
                    params,
                    batch,
                    step_cfg,
                    epoch=0,
                    index=i,
                    rank=0,
                    empty=None,
                    image_embed_shape=image_embed_shape,
                    device=device,
                    schedule=schedule_options(step_cfg),
                )
            del loss
            tracker.adopt(_state_tensors(optimizer))
    finally:
        _release_accelerator()
    memory.peak = tracker.peak
    memory.optimizer_state = storage_bytes(_state_tensors(optimizer), device)
    memory.seconds = time.perf_counter() - started
    return memory


def _recompute_under(transformer, autocast: MetaAutocast) -> None:
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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _warm_optimizer(optimizer, params, *, meta: bool) -> None:
    """Allocate the optimizer's state as its first step does (every later step runs with it), by one step on zero
    gradients, so the one step measured is a steady-state step. bitsandbytes' 8-bit AdamW allocates its state in
    `init_state` and then runs a kernel meta tensors cannot run: on meta its state comes from its own `init_state`
    and its `step` becomes a no-op (the update is in place: no memory of its own beyond the state)."""
    import torch

    if meta and hasattr(optimizer, "init_state"):
        for gindex, group in enumerate(optimizer.param_groups):
            for pindex, p in enumerate(group["params"]):
                if len(optimizer.state[p]) == 0:
                    optimizer.init_state(group, p, gindex, pindex)
        optimizer.step = lambda *a, **k: None
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compare_with_cpu(model_config: dict, cfg: TrainConfig, shape: StepShape) -> tuple[StepMemory, StepMemory]:
    """(predicted, measured): the same step of the same (small) architecture on meta tensors with the CPU's
    autocast rules, and for real on the CPU, both measured by the TensorTracker. The validation of the plan."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    predicted = run_step(build_meta_transformer(model_config), cfg, shape, device="meta", autocast_device="cpu")
    torch.manual_seed(0)
    real = HunyuanVideo15Transformer3DModel(**model_config)
    measured = run_step(real, cfg, shape, device="cpu")
    return predicted, measured


def build_meta_transformer(model_config: dict):
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    with torch.device("meta"):
        return HunyuanVideo15Transformer3DModel(**model_config)


# ------------------------------------------------------------------------------------------------------ offload


def offload_resident(transformer, cfg: TrainConfig) -> tuple[int, int]:
    """(bytes of base weights resident on the GPU, bytes of base weights in host memory) under diffusers' group
    offload as `prepare_base` sets it up: block_level groups of `group_offload_blocks_per_group` blocks of each
    ModuleList, every other top-level module onloaded as one group; leaf_level one leaf module at a time. One group
    computes; with `group_offload_use_stream` the next one is prefetched (2 groups). Weights only: LoRA stays put."""
    import torch

    def frozen_bytes(module) -> int:
        return sum(tensor_bytes(p) for p in module.parameters() if not p.requires_grad) + sum(
            tensor_bytes(b) for b in module.buffers()
        )

    total = frozen_bytes(transformer)
    in_flight = 2 if cfg.group_offload_use_stream else 1
    if cfg.group_offload_type == "leaf_level":
        leaves = [frozen_bytes(m) for m in transformer.modules() if not list(m.children())]
        return in_flight * max(leaves), total
    groups, rest = [], 0
    for _name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList):
            n = cfg.group_offload_blocks_per_group
            blocks = list(child)
            groups += [sum(frozen_bytes(b) for b in blocks[i : i + n]) for i in range(0, len(blocks), n)]
        else:
            rest += frozen_bytes(child)
    return rest + in_flight * max(groups), total


# ------------------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    flavour: str
    shape: StepShape
    settings: dict[str, Any]
    memory: StepMemory
    device_weights: int  # base weights resident on the GPU (all of them unless offloaded)
    host_weights: int  # base weights held in host memory by group offload
    train_flops: float

    @property
    def activations(self) -> int:
        return self.memory.activations

    @property
    def tracked_peak(self) -> int:
        """What torch.cuda.max_memory_allocated should show: tracked peak with the offloaded weights taken out."""
        return self.memory.peak - self.memory.base_weights + self.device_weights

    @property
    def allowances(self) -> dict[str, int]:
        return {
            "CUDA context (outside the allocator)": int(CUDA_CONTEXT_GIB * GiB),
            f"allocator fragmentation ({FRAGMENTATION:.0%} of the peak)": int(FRAGMENTATION * self.tracked_peak),
            "attention workspace (flash kernel: logsumexp only; measured 0)": 0,
        }

    @property
    def gpu_peak(self) -> int:
        return self.tracked_peak + sum(self.allowances.values())

    @property
    def host_peak(self) -> int:
        """Loading reads the bf16 weights into host memory before moving them; offload keeps the base there."""
        load = self.memory.base_params * 2
        return int(HOST_RUNTIME_GIB * GiB) + max(load, self.host_weights + self.memory.lora_weights)

    def seconds_per_step(self, gpu: GPU, mfu: float = ASSUMED_MFU) -> float:
        compute = self.train_flops / (gpu.bf16_tflops * 1e12 * mfu)
        if not self.settings.get("enable_group_offload"):
            return compute
        passes = 3 if self.settings.get("gradient_checkpointing") else 2  # forward, (recompute,) backward
        copy = self.host_weights * passes / (gpu.host_link_gbps * 1e9)
        return max(compute, copy) if self.settings.get("group_offload_use_stream") else compute + copy


MEMORY_KNOBS = ("gradient_checkpointing", "enable_group_offload", "group_offload_use_stream", "base_model_precision")


def _plan(cfg: TrainConfig, shape: StepShape, transformer, memory: StepMemory, model_config: dict) -> Plan:
    if cfg.enable_group_offload:
        device_weights, host_weights = offload_resident(transformer, cfg)
    else:
        device_weights, host_weights = memory.base_weights, 0
    fwd = forward_flops(
        model_config, shape.video_tokens, shape.qwen_tokens, shape.byt5_tokens, shape.image_tokens, shape.batch
    )
    flops = train_step_flops(fwd, gradient_checkpointing=cfg.gradient_checkpointing)
    settings = {k: getattr(cfg, k) for k in (*MEMORY_KNOBS, "lora_rank", "optimizer", "train_batch_size")}
    return Plan(cfg.model_flavour, shape, settings, memory, device_weights, host_weights, flops)


def simulate(cfg: TrainConfig, shape: StepShape, *, autocast_device: str = "cuda") -> Plan:
    """The full-size step for `cfg` at `shape` on the meta device."""
    model_config = transformer_config(cfg.model_flavour)
    transformer = build_meta_transformer(model_config)
    memory = run_step(transformer, cfg, shape, device="meta", autocast_device=autocast_device)
    return _plan(cfg, shape, transformer, memory, model_config)


def sweep(cfg: TrainConfig, shape: StepShape, gpu: GPU, progress=print) -> list[Plan]:
    """Every memory setting for `cfg` at `shape`: checkpointing x base precision are simulated (they change what
    the step allocates); group offload (off / block_level / block_level + streams where CUDA) changes only where the
    base weights live, so it is derived from each simulation with `offload_resident`."""
    model_config = transformer_config(cfg.model_flavour)
    offloads = [dict(enable_group_offload=False, group_offload_use_stream=False)]
    offloads.append(dict(enable_group_offload=True, group_offload_use_stream=False, group_offload_type="block_level"))
    if gpu.name != "MI300X":  # streams need CUDA (ROCm refuses group_offload_use_stream)
        offloads.append(
            dict(enable_group_offload=True, group_offload_use_stream=True, group_offload_type="block_level")
        )
    plans = []
    for checkpointing in (False, True):
        for precision in ("bf16", "int8-torchao"):
            variant = cfg.model_copy(
                update={"gradient_checkpointing": checkpointing, "base_model_precision": precision}
            )
            started = time.perf_counter()
            transformer = build_meta_transformer(model_config)
            memory = run_step(transformer, variant, shape, device="meta")
            for offload in offloads:
                plans.append(_plan(variant.model_copy(update=offload), shape, transformer, memory, model_config))
            progress(
                f"  simulated checkpointing={'on' if checkpointing else 'off'} base={precision} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    return sorted(plans, key=lambda p: p.seconds_per_step(gpu))


def configured(plans: list[Plan], cfg: TrainConfig) -> Plan | None:
    """The sweep's plan for the configured memory setting, when the sweep covers it (block_level, 1 block/group)."""
    if cfg.enable_group_offload and (cfg.group_offload_type, cfg.group_offload_blocks_per_group) != ("block_level", 1):
        return None
    return next((p for p in plans if all(p.settings[k] == getattr(cfg, k) for k in MEMORY_KNOBS)), None)


def shape_for(resolved: ResolvedConfig, caption_tokens: int = CAPTION_TOKENS) -> StepShape:
    w, h, f = largest_bucket(resolved)
    return StepShape(
        batch=resolved.train.train_batch_size,
        frames=f,
        width=w,
        height=h,
        task=resolved.task,
        qwen_tokens=caption_tokens,
    )


# ------------------------------------------------------------------------------------------------------ reporting


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GB"


def format_plan(plan: Plan, gpu: GPU | None = None) -> str:
    m = plan.memory
    lines = [
        f"plan: {plan.flavour}, largest bucket {plan.shape.label()}, {plan.shape.seq_len:,} tokens "
        f"({plan.shape.video_tokens:,} video), LoRA rank {plan.settings['lora_rank']}, {plan.settings['optimizer']}",
        "  settings: " + ", ".join(f"{k}={plan.settings[k]}" for k in MEMORY_KNOBS),
        f"  predicted peak GPU memory  {gib(plan.gpu_peak)}",
        f"    base weights              {gib(plan.device_weights)}"
        + (f"  (of {gib(m.base_weights)}; the rest offloaded)" if plan.host_weights else "")
        + f"  [{m.base_params:,} parameters]",
        f"    LoRA weights + grads      {gib(m.lora_weights + m.lora_grads)}  [{m.lora_params:,} parameters]",
        f"    optimizer state           {gib(m.optimizer_state)}",
        f"    activations (peak)        {gib(m.activations - m.lora_grads)}"
        f"  (gradient checkpointing {'on' if plan.settings['gradient_checkpointing'] else 'off'})",
    ]
    for name, value in plan.allowances.items():
        lines.append(f"    + {name:<24} {gib(value)}")
    lines.append(f"  predicted host RAM          {gib(plan.host_peak)}")
    if gpu is not None:
        lines.append(
            f"  predicted s/step on {gpu.name}: {plan.seconds_per_step(gpu):.1f} s "
            f"({plan.train_flops / 1e12:,.0f} TFLOP/step at {ASSUMED_MFU:.0%} MFU of {gpu.bf16_tflops:g} TFLOP/s)"
        )
    lines.append(f"  (simulated in {m.seconds:.1f} s)")
    return "\n".join(lines)


def parse_gpu(text: str) -> GPU:
    """A known card name, or a memory size ("24GB", "24"): a card of that size with an H100's speed."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g)?\s*", text.lower())
    if m:
        # a size alone says nothing about speed: s/step is given for an H100's bf16 peak
        return GPU(f"{float(m.group(1)):g} GB card (H100 speed)", float(m.group(1)), 989.0, 25.0, ())
    gpu = find_gpu(text)
    if gpu is None:
        raise PlanError(f"unknown GPU {text!r}; known: {', '.join(g.name for g in GPUS)}; or a size such as 24GB")
    return gpu


def settings_keys(plan: Plan) -> dict[str, Any]:
    """The config.json keys that select the plan's memory setting."""
    keys = {k: plan.settings[k] for k in MEMORY_KNOBS}
    if keys["enable_group_offload"]:
        keys["group_offload_type"] = "block_level"
    else:
        del keys["group_offload_use_stream"]
    return keys


def format_settings(plan: Plan) -> str:
    s = plan.settings
    parts = ["checkpointing" if s["gradient_checkpointing"] else "no checkpointing"]
    if s["enable_group_offload"]:
        parts.append("group offload" + (" + streams" if s["group_offload_use_stream"] else ""))
    parts.append("int8 base" if s["base_model_precision"] == "int8-torchao" else "bf16 base")
    return ", ".join(parts)


def format_sweep(plans: list[Plan], gpu: GPU) -> str:
    fits = [p for p in plans if p.gpu_peak <= gpu.memory_gib * GiB]
    lines = [f"memory settings on {gpu.name} ({gpu.memory_gib:g} GB), fastest first:"]
    for p in plans:
        mark = "fits" if p in fits else "no  "
        lines.append(
            f"  {mark}  {gib(p.gpu_peak):>9}  {p.seconds_per_step(gpu):6.1f} s/step  host RAM {gib(p.host_peak):>8}"
            f"  {format_settings(p)}"
        )
    if fits:
        best = fits[0]
        lines.append(f"best that fits: {format_settings(best)}; set in config.json:")
        lines += [f'  "{k}": {json_value(v)},' for k, v in settings_keys(best).items()]
    else:
        lines.append(how_to_fit(min(plans, key=lambda p: p.gpu_peak), gpu))
    return "\n".join(lines)


def json_value(v) -> str:
    import json

    return json.dumps(v)


def how_to_fit(plan: Plan, gpu: GPU) -> str:
    """For the smallest setting that does not fit: by how much, and how far frames, resolution or rank would have to
    go (activations grow about linearly with the tokens; LoRA, its gradients and its state linearly with the rank)."""
    over = plan.gpu_peak - gpu.memory_gib * GiB
    act = max(plan.activations - plan.memory.lora_grads, 1)
    lora = plan.memory.lora_weights + plan.memory.lora_grads + plan.memory.optimizer_state
    shape = plan.shape
    keep = max(0.0, 1 - over / act)  # share of the tokens that would fit
    frames = max(1, int(shape.latents[1] * keep - 1) * 4 + 1)
    scale = math.sqrt(keep)
    knobs = {
        "frames": (min(over, act * (1 - 1 / max(shape.latents[1], 1))), f"num_frames {shape.frames} -> {frames}"),
        "resolution": (min(over, act * 0.75), f"resolution x{scale:.2f} ({int(shape.height * scale) // 16 * 16}p)"),
        "rank": (lora * (1 - 4 / max(plan.settings["lora_rank"], 4)), f"lora_rank {plan.settings['lora_rank']} -> 4"),
    }
    best = max(knobs, key=lambda k: knobs[k][0])
    return (
        f"does not fit: the smallest setting ({format_settings(plan)}) needs {gib(plan.gpu_peak)}, "
        f"{gib(over)} more than the {gib(gpu.memory_gib * GiB)} of {gpu.name}. The knob that moves it most is "
        f"{best}: {knobs[best][1]}" + ("" if keep > 0 else " (activations alone do not fit: a larger card is needed)")
    )


def verdict(plan: Plan, gpu: GPU, sweep_plans: list[Plan] | None = None) -> str:
    """One line: does the configured setting fit this card; if not, the fastest setting that does."""
    line = f"predicted peak {gib(plan.gpu_peak)} {'<=' if plan.gpu_peak <= gpu.memory_gib * GiB else '>'} "
    line += f"{gpu.memory_gib:g} GB on this {gpu.name}"
    if plan.gpu_peak <= gpu.memory_gib * GiB or not sweep_plans:
        return line
    fits = [p for p in sweep_plans if p.gpu_peak <= gpu.memory_gib * GiB]
    if not fits:
        return line + "; " + how_to_fit(min(sweep_plans, key=lambda p: p.gpu_peak), gpu)
    best = fits[0]
    keys = ", ".join(f"{k}={json_value(v)}" for k, v in settings_keys(best).items() if plan.settings.get(k) != v)
    return line + f": set {keys} (predicted {gib(best.gpu_peak)})"


def detected_gpu() -> GPU | None:
    """The visible CUDA/ROCm card as a GPU entry (its real memory size), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    known = find_gpu(props.name)
    speed = known.bf16_tflops if known else 989.0
    link = known.host_link_gbps if known else 25.0
    return GPU(known.name if known else props.name, round(props.total_memory / GiB, 2), speed, link, ())


def gpu_verdict(resolved: ResolvedConfig, gpu: GPU | None = None, caption_tokens: int = CAPTION_TOKENS) -> str:
    """The one line `hvtune check` and the entrypoints print when a GPU is visible (`gpu` defaults to it)."""
    gpu = gpu or detected_gpu()
    if gpu is None:
        return "plan: no GPU visible"
    shape = shape_for(resolved, caption_tokens)
    plan = simulate(resolved.train, shape)
    if plan.gpu_peak <= gpu.memory_gib * GiB:
        return verdict(plan, gpu)
    return verdict(plan, gpu, sweep(resolved.train, shape, gpu, progress=lambda _: None))


def plan_report(
    resolved: ResolvedConfig, gpu_name: str | None, *, caption_tokens: int = CAPTION_TOKENS, verdict_only: bool = False
) -> str:
    """What `hvtune plan` prints: the configured setting's plan, and with a card the sweep (or only the verdict)."""
    gpu = detected_gpu() if gpu_name == "auto" else parse_gpu(gpu_name) if gpu_name else None
    if gpu_name == "auto" and gpu is None:
        return "plan: no GPU visible; name one with --gpu (a card or a size such as 24GB)"
    if verdict_only:
        return gpu_verdict(resolved, gpu, caption_tokens) if gpu else "plan: --verdict needs --gpu"
    shape = shape_for(resolved, caption_tokens)
    plans = sweep(resolved.train, shape, gpu) if gpu is not None else []
    text = format_plan(configured(plans, resolved.train) or simulate(resolved.train, shape), gpu)
    return text + ("\n" + format_sweep(plans, gpu) if plans else "")
