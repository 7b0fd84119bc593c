"""The jupyter_server extension for snapshot and rollback (arrives with the snapshot issue)."""
