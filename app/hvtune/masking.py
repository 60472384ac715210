"""Secrets never leave hvtune: the one masking every output uses (`hvtune check`, run.json, status.json, logs,
trackers, the run page)."""

from __future__ import annotations

import re
from typing import Any

# Words that name a secret wherever they stand in a key, case-insensitively and across `_`, `-`, `.` and camelCase:
# `mysecretstuff`, `clientSecret`, `DB_PASSWORD`, `gcpCredentials`, `authorization`, `oauth_bearer`.
_SECRET_PARTS = re.compile(
    r"secret|passw(?:or)?d|passphrase|credential|apikey|auth(?!or(?!i))|bearer|webhook|privatekey|accesskey|signingkey"
)
# `token` wherever it stands (`hfToken`, `apitoken`, `HUB_TOKEN`), but not the tokenizer's own keys and counts
# (`tokenizer_max_length`, `caption_tokens`).
_TOKEN = re.compile(r"token(?!i[sz]|s)")
# `key` as a word of its own (`wandb_api_key`, `aws_access_key_id`, `openaiKey`), except where the word before it says
# it names a field, not a secret (`caption_key`, `lora_key`, `sort_key`).
_PLAIN_KEY_WORDS = {
    "caption", "lora", "sort", "column", "metadata", "dict", "lookup", "cache", "partition", "primary", "foreign",
    "hot", "frame", "index", "state", "unsupported", "join", "group", "prompt", "label", "field", "image", "video",
    "text", "dataset", "data", "embed", "config", "tag", "trigger", "sample", "json", "entry", "hash", "unknown",
    "known", "extra", "ignored", "refused", "allowed", "missing", "required", "kept", "changed",
}  # fmt: skip


# short words that are secrets only as words of their own (`github_pat`, `db_pwd`), never inside another word
_SECRET_WORDS = {"pat", "pwd", "otp", "jwt"}


def _words(key: str) -> list[str]:
    """`wandbApiKey` -> [wandb, api, key]; `HF_TOKEN` -> [hf, token]."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", key)
    return [w for w in re.split(r"[\s_\-.:/]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """A key that looks like it holds a secret (`hub_token`, `wandb_api_key`, `clientSecret`, `mysecretstuff`).
    hvtune uses no such key itself; users paste them into configs and environments."""
    return _names_secret(_words(key)) or _names_key(_words(key))


def _names_secret(words: list[str]) -> bool:
    joined = "".join(words)
    return bool(_SECRET_PARTS.search(joined) or _TOKEN.search(joined) or _SECRET_WORDS.intersection(words))


def _names_key(words: list[str]) -> bool:
    """The word `key(s)` on its own, not after a word that makes it a field's name (`caption_key`)."""
    return any(w in ("key", "keys") and (i == 0 or words[i - 1] not in _PLAIN_KEY_WORDS) for i, w in enumerate(words))


# token-shaped strings under any key (a token pasted into a prompt, a path or a URL): Hugging Face, OpenAI and
# Anthropic, GitHub, GitLab, Slack, AWS access key ids, Google API keys
_SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])("
    r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|glpat-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}"
    r")"
)


def mask_value(value: str) -> str:
    """`value` with every token-shaped part replaced by "***"."""
    return _SECRET_VALUE.sub("***", value)


def mask_secrets(values: Any) -> Any:
    """`values` with the value of every secret-looking key (at any depth), and every token-shaped string, replaced by
    "***": for every output (`hvtune check`, run.json, logs, the run page). Empty values stay visible: they show a
    secret is missing, not what it is; so do numbers and booleans (`webhook_reporting_interval`,
    `allow_unsupported_keys`): a secret is text."""
    if isinstance(values, dict):
        return {k: "***" if _hides_secret(str(k), v) else mask_secrets(v) for k, v in values.items()}
    if isinstance(values, list):
        return [mask_secrets(v) for v in values]
    if isinstance(values, str):
        return mask_value(values)
    return values


def _hides_secret(key: str, value: Any) -> bool:
    """Whether `value` is masked whole: text (or a list or table of it) under a secret-looking key. A table under a
    key that says only `keys` (a record's `unknown_keys`, a `metadata_keys` map) is masked inside instead."""
    if not value or not isinstance(value, str | list | dict):
        return False
    words = _words(key.lstrip("-"))
    return _names_secret(words) or (_names_key(words) and not isinstance(value, dict))
