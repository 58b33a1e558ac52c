"""The host configuration: a strictly checked TOML file.

Every key is known; an unknown key, a wrong type or a value out of range is a
`ConfigError` naming the key (e.g. `policy.max_partition_cpu`), and nothing
starts. A missing file means the built-in defaults.

    [host]
    cpus = 2.0                    # CPU capacity partitions may be given
    memory_mib = 1024             # the partition-memory area of the pool (page map)
    system_mib = 256              # pool area for channels and command memory (16 MiB each)

    [policy]                      # the command partition's allocation policy
    max_partition_cpu = 1.0
    max_partition_memory_mib = 512
    default_cpu = 0.1
    default_memory_mib = 16

    [io]                          # the I/O partitions
    engine = "io_uring"           # or "psync" (pread/pwrite reference engine)
    disk_mib = 256                # default disk image when none is configured
    metrics_port = 0              # Prometheus on 127.0.0.1 (0: any free port)
    spin_us = 200                 # ring polling before the server sleeps
    heartbeat_ms = 25             # a silent I/O partition is declared hung after this

    [[partition]]                 # guest definitions the command partition keeps
    name = "web"
    cpu = 0.25
    memory_mib = 64
"""

from __future__ import annotations

import errno
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from iopart.errors import ConfigError
from iopart.resources import NAME_RE

T = TypeVar("T")


@dataclass(frozen=True)
class HostConfig:
    cpus: float = float(os.cpu_count() or 1)
    memory_mib: int = 1024
    system_mib: int = 256


@dataclass(frozen=True)
class PolicyConfig:
    max_partition_cpu: float = 1.0
    max_partition_memory_mib: int = 512
    default_cpu: float = 0.1
    default_memory_mib: int = 16


@dataclass(frozen=True)
class IoConfig:
    engine: str = "io_uring"  # or "psync", the pread/pwrite reference engine
    disk_mib: int = 256  # the default disk image made when no disk is configured
    metrics_port: int = 0  # Prometheus endpoint on 127.0.0.1; 0 picks a free port
    spin_us: int = 200  # how long the server polls its rings before it sleeps
    heartbeat_ms: int = 25  # no heartbeat for this long: the active I/O partition is hung


@dataclass(frozen=True)
class PartitionDef:
    name: str
    cpu: float = 0.1
    memory_mib: int = 16


@dataclass(frozen=True)
class Config:
    host: HostConfig = field(default_factory=HostConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    partitions: tuple[PartitionDef, ...] = ()
    source: str = "built-in defaults"
    io: IoConfig = field(default_factory=IoConfig)


_LIMITS: dict[str, tuple[float, float]] = {
    "cpus": (0.01, 4096),
    "memory_mib": (4, 16 << 20),
    "system_mib": (4, 1 << 16),
    "max_partition_cpu": (0.01, 4096),
    "max_partition_memory_mib": (1, 16 << 20),
    "default_cpu": (0.01, 4096),
    "default_memory_mib": (0, 16 << 20),
    "cpu": (0.01, 4096),
    "disk_mib": (1, 16 << 20),
    "metrics_port": (0, 65535),
    "spin_us": (0, 1_000_000),
    "heartbeat_ms": (5, 60_000),
}


def _section(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table", errno=errno.EINVAL)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where}.{key}: unknown key (known: {', '.join(known)})", errno=errno.EINVAL
            )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}"
        want = known[key].type
        if want in ("float", float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{path} must be a number, got {value!r}", errno=errno.EINVAL)
            value = float(value)
        elif want in ("int", int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{path} must be an integer, got {value!r}", errno=errno.EINVAL)
        elif want in ("str", str) and (not isinstance(value, str) or not NAME_RE.match(value)):
            raise ConfigError(
                f"{path} must be a name of a-z 0-9 _ . - (1-63 chars), got {value!r}",
                errno=errno.EINVAL,
            )
        lo_hi = _LIMITS.get(key)
        if lo_hi and not lo_hi[0] <= value <= lo_hi[1]:
            raise ConfigError(
                f"{path} = {value} is out of range [{lo_hi[0]:g}, {lo_hi[1]:g}]",
                errno=errno.ERANGE,
            )
        values[key] = value
    missing = [
        n
        for n, f in known.items()
        if n not in values and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]} is required", errno=errno.EINVAL)
    return cls(**values)


def parse(raw: dict[str, Any], source: str = "<config>") -> Config:
    unknown = set(raw) - {"host", "policy", "partition", "io"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{key}: unknown section (known: host, policy, io, partition)", errno=errno.EINVAL
        )
    host = _section(HostConfig, raw.get("host", {}), "host")
    io = _section(IoConfig, raw.get("io", {}), "io")
    if io.engine not in ("io_uring", "psync"):
        raise ConfigError(f"io.engine must be io_uring or psync, got {io.engine!r}",
                          errno=errno.EINVAL)
    policy = _section(PolicyConfig, raw.get("policy", {}), "policy")
    defs_raw = raw.get("partition", [])
    if not isinstance(defs_raw, list):
        raise ConfigError("partition must be an array of tables ([[partition]])",
                          errno=errno.EINVAL)
    defs = tuple(_section(PartitionDef, d, f"partition[{i}]") for i, d in enumerate(defs_raw))
    seen: set[str] = set()
    for i, d in enumerate(defs):
        if d.name in seen:
            raise ConfigError(f"partition[{i}].name: {d.name!r} is defined twice",
                              errno=errno.EEXIST)
        seen.add(d.name)
        if d.cpu > policy.max_partition_cpu:
            raise ConfigError(
                f"partition[{i}].cpu = {d.cpu} exceeds policy.max_partition_cpu "
                f"= {policy.max_partition_cpu}",
                errno=errno.ERANGE,
            )
        if d.memory_mib > policy.max_partition_memory_mib:
            raise ConfigError(
                f"partition[{i}].memory_mib = {d.memory_mib} exceeds "
                f"policy.max_partition_memory_mib = {policy.max_partition_memory_mib}",
                errno=errno.ERANGE,
            )
    if policy.default_cpu > policy.max_partition_cpu:
        raise ConfigError("policy.default_cpu exceeds policy.max_partition_cpu",
                          errno=errno.ERANGE)
    return Config(host, policy, defs, source, io)


def load(path: Path | None) -> Config:
    """Load and check `path`; None (or no file given) means the defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file", errno=errno.ENOENT) from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}", errno=exc.errno or errno.EIO) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", errno=errno.EINVAL) from None
    return parse(raw, str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The form the command partition passes on and `iopart status` shows."""
    return {
        "host": {f.name: getattr(cfg.host, f.name) for f in fields(cfg.host)},
        "policy": {f.name: getattr(cfg.policy, f.name) for f in fields(cfg.policy)},
        "io": {f.name: getattr(cfg.io, f.name) for f in fields(cfg.io)},
        "partition": [{f.name: getattr(d, f.name) for f in fields(d)} for d in cfg.partitions],
    }
