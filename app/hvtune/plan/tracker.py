"""The tensor tracker of `hvtune plan`: the bytes a step allocates on a device, and the values meta tensors hide.

`TensorTracker` (a TorchDispatchMode) records every tensor storage the step creates on the tracked device
(`untyped_storage().nbytes()`, freed through `weakref.finalize` on the storage) and keeps the running peak. The same
tracker measures a real CPU step (`plan.simulate.compare_with_cpu`), which is how the prediction is validated.

Data-dependent code (`torch.all(image_embeds == 0)`, boolean-mask indexing of the text tokens, the attention
processor's "is any key padded" test) needs values: every small meta tensor whose inputs are known carries a real
CPU "shadow" computed from them (the batch is real CPU data; masks, zeros and aranges are computed for real), so
`.item()` and `nonzero` get the true answer and the sequence lengths are exactly the real ones.
"""

from __future__ import annotations

import contextlib
import weakref

SHADOW_MAX_ELEMENTS = 1 << 23  # shadow values are computed only for tensors up to 8M elements (inputs, masks)


class DataDependentOp(RuntimeError):
    pass


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


def storage_bytes(tensors, device_type: str) -> int:
    """Bytes of the distinct storages of `tensors` on `device_type` (shared tensors counted once)."""
    seen = {}
    for t in tensors:
        if t.device.type == device_type:
            for st in _storages(t):
                seen[st._cdata] = st.nbytes()
    return sum(seen.values())


class TensorTracker:
    """Live bytes of the tensors on `device_type` created while active (plus those `adopt`ed), and their peak."""

    def __init__(self, device_type: str, *, shadows: bool = False):
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
        self.values = True  # compute shadows (off in `without_values`)

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

    @contextlib.contextmanager
    def without_values(self):
        """A stretch of code that asks no values (a VAE decode: convolutions and a causal mask written row by row, a
        few hundred thousand ops): no shadows are computed in it, which makes it several times faster. A value asked
        for in it is still answered when it was known before, else DataDependentOp."""
        self.values = False
        try:
            yield
        finally:
            self.values = True

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
        if self.values:
            self._shadow(func, args, kwargs, out)
        elif func._schema.is_mutable:
            self._forget(_written(func, args))
        return out

    def _forget(self, tensors) -> None:
        """Drop the shadows of meta tensors changed in a way that was not computed: they are stale."""
        import torch

        for a in tensors:
            if isinstance(a, torch.Tensor) and a in self.shadows:
                del self.shadows[a]

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
        mutated = _written(func, args) if mutable else []
        unknown = [isinstance(a, torch.Tensor) and a.device.type == "meta" and a not in self.shadows for a in mutated]
        if unknown and all(unknown):  # writes into unknown values (activations written row by row): they stay
            return  # unknown, and no shadow can go stale
        flat_out, _ = tree_flatten(out)
        metas_out = [t for t in flat_out if isinstance(t, torch.Tensor) and t.device.type == "meta"]
        if not metas_out:
            return
        flat_in, spec = tree_flatten((args, kwargs))
        known = all(
            self._real(a) is not None for a in flat_in if isinstance(a, torch.Tensor) and a.device.type == "meta"
        )
        ok = (
            known
            and torch.Tag.nondeterministic_seeded not in func.tags
            and all(t.numel() <= SHADOW_MAX_ELEMENTS for t in metas_out)
        )
        if not ok:
            self._forget(mutated)
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


def _written(func, args) -> list:
    """The positional arguments `func` writes into."""
    return [a for a, arg in zip(args, func._schema.arguments, strict=False) if _writes(arg)]


def _writes(arg) -> bool:
    return arg.alias_info is not None and arg.alias_info.is_write
