"""A TCP proxy on 127.0.0.1 in front of a real server, with a switch that makes the link
stop answering the way a dead network path does: no RST, no FIN, the sockets stay open and
the kernel keeps ACKing, only nothing comes through any more.

    with FreezableProxy(("127.0.0.1", 3306)) as proxy:
        url = f"mysql+pymysql://root@127.0.0.1:{proxy.port}/db"
        ...
        proxy.freeze(new_connections="hang")     # the server is gone
        proxy.freeze(new_connections="forward")  # gone for old connections, back for new
        proxy.thaw()                             # everything flows again

Threads only, bounded (`max_connections`, each two pump threads), and `stop()` (also on
leaving the `with` block) closes every socket and joins every thread.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from typing import Literal

from tests.servers import HOST

NewConnections = Literal["hang", "forward"]
#: How often blocked threads look at the stop flag.
_POLL_S = 0.1
_JOIN_TIMEOUT_S = 5.0


class _Link:
    """One proxied connection: the client's socket, the upstream one, and the gate that
    says whether bytes may pass."""

    def __init__(self, client: socket.socket, upstream: socket.socket, flowing: bool) -> None:
        self.sockets = (client, upstream)
        self.flowing = threading.Event()
        if flowing:
            self.flowing.set()
        self.threads: list[threading.Thread] = []
        self.pumps_done = 0

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class FreezableProxy:
    """Forwards 127.0.0.1:`port` to `upstream` until told to freeze (module docstring)."""

    def __init__(self, upstream: tuple[str, int], *, max_connections: int = 64) -> None:
        self.upstream = upstream
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._new: NewConnections | None = None  # None: not frozen
        self._links: list[_Link] = []
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(_POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept")
        self._acceptor.start()

    def __enter__(self) -> FreezableProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def connections(self) -> int:
        """Proxied connections open now (both sides)."""
        with self._lock:
            return len(self._links)

    def freeze(self, *, new_connections: NewConnections) -> None:
        """Stop forwarding on every established connection, keeping its sockets open.
        New connections are accepted and then either hang the same way ("hang": the
        server is gone) or are forwarded ("forward": the server is back behind a new
        connection, as after a failover or a NAT that lost its state)."""
        with self._lock:
            self._new = new_connections
            for link in self._links:
                link.flowing.clear()

    def thaw(self) -> None:
        """Forward everything again, the bytes held while frozen first."""
        with self._lock:
            self._new = None
            for link in self._links:
                link.flowing.set()

    def stop(self) -> None:
        """Close every socket and join every thread (idempotent)."""
        self._stopping.set()
        self._acceptor.join(_JOIN_TIMEOUT_S)
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        for link in links:
            for t in link.threads:
                t.join(_JOIN_TIMEOUT_S)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._links) >= self.max_connections
                flowing = self._new in (None, "forward")
            if full:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            self._start_link(client, upstream, flowing)

    def _start_link(self, client: socket.socket, upstream: socket.socket, flowing: bool) -> None:
        for sock in (client, upstream):
            sock.settimeout(None)  # recv waits in select(); stop() closes what sendall waits on
        link = _Link(client, upstream, flowing)
        link.threads = [
            threading.Thread(target=self._pump, args=(link, client, upstream), name="proxy-up"),
            threading.Thread(target=self._pump, args=(link, upstream, client), name="proxy-down"),
        ]
        with self._lock:
            if self._stopping.is_set():
                link.close()
                return
            self._links.append(link)
        for t in link.threads:
            t.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        """Copy src to dst, holding each chunk (and the end of the stream) while frozen."""
        try:
            while not self._stopping.is_set():
                if not select.select([src], [], [], _POLL_S)[0]:
                    continue
                data = src.recv(65536)
                while not link.flowing.wait(_POLL_S):
                    if self._stopping.is_set():
                        return
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except (OSError, ValueError):  # reset, or closed by stop()
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                link.pumps_done += 1
                done = link.pumps_done == len(link.threads)
                if done and link in self._links:
                    self._links.remove(link)
            if done:
                link.close()


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 that listens and never accepts: the kernel completes the TCP
    handshake for the backlog, then nothing ever answers, as with a host whose service
    hangs. Yields the port."""
    with socket.create_server((HOST, 0), backlog=16) as sock:
        yield sock.getsockname()[1]
