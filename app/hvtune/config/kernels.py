"""The fast-path keys' meanings: SimpleTuner's `attention_mechanism` names mapped onto diffusers' attention dispatcher
backends, `sageattention_usage`, and which of them (and which fp8 `base_model_precision`) this machine can run.

`hvtune check` and `hvtune train` ask `device_problems` before anything is loaded, so a kernel whose package or card
is missing is one line naming what to install, never a crash at step 1.

Names and their targets are SimpleTuner 4.10.1's (helpers/training/attention_backend.py `_DIFFUSERS_BACKEND_TARGETS`,
choices in simpletuner_sdk/.../sections/advanced.py); "aiter" is hvtune's name for diffusers' AMD aiter kernel.
"""

from __future__ import annotations

# SimpleTuner name -> diffusers AttentionBackendName value; None: PyTorch SDPA through the dispatcher's default.
# kohaku-fa-auto is SimpleTuner's default: its own Kohaku kernels on L40S/H100, "native SDPA otherwise"; hvtune
# does not ship them, so it always takes the SDPA branch (same outputs, the kernel differs on those two cards).
ATTENTION_MECHANISMS: dict[str, str | None] = {
    "diffusers": None,
    "kohaku-fa-auto": None,
    "native": "native",
    "native-math": "_native_math",
    "native-efficient": "_native_efficient",
    "native-flash": "_native_flash",
    "cudnn": "_native_cudnn",
    "flex": "flex",
    "flash-attn": "flash",
    "flash-attn-2": "flash_varlen",
    "flash-attn-3": "_flash_3",
    "flash-attn-3-varlen": "_flash_varlen_3",
    "flash-attn-hub": "flash_hub",
    "flash-attn-varlen-hub": "flash_varlen_hub",
    "flash-attn-3-hub": "_flash_3_hub",
    "flash-attn-3-varlen-hub": "_flash_3_varlen_hub",
    "flash-attn-4-hub": "flash_4_hub",
    "sageattention": "sage",
    "sageattention-int8-fp16-triton": "_sage_qk_int8_pv_fp16_triton",
    "sageattention-int8-fp16-cuda": "_sage_qk_int8_pv_fp16_cuda",
    "sageattention-int8-fp8-cuda": "_sage_qk_int8_pv_fp8_cuda",
    "xformers": "xformers",
    "aiter": "aiter_fa2_hub",
}
NOT_OFFERED = {
    "kohaku-fa": "SimpleTuner's own Kohaku kernels are not part of hvtune: use kohaku-fa-auto (SDPA) or flash-attn",
    "sla": "sparse-linear attention changes the model's attention and is not implemented: use diffusers (PyTorch SDPA)",
    "metal-flash-attention": "Apple Metal kernels: hvtune runs on NVIDIA/AMD GPUs; use diffusers (PyTorch SDPA)",
    "metal-flash-attention-int8": "Apple Metal kernels: hvtune runs on NVIDIA/AMD GPUs; use diffusers (PyTorch SDPA)",
    "metal-flash-attention-int4": "Apple Metal kernels: hvtune runs on NVIDIA/AMD GPUs; use diffusers (PyTorch SDPA)",
    "native-npu": "Ascend NPU kernel: hvtune runs on NVIDIA/AMD GPUs; use diffusers (PyTorch SDPA)",
    "native-xla": "XLA kernel: hvtune runs on NVIDIA/AMD GPUs; use diffusers (PyTorch SDPA)",
}
# Kernels that take no attention mask: a batch with padded captions runs those calls on SDPA instead (exact).
MASKLESS_BACKENDS = {"flash", "flash_hub", "_flash_3", "_flash_3_hub", "flash_4_hub", "aiter_fa2_hub"}
SAGEATTENTION_USAGES = ("training", "inference", "training+inference")
# The GPUs each kernel runs on (the CPU runs native, native-math and flex only).
_ANY_GPU, _NVIDIA, _AMD = ("cuda", "rocm"), ("cuda",), ("rocm",)
_DEVICES = {
    **dict.fromkeys(["_native_flash", "_native_efficient", "flash", "flash_varlen", "flash_hub"], _ANY_GPU),
    **dict.fromkeys(["flash_varlen_hub", "xformers"], _ANY_GPU),
    **dict.fromkeys(["_native_cudnn", "_flash_3", "_flash_varlen_3", "_flash_3_hub", "_flash_3_varlen_hub"], _NVIDIA),
    **dict.fromkeys(["flash_4_hub", "sage", "_sage_qk_int8_pv_fp16_triton", "_sage_qk_int8_pv_fp16_cuda"], _NVIDIA),
    "_sage_qk_int8_pv_fp8_cuda": _NVIDIA,
    "aiter_fa2_hub": _AMD,
}
_CARD = {_ANY_GPU: "a GPU", _NVIDIA: "an NVIDIA CUDA GPU", _AMD: "an AMD ROCm GPU"}


