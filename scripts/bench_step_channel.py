"""How host 0's step inputs could reach the other hosts: jax.experimental.multihost_utils.broadcast_one_to_all
against a TCP connection (what sgjax/engine/step_channel.py uses). Two local processes of 2 CPU devices each:

    python scripts/bench_step_channel.py

It prints, from host 0: a broadcast's time per call, its time when issued behind a running device program
(it waits for that program: a host would learn step N+1's inputs only after step N), and a TCP send of the
same pickled array with a one-byte reply.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time

import numpy as np

CALLS = 30
PAYLOAD = 4096  # int32s: about a small step's packed inputs


def host(rank: int, coordinator: str, tcp_port: int) -> None:
    import jax
    from jax.experimental import multihost_utils

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, 2, rank)
    payload = np.arange(PAYLOAD, dtype=np.int32)
    multihost_utils.broadcast_one_to_all(payload)  # compiled once
    started = time.perf_counter()
    for _ in range(CALLS):
        np.asarray(multihost_utils.broadcast_one_to_all(payload))
    broadcast = (time.perf_counter() - started) / CALLS

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    matrix = jax.device_put(np.ones((512, 512), np.float32),
                            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    work = jax.jit(lambda a: (a @ a @ a @ a).sum())  # a stand-in for a step on the devices
    np.asarray(work(matrix))
    started = time.perf_counter()
    np.asarray(work(matrix))
    alone = time.perf_counter() - started
    started = time.perf_counter()
    work(matrix)
    np.asarray(multihost_utils.broadcast_one_to_all(payload))
    behind = time.perf_counter() - started

    if rank == 0:
        with socket.create_server(("127.0.0.1", tcp_port)) as listener:
            multihost_utils.sync_global_devices("listening")
            peer, _ = listener.accept()
    else:
        multihost_utils.sync_global_devices("listening")
        peer = socket.create_connection(("127.0.0.1", tcp_port))
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = len(pickle.dumps(payload, protocol=5))
    started = time.perf_counter()
    for _ in range(CALLS):
        if rank == 0:
            peer.sendall(pickle.dumps(payload, protocol=5))
            _read(peer, 1)
        else:
            pickle.loads(_read(peer, size))
            peer.sendall(b"k")
    tcp = (time.perf_counter() - started) / CALLS
    if rank == 0:
        print(f"broadcast_one_to_all: {broadcast * 1e3:.2f} ms a call; issued behind a {alone * 1e3:.0f} ms "
              f"program: {behind * 1e3:.0f} ms; TCP send and reply: {tcp * 1e3:.3f} ms")


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


def main() -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    hosts = [subprocess.Popen([sys.executable, __file__, str(rank), f"127.0.0.1:{ports[0]}", str(ports[1])], env=env)
             for rank in range(2)]
    for h in hosts:
        h.wait()


if __name__ == "__main__":
    if len(sys.argv) == 4:
        host(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    else:
        main()
