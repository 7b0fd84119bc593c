"""Sandbox runtimes, one module each, imported lazily by name (see :mod:`.registry`)."""
