"""Memory channels: shared-memory request/response rings between two partitions.

The ring protocol itself is native (native/channel.c); this package creates
channels in the pool, hands their ends to other processes, starts native server
workers and reads counters.
"""

from iopart.channels.channel import (
    Channel,
    ChannelEnd,
    ChannelGeometry,
    Descriptor,
    Doorbells,
    Fragment,
    Role,
)
from iopart.channels.worker import ServerWorker, WorkerConfig
from iopart.channels.xlate import Region, RegionTable

__all__ = [
    "Channel",
    "ChannelEnd",
    "ChannelGeometry",
    "Descriptor",
    "Doorbells",
    "Fragment",
    "Region",
    "RegionTable",
    "Role",
    "ServerWorker",
    "WorkerConfig",
]
