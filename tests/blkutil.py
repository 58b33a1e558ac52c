"""The block rig for native tests; it lives in bench/blockrig.py, shared with the benchmarks."""

from bench.blockrig import BlockRig, block_rig

__all__ = ["BlockRig", "block_rig"]
