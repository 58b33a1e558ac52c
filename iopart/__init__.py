"""iopart: an I/O-partition virtual device server.

One Linux host divided into partitions that share its disks and NICs through
redundant I/O partitions over shared-memory channels.
"""

__version__ = "0.1.0"
