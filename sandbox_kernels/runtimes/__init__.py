"""Sandbox runtimes, one folder each (provisioner, record, doctor, orphans, ...), found through
their records in :mod:`.registry` and imported lazily."""
