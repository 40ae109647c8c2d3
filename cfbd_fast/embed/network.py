"""Fail fast without a network: when the Hugging Face hub cannot be reached, downloads run in offline mode, so
weights that are cached load and weights that are not fail in one attempt (no retries with waits)."""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (HF_ENDPOINT, default huggingface.co) opens in `timeout` s."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def offline_when_unreachable(needed: bool = True) -> Iterator[None]:
    """Within the block, huggingface_hub runs as with HF_HUB_OFFLINE=1 when `needed` and the hub is unreachable."""
    if not needed:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False
