"""A machine without internet, for the page tests: a network namespace holding only loopback.

`offline_network()` moves the calling thread into a new network namespace (unshare(2) with
CLONE_NEWNET, what `unshare -n` does) and brings its loopback up; every process the thread starts
meanwhile (Chromium, `bentoml serve`) and every socket it opens (the DevTools websocket, httpx)
lives there, where any other address is unreachable. On leaving, the thread goes back to its
own namespace. It needs root (CAP_SYS_ADMIN); without it the test fails, or skips where
DEFECTFLOW_ALLOW_MISSING=browser says so.

`recorded_requests(tab)` and `external_requests(tab)` read what a tab asked for (its Network
events): an offline page must ask for nothing but file:, data: and its own loopback server.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from helpers_resources import skip_missing

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_LOCAL_SCHEMES = {"file", "data", "about", "blob"}
_LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


@contextmanager
def offline_network() -> Iterator[str]:
    """The calling thread (and what it starts) in a fresh network namespace with only loopback;
    yields the namespace's name (net:[inode])."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            _libc_call("unshare", CLONE_NEWNET)
        except OSError as exc:
            skip_missing(
                "browser",
                f"cannot take the page tests offline: {exc} (a network "
                "namespace needs root or CAP_SYS_ADMIN)",
            )
        try:
            _loopback_up()
            name = os.readlink("/proc/thread-self/ns/net")
            print(f"\noffline: network namespace {name}, loopback only")
            yield name
        finally:
            _libc_call("setns", own, CLONE_NEWNET)
    finally:
        os.close(own)


def recorded_requests(tab) -> list[str]:
    """Every URL the tab asked for so far (Network.requestWillBeSent events)."""
    return [
        e["params"]["request"]["url"]
        for e in tab.events
        if e.get("method") == "Network.requestWillBeSent"
    ]


def external_requests(tab) -> list[str]:
    """The requests of the tab that went anywhere but file:, data: or this machine's loopback."""

    def local(url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme in _LOCAL_SCHEMES or (parts.hostname or "") in _LOOPBACK

    return [url for url in recorded_requests(tab) if not local(url)]


def failed_requests(tab) -> list[str]:
    """The requests of the tab that failed (Network.loadingFailed), with Chromium's reason."""
    urls = {
        e["params"]["requestId"]: e["params"]["request"]["url"]
        for e in tab.events
        if e.get("method") == "Network.requestWillBeSent"
    }
    return [
        f"{urls.get(e['params']['requestId'], '?')}: {e['params'].get('errorText')}"
        for e in tab.events
        if e.get("method") == "Network.loadingFailed"
    ]
