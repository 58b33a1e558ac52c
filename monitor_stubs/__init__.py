"""Code that runs inside a guest before its own code, and its monitor-side counterparts."""
