"""The run page's token: how it is chosen, printed, offered back (query, header, cookie) and checked.

Every page has a token, on 127.0.0.1 too: a rented box can be shared, and whoever reaches the port could otherwise
download the LoRA or stop the run. A token the user sets may hold any character `openssl rand -base64` prints
(`+`, `/`, `=`): the printed link percent-encodes it, and a link pasted with a raw `+` (which a query decoder reads as
a space) is accepted too. The cookie never holds the token itself but an HMAC of it, so its value is plain hex
whatever the token is; and it is read from the Cookie header by hand, because the standard library's parser drops
every cookie of a header when one (another local app's, on the same host: cookies ignore ports) is malformed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from urllib.parse import quote, unquote, unquote_plus

from hvtune.errors import UserError

MIN_TOKEN_CHARS = 12


def resolve_token(token: str | None) -> str:
    """The token the page requires: the one given, else HVTUNE_PAGE_TOKEN, else a new random one."""
    token = token or os.environ.get("HVTUNE_PAGE_TOKEN") or secrets.token_urlsafe(18)
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"the page token must be at least {MIN_TOKEN_CHARS} characters (HVTUNE_PAGE_TOKEN or --token)")
    return token


def link_query(token: str) -> str:
    """`?token=...` for the printed address, encoded so that `+`, `/` and `=` arrive as typed."""
    return "?token=" + quote(token, safe="")


def query_tokens(raw_query: str) -> list[str]:
    """The token(s) a query string offers: percent-decoded, and also with `+` kept as `+` (a pasted raw token)."""
    offered = []
    for part in raw_query.split("&"):
        name, _, value = part.partition("=")
        if name == "token" and value:
            offered += [unquote(value), unquote_plus(value)]
    return offered


def cookie_value(token: str) -> str:
    """What the page's cookie holds: hex, whatever characters the token has."""
    return hmac.new(token.encode(), b"hvtune-page-cookie", hashlib.sha256).hexdigest()


def read_cookie(header: str, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header, whatever the other cookies in it look like."""
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            return value.strip().strip('"')
    return None


def token_matches(token: str, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(offered.encode(), token.encode())


def cookie_matches(token: str, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(offered.encode(), cookie_value(token).encode())
