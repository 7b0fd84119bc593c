"""Snapshot and rollback of a running kernel's sandbox (service, control socket, CLI)."""
