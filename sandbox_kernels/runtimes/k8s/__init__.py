"""Kubernetes plumbing for the ``k8s`` runtime: the API wrapper, pod manifests and forwards.

:mod:`.api` wraps the official ``kubernetes`` client in a small class with explicit methods
(errors mapped to the :class:`~sandbox_kernels.errors.SandboxError` tree at its boundary),
:mod:`.manifest` builds the pod as plain Python data, :mod:`.forward` carries local TCP
connections to the pod's ports over the API server's port-forward, and :mod:`.process` runs,
watches and signals the kernel process inside the pod through exec.
"""
