"""The gVisor runtime (kernel ``sandbox-gvisor``): a Docker container run by ``runsc``.

Everything of the Docker runtime is reused (container spec, shared directories, snapshots);
this folder adds what differs: the OCI runtime chosen per gVisor platform
(:mod:`.platforms`), the engine registration the set-up performs (:mod:`.engine_config`),
the provisioner (:mod:`.provisioner`) and its ``doctor`` check (:mod:`.doctor`).
"""
