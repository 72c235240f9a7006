"""Knowing in a few seconds that the Hugging Face Hub cannot be reached.

Without network the hub client retries every download for about a minute before it gives up; one short
connection attempt tells the same. Weights already in the local cache still load: the download then runs
in the hub's offline mode, which reads the cache and fails at once when the file is not there.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


def unreachable() -> str | None:
    """Why the hub cannot be reached, or None when it may be (then the hub client finds out itself)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy can say
    url = urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"no connection to {url.hostname}: {e.strerror or type(e).__name__}"
    return None


@contextmanager
def offline(on: bool = True) -> Iterator[None]:
    """The hub's offline mode while inside: cached files load, anything else fails at once."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = was or on
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was
