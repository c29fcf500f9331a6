"""A loopback TCP relay between a forwarder and mwdlogd that can swallow the server's
answers: with `hold()` the server still reads, commits (fsync) and answers each request
sent on a connection that was open before, but the answer never reaches the forwarder.
A `kill -9` of the server then lands exactly between the fsync and the answer as the
forwarder sees it. TLS passes through unchanged (the relay sees only TCP bytes), so a
new connection cannot be half-relayed (its handshake would hang): while holding, new
connections are closed at once, and the forwarder sends on the ones it keeps open.
"""

from __future__ import annotations

import contextlib
import socket
import threading

RECEIVE_BYTES = 64 * 1024


class Gate:
    """Listens on 127.0.0.1 (port 0); relays each connection to `target_port`."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._holding = False
        self.swallowed = 0  # server bytes dropped while holding
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._start(self._accept)

    def hold(self) -> None:
        """From now on the server's bytes are dropped, not relayed, and new connections
        are closed."""
        with self._lock:
            self._holding = True

    def release(self) -> None:
        """Relay again (connections made from now on)."""
        with self._lock:
            self._holding = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            _shut(sock)
        for thread in self._threads:
            thread.join(10)
        for sock in sockets:
            sock.close()

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                holding = self._holding
            if holding:
                client.close()
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
                server.settimeout(None)
            except OSError:  # mwdlogd is down: the forwarder sees the connection close
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            self._start(self._pump, client, server, False)
            self._start(self._pump, server, client, True)

    def _pump(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        """Copy until either side ends, then end both."""
        try:
            while data := source.recv(RECEIVE_BYTES):
                with self._lock:
                    swallow = answers and self._holding
                    if swallow:
                        self.swallowed += len(data)
                if not swallow:
                    target.sendall(data)
        except OSError:
            pass
        finally:
            _shut(source)
            _shut(target)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
