"""torch.compile of the transformer with SimpleTuner's `dynamo_*` keys, after the LoRA is in place (its peft layers
are compiled inside the blocks).

- `dynamo_backend`: `no` (default: eager, nothing changes) or a torch.compile backend (`inductor`, ...).
- `dynamo_use_regional_compilation: true`: diffusers' `compile_repeated_blocks()`, which compiles one block's code
  once and reuses it for all 54 blocks (the model declares `_repeated_blocks`); false: the whole transformer
  (`nn.Module.compile`), as SimpleTuner does through accelerate.
- `dynamo_mode` ("" = torch's default), `dynamo_fullgraph`, `dynamo_dynamic` go to torch.compile as they are.

torch.compile is lazy: the compile happens in the first step. Its time is reported once, when the first forward
returns ("compiled 54 blocks (inductor, regional): first forward 41.0 s, compile included"); the backward's
compile falls in the same first step, which the run's timing counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def compile_options(cfg) -> dict[str, Any]:
    """The keyword arguments torch.compile gets: dynamic None (torch decides) unless dynamo_dynamic is true."""
    options: dict[str, Any] = {"backend": cfg.dynamo_backend.lower(), "fullgraph": cfg.dynamo_fullgraph}
    if cfg.dynamo_mode:
        options["mode"] = cfg.dynamo_mode
    if cfg.dynamo_dynamic:
        options["dynamic"] = True
    return options


def compile_transformer(transformer, cfg, say: Callable[[str], None] = print) -> str | None:
    """Compile per the config (after add_lora); returns what was compiled ("54 blocks (inductor, regional)"), or
    None when dynamo_backend is no."""
    if cfg.dynamo_backend.lower() == "no":
        return None
    from hvtune.model.attention import declare_padding_before_each_forward

    declare_padding_before_each_forward(transformer)  # no host sync, graph break or extra guard inside the blocks
    options = compile_options(cfg)
    if cfg.dynamo_use_regional_compilation:
        transformer.compile_repeated_blocks(**options)
        what = f"{len(transformer.transformer_blocks)} blocks ({options['backend']}, regional)"
    else:
        transformer.compile(**options)
        what = f"the transformer ({options['backend']}, whole model)"
    _report_first_forward(transformer, f"compiled {what}", say)
    return what


def _report_first_forward(transformer, what: str, say: Callable[[str], None]) -> None:
    started: list[float] = []

    def before(module, args, kwargs):
        started.append(time.perf_counter())

    def after(module, args, kwargs, output):
        say(f"{what}: first forward {time.perf_counter() - started[0]:.1f} s, compile included")
        pre.remove()
        post.remove()

    pre = transformer.register_forward_pre_hook(before, with_kwargs=True)
    post = transformer.register_forward_hook(after, with_kwargs=True)