def normalised_mechanism(name: str | None) -> str:
    """SimpleTuner's normalisation (cmd_args.py): lower case, '_' read as '-', empty as its default."""
    return str(name or "kohaku-fa-auto").strip().lower().replace("_", "-")


def attention_backends(mechanism: str, sage_usage: str) -> tuple[str | None, str | None]:
    """(training backend, inference backend) for the dispatcher. SageAttention is not exact for training, so
    SimpleTuner applies it where `sageattention_usage` says (inference only by default); elsewhere SDPA."""
    backend = ATTENTION_MECHANISMS[normalised_mechanism(mechanism)]
    if backend is None or "sage" not in backend:
        return backend, backend
    usage = (sage_usage or "inference").strip().lower()
    return (backend if "training" in usage else None), (backend if "inference" in usage else None)


def mechanism_problem(mechanism: str, sage_usage: str) -> str | None:
    """Why the names themselves cannot be run (whatever the machine), or None."""
    name = normalised_mechanism(mechanism)
    if name in NOT_OFFERED:
        return NOT_OFFERED[name]
    if name not in ATTENTION_MECHANISMS:
        return "one of " + ", ".join(ATTENTION_MECHANISMS)
    if (sage_usage or "inference").strip().lower() not in SAGEATTENTION_USAGES:
        return "sageattention_usage must be one of " + ", ".join(SAGEATTENTION_USAGES)
    return None


def attention_device_problem(mechanism: str, sage_usage: str, device: str) -> str | None:
    """Why this machine ("cuda", "rocm" or "cpu") cannot run the chosen kernel, naming what to install, or None."""
    if mechanism_problem(mechanism, sage_usage):
        return None  # reported by the config's own rule
    needed = {b for b in attention_backends(mechanism, sage_usage) if b is not None}
    for backend in sorted(needed):
        devices = _DEVICES.get(backend)
        if devices is not None and device not in devices:
            return f"the {backend} kernel needs {_CARD[devices]} (this machine: {device}); use diffusers (PyTorch SDPA)"
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except (RuntimeError, ImportError) as e:
            return f"{str(e).splitlines()[0]} Or use diffusers (PyTorch SDPA)"
    return None


# ------------------------------------------------------------------------------------------------------ fp8 base

# SimpleTuner's torchao fp8 names (helpers/training/__init__.py quantised_precision_levels; fp8wo in its examples)
FP8_PRECISIONS = ("fp8-torchao", "fp8wo-torchao")
FP8_MATMUL_PRECISIONS = ("fp8-torchao",)  # fp8wo stores fp8 weights and multiplies in bf16: any machine runs it
_FP8_CARDS = "NVIDIA compute capability 8.9+ (L4, L40S, RTX 4090, H100, B200) or AMD MI300"


def card_description(device: str) -> tuple[str, bool]:
    """(the card's name as users know it, whether it has fp8 matmuls) for "cuda", "rocm" or "cpu". The CPU runs
    torch's `_scaled_mm` (torch 2.13: measured, slow; it serves the tests, not training)."""
    if device == "cpu":
        return "CPU (no GPU found)", True
    import torch

    name = torch.cuda.get_device_name(0)
    if device == "rocm":
        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")
        return f"{name} ({arch})", arch.startswith(("gfx942", "gfx950"))  # MI300 / MI350
    major, minor = torch.cuda.get_device_capability(0)
    return f"{name} (compute capability {major}.{minor})", (major, minor) >= (8, 9)


def fp8_problem(precision: str, device: str) -> str | None:
    """Why this machine cannot train with an fp8 base, naming the card and the nearest setting that works."""
    if precision not in FP8_MATMUL_PRECISIONS:
        return None
    card, has_fp8 = card_description(device)
    if not has_fp8:
        return (
            f"an fp8 base needs fp8 matmuls ({_FP8_CARDS}); this machine: {card}. "
            "Nearest that works: fp8wo-torchao (fp8 weights, bf16 matmuls) or int8-torchao"
        )
    return None


def compile_problem(backend: str) -> str | None:
    """Why `dynamo_backend` is not one torch.compile knows (SimpleTuner passes accelerate's upper-case names too)."""
    if backend.lower() == "no":
        return None
    import torch

    known = torch._dynamo.list_backends()
    return None if backend.lower() in known else "no (eager) or one of torch.compile's backends: " + ", ".join(known)


def fullgraph_problem(backend: str, fullgraph: bool, group_offload: bool) -> str | None:
    """The one compile setting that cannot work with what hvtune has: diffusers' group offload moves each group in a
    function excluded from compilation (`ModuleGroup.onload_`, `torch.compiler.disable`), a graph break inside every
    offloaded block, which `fullgraph` turns into an error at step 1. Compile with offload works without it."""
    if backend.lower() != "no" and fullgraph and group_offload:
        return "true cannot work with enable_group_offload (its onload is a graph break); set dynamo_fullgraph: false"
    return None
