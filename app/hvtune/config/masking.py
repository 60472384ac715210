"""Secrets never leave hvtune: the one masking every output uses (`hvtune check`, run.json, logs, trackers, the run
page)."""

from __future__ import annotations

import re
from typing import Any

_SECRET_WORDS = {"token", "key", "apikey", "secret", "password", "passwd", "credential", "credentials", "webhook"}


def is_secret_key(key: str) -> bool:
    """A key that looks like it holds a secret (`hub_token`, `wandb_api_key`, `aws_secret_access_key`): one of its
    `_`/`-` separated words is a secret word. hvtune uses no such key itself; users paste them into configs."""
    return any(word in _SECRET_WORDS for word in re.split(r"[_\-.]", key.lower()))


# token-shaped strings under any key (a Hugging Face or OpenAI-style token pasted into a prompt or a path)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")


def mask_secrets(values: Any) -> Any:
    """`values` with the value of every secret-looking key (at any depth), and every token-shaped string, replaced by
    "***": for every output (`hvtune check`, run.json, logs, the run page). Empty values stay visible: they show a
    secret is missing, not what it is."""
    if isinstance(values, dict):
        return {k: "***" if is_secret_key(str(k).lstrip("-")) and v else mask_secrets(v) for k, v in values.items()}
    if isinstance(values, list):
        return [mask_secrets(v) for v in values]
    if isinstance(values, str):
        return _SECRET_VALUE.sub("***", values)
    return values
