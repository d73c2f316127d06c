"""One model over several hosts: `jax.distributed.initialize` from the command line or the environment.

Every host runs the same programs on its own devices; host 0's coordinator joins them, and the mesh then
spans every host's devices (`jax.devices()`, ordered host by host). On a TPU pod slice, and wherever else JAX
detects its cluster (SLURM, Open MPI, Kubernetes pods with the cluster's API), `num_hosts=0` lets JAX find the
coordinator, host count and rank itself. On CPUs the hosts exchange data through gloo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

DETECT = 0  # num_hosts that asks JAX to detect the cluster


@dataclasses.dataclass(frozen=True)
class HostGroup:
    """What jax.distributed.initialize is called with; None: JAX's own detection decides."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


def host_group(num_hosts: int, host_rank: int | None, coordinator: str | None) -> HostGroup | None:
    """The hosts to join, from --num-hosts / --host-rank / --coordinator; None for a single host."""
    if num_hosts < 0:
        raise ValueError(f"num_hosts must be >= 0 (0: detect the cluster); got {num_hosts}")
    if num_hosts == DETECT:
        return HostGroup(coordinator, None, host_rank)
    if num_hosts == 1:
        if host_rank not in (None, 0):
            raise ValueError(f"host_rank {host_rank} with a single host; set num_hosts")
        return None
    if coordinator is None or host_rank is None:
        raise ValueError(f"{num_hosts} hosts need the coordinator's address (host 0's host:port) and this host's "
                         "rank (0 .. num_hosts-1), or num_hosts 0 where JAX detects them (TPU pod slices)")
    if not 0 <= host_rank < num_hosts:
        raise ValueError(f"host_rank must be in 0 .. {num_hosts - 1}; got {host_rank}")
    if ":" not in coordinator:
        raise ValueError(f"coordinator {coordinator!r} must be host:port")
    return HostGroup(coordinator, num_hosts, host_rank)


def initialize(group: HostGroup | None, init: Callable[..., None] | None = None) -> None:
    """Join the hosts of `group` (nothing for a single host), before any other use of JAX's devices."""
    if group is None:
        return
    # The CPU devices of different processes talk through gloo (JAX's default CPU client has no collectives
    # across processes); it changes nothing for GPU and TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    (init or jax.distributed.initialize)(coordinator_address=group.coordinator_address,
                                         num_processes=group.num_processes, process_id=group.process_id)



def _client():
    """JAX's client of the coordinator's key-value store (jax.distributed has no public accessor for it)."""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: no coordinator to exchange addresses through")
    return client


def publish(key: str, value: str) -> None:
    """Store `value` under `key` in the coordinator's key-value store, for the other hosts to look up."""
    _client().key_value_set(key, value)


def lookup(key: str, timeout_s: float) -> str:
    """The value another host published under `key`, waiting up to `timeout_s` for it."""
    return _client().blocking_key_value_get(key, int(timeout_s * 1000))


def coordinator_host() -> str:
    """Host 0's address as every host reaches its coordinator (the host part of the coordinator's address)."""
    from jax._src import distributed as jax_distributed

    address = jax_distributed.global_state.coordinator_address
    if address is None:
        raise RuntimeError("jax.distributed is not initialized: host 0's address is not known")
    return address.rsplit(":", 1)[0].strip("[]")
