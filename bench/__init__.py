"""iopart benchmarks: each runs iopart and its comparison points in the same run."""
