"""Generated protobuf messages of the containerd shim API (see generate.py)."""
