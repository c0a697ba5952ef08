"""URLs fit to print, and the credentials a URL carries.

Every URL the project logs, prints or records (tracking URIs, mirrors, webhooks) goes through `redact`; a
mirror's `user:password@` goes into an Authorization header (urllib would take it for part of the host).
"""

from __future__ import annotations

import base64
import urllib.parse


def redact(uri: str) -> str:
    """A URI fit for logs and tags: credentials and query strings removed.

    Not urlsplit: a password holding '/' or '?' ends its netloc early and leaks the rest as the path.
    The user info is everything up to the last '@' of the part after '://'.
    """
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme in ("sqlite", "file"):
        return uri  # a path (sqlite:////abs/path keeps its slashes); nothing to hide
    return without_credentials(uri)[0].split("?", 1)[0].split("#", 1)[0]


def without_credentials(url: str) -> tuple[str, dict[str, str]]:
    """`url` without its user info (everything up to the last '@' after '://', as `redact` reads it), and the
    Basic Authorization header that carries it (empty when there is none)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url, {}
    userinfo, host = rest[:rest.rindex("@")], rest[rest.rindex("@") + 1:]
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return f"{scheme}://{host}", {"Authorization": "Basic " + base64.b64encode(token).decode()}
