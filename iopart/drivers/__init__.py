"""Disk and NIC backends of the I/O partitions (one module per backend)."""
