"""The remote-kernel protocol: Shell, Forwarder, RemoteKernel (see kernel.py)."""
