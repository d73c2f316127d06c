"""The step channel: host 0's engine sends every device call of its runner to the other hosts over TCP.

Why a socket and not a device broadcast (jax.experimental.multihost_utils.broadcast_one_to_all): a broadcast
is itself a program on the devices, queued behind the step they are running, so a host would learn step N+1's
inputs only once step N had finished, and host scheduling would no longer overlap the device's work; its
shapes must also be known before it runs (a call's size varies). scripts/bench_step_channel.py (2 processes x
2 CPU devices, a loaded 2-core machine): a broadcast of 16 KB took 3.6 ms, 213 ms when issued behind a 155 ms
program; the same bytes over TCP with a reply 0.19 ms. Over TCP the calls travel beside the devices' work, and
a host that dies closes its socket at once, which the others see.

Host 0 listens on a free port and publishes its address and a random token in the coordinator's key-value
store; each other host connects with its rank and the token, then receives a `Hello` (the pool size host 0
chose, and host 0's engine flags, which it checks against its own) and the calls in order, and `STOP` when host 0 stops.
A host whose peer vanishes exits with an error: the model spans that host's devices, and the programs it no
longer runs would keep every other host waiting in their collectives forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import secrets
import socket
import struct
import threading
import time
from typing import NoReturn

import jax

from sgjax.config import EngineArgs
from sgjax.executor.device_calls import DeviceCall
from sgjax.platform import distributed

logger = logging.getLogger(__name__)

ADDRESS_KEY = "sgjax/step_channel"
CONNECT_TIMEOUT_S = 3600.0  # the other hosts connect once they have loaded the model (minutes for a large one)
STOP = "stop"
# Flags that may differ from host to host: where each finds its files
HOST_LOCAL_FLAGS = ("model_path", "compilation_cache_dir")
_LENGTH = struct.Struct("!Q")
_GREETING = struct.Struct("!I32s")  # rank, token: fixed bytes, as nothing from an unknown peer is unpickled


@dataclasses.dataclass
class Hello:
    """What a host needs of host 0's engine before it builds its runner."""

    num_pages: int
    args: EngineArgs


class StepSender:
    """Host 0's end: one connection to every other host."""

    def __init__(self, peers: dict[int, socket.socket]):
        self.peers = peers
        self._lock = threading.Lock()
        self._closing = False
        for rank, peer in peers.items():
            threading.Thread(target=self._watch, args=(rank, peer), name=f"sgjax-host-{rank}", daemon=True).start()

    @classmethod
    def open(cls, args: EngineArgs, num_pages: int, timeout_s: float = CONNECT_TIMEOUT_S) -> StepSender:
        """Publish this host's address, wait for every other host to connect, and send each the Hello."""
        expected = set(range(1, jax.process_count()))
        token = secrets.token_hex(16)  # 32 characters
        # every interface, IPv6 too where the host has it: the others reach it as they reach the coordinator
        dual = socket.has_dualstack_ipv6()
        with socket.create_server(("", 0), family=socket.AF_INET6 if dual else socket.AF_INET,
                                  dualstack_ipv6=dual) as listener:
            distributed.publish(ADDRESS_KEY, f"{distributed.coordinator_host()}:{listener.getsockname()[1]}:{token}")
            logger.info("waiting for hosts %s to connect to the step channel", sorted(expected))
            peers, deadline = {}, time.monotonic() + timeout_s
            while expected - peers.keys():
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    listener.settimeout(left)
                    peer, address = listener.accept()
                except TimeoutError:
                    raise TimeoutError(f"hosts {sorted(expected - peers.keys())} did not connect to the step "
                                       f"channel within {timeout_s:.0f} s") from None
                peer.settimeout(30.0)
                try:
                    rank, their_token = _GREETING.unpack(_read_exactly(peer, _GREETING.size))
                except (OSError, EOFError):
                    peer.close()
                    continue
                if not secrets.compare_digest(their_token, token.encode()) or rank not in expected or rank in peers:
                    logger.warning("refused a step channel connection from %s (rank %r)", address, rank)
                    peer.close()
                    continue
                peer.settimeout(None)
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each call is small and urgent
                peers[rank] = peer
        sender = cls(peers)
        sender._send(Hello(num_pages, args))
        return sender

    def send(self, call: DeviceCall) -> None:
        """Send one device call to every other host (before this host enqueues it)."""
        self._send(call)

    def _send(self, message) -> None:
        data = _frame(message)
        with self._lock:
            for rank, peer in self.peers.items():
                try:
                    peer.sendall(data)
                except OSError as e:
                    self._lost(f"host {rank} is gone ({e})")

    def lost_step(self, error: BaseException) -> NoReturn:
        self._lost(f"a device call the other hosts run failed on host 0 ({type(error).__name__}: {error})")

    def close(self) -> None:
        """Tell every other host to stop, after the last call."""
        with self._lock:
            self._closing = True
            for peer in self.peers.values():
                try:
                    peer.sendall(_frame(STOP))
                    peer.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # gone already: it stops anyway

    def _watch(self, rank: int, peer: socket.socket) -> None:
        """The other hosts never send after connecting: anything readable is their end closing."""
        try:
            peer.recv(1)
        except OSError:
            pass
        if not self._closing:
            self._lost(f"host {rank} closed the step channel (it exited or lost its connection)")

    @staticmethod
    def _lost(reason: str) -> NoReturn:
        # Exiting is the only way out: the engine thread may be waiting in a collective that cannot finish.
        logger.critical("%s; the model spans every host's devices, so no host can run another step: exiting",
                        reason)
        logging.shutdown()
        os._exit(1)


class StepReceiver:
    """Another host's end: the calls host 0 sends, in order."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def connect(cls, timeout_s: float = CONNECT_TIMEOUT_S) -> StepReceiver:
        """Connect to host 0's step channel, once host 0 has published it."""
        # Asked first: JAX's backend starts with an exchange between all hosts, which host 0 joins in open()
        rank = jax.process_index()
        host, port, token = distributed.lookup(ADDRESS_KEY, timeout_s).rsplit(":", 2)
        sock = socket.create_connection((host, int(port)), timeout=60.0)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_GREETING.pack(rank, token.encode()))
        return cls(sock)

    def receive(self):
        """The next message: a Hello, a DeviceCall or STOP. EOFError if host 0 closed the channel without STOP."""
        return _receive(self.sock)

    def close(self) -> None:
        self.sock.close()


def check_same_flags(ours: EngineArgs, host0: EngineArgs) -> None:
    """Raise ValueError naming each engine flag this host was given otherwise than host 0."""
    theirs = dataclasses.asdict(host0)
    differ = [f"{name}: {theirs[name]!r} on host 0, {value!r} here" for name, value in dataclasses.asdict(ours).items()
              if name not in HOST_LOCAL_FLAGS and value != theirs[name]]
    if differ:
        raise ValueError("every host must be given host 0's engine flags (their programs must have the same "
                         "shapes); " + "; ".join(differ))


def _frame(message) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return _LENGTH.pack(len(data)) + data


def _receive(sock: socket.socket):
    (length,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size))
    return pickle.loads(_read_exactly(sock, length))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("host 0 closed the step channel")
        got += k
    return bytes(buffer)
