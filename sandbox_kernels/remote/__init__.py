"""One protocol for kernels that run in another machine (VM, SSH host, Kubernetes pod).

- :mod:`.shell`: the ``Shell`` (commands, files, detached processes) and ``Forwarder``
  (client sockets carried to the sandbox's ports) protocols.
- :mod:`.scripts`: the shell scripts every ``Shell`` runs, written once.
- :mod:`.ssh`: both protocols over one SSH tunnel (Kubernetes: ``runtimes/k8s/process.py``
  and ``runtimes/k8s/forward.py``).
- :mod:`.kernel`: ``RemoteKernel``, which starts, waits for, polls, signals and stops the
  kernel against them, and ``KernelState``.
- :mod:`.provisioner`, :mod:`.ssh_provisioner`: provisioner bases that hold one ``RemoteKernel``.

Nothing happens at import time.
"""
