"""A real TCP proxy in front of PostgreSQL that can lose a COMMIT, for the fault tests.

Network faults at the worst moment cannot be timed from outside (a killed backend or a stopped
server almost never lands between a COMMIT and its reply), so this proxy makes them happen
there: bytes pass through unchanged until it is armed; then the next client message that holds
a COMMIT is either forwarded late with its reply lost (the client sees the connection cut, and
0.3 s later the database commits: a lookup made at once would find nothing) or dropped
(nothing committed). Either way both connections are closed, as a partition
or a crashed middlebox would. `refuse` turns new connections away (a database still down).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

PASS, LOSE_REPLY, DROP_COMMIT = "pass", "lose_reply", "drop_commit"


class CommitCuttingProxy:
    def __init__(self, upstream: Tuple[str, int]):
        self.upstream = upstream
        self.mode = PASS
        self.refuse = False
        self.then_refuse = False
        self.cut = threading.Event()  # set once an armed fault has happened
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._socks: List[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def arm(self, mode: str, then_refuse: bool = False) -> None:
        """Cut at the next COMMIT; with then_refuse, turn new connections away from then on."""
        self.cut.clear()
        self.then_refuse = then_refuse
        self.mode = mode

    def dsn(self, dsn: str) -> str:
        """A postgresql:// URL `dsn` with host and port replaced by the proxy's."""
        url = urlsplit(dsn)
        user = f"{url.username}@" if url.username else ""
        return urlunsplit(url._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._socks:
                _close(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._to_server, args=(client, server), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client), daemon=True).start()

    def _to_server(self, client: socket.socket, server: socket.socket) -> None:
        while True:
            data = _recv(client)
            if not data:
                break
            mode = self.mode
            if mode != PASS and b"COMMIT" in data:
                with self._lock:
                    if self.mode == PASS:  # another connection took the one armed fault
                        mode = PASS
                    else:
                        self.mode = PASS
                if mode != PASS:
                    self.refuse = self.refuse or self.then_refuse
                    self.cut.set()  # before the client can notice the cut
                    _close(client)  # first: no reply can reach the client any more
                    if mode == LOSE_REPLY:
                        # The COMMIT is still on its way when the client sees the cut (and
                        # asks whether its rows exist); it reaches the database 0.3 s later.
                        time.sleep(0.3)
                        server.sendall(data)
                        time.sleep(0.1)
                    _close(server)
                    return
            try:
                server.sendall(data)
            except OSError:
                break
        _close(server)
        _close(client)


def _recv(s: socket.socket) -> Optional[bytes]:
    try:
        return s.recv(65536)
    except OSError:
        return None


def _pump(src: socket.socket, dst: socket.socket) -> None:
    while True:
        data = _recv(src)
        if not data:
            break
        try:
            dst.sendall(data)
        except OSError:
            break
    _close(src)
    _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
