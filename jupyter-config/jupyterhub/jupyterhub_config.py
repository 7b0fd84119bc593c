# JupyterHub with sandbox kernels: each user's single-user server offers "Python (Docker)",
# "Python (NixOS VM)", ... and the snapshot panel. Tested by tests/test_jupyterhub.py, which runs
# a single-user server the way this file spawns one (as a non-root user, with this environment).
#
# Install once, for everyone (an environment the users can read):
#   python3 -m venv /opt/sandbox-kernels
#   /opt/sandbox-kernels/bin/pip install 'sandbox-kernels[all]' jupyterhub jupyterlab
#   /opt/sandbox-kernels/bin/sandbox-kernels install-kernelspecs --sys-prefix
# The wheel enables the server extension (etc/jupyter/jupyter_server_config.d) and ships the panel.
#
# Users need the groups of the runtimes they use: `docker` for Docker kernels (the engine's
# socket), `libvirt` for VM kernels (qemu:///system). Membership of `docker` is root-equivalent
# on the host: give it only where that is acceptable, or offer only VM kernels.
c = get_config()  # noqa: F821 (JupyterHub provides it)

c.JupyterHub.spawner_class = "jupyterhub.spawner.LocalProcessSpawner"
c.Spawner.cmd = ["/opt/sandbox-kernels/bin/jupyterhub-singleuser"]
c.Spawner.default_url = "/lab"

# The single-user server's environment is the admin's level of trust for sandbox-kernels:
# settings here may widen isolation; a kernelspec (which users can write themselves) may only
# narrow them. Keep the concurrency and quotas the machine can afford.
c.Spawner.environment = {
    "NIXOS_MAX_CONCURRENT_VMS": "2",
    "SANDBOX_DOCKER_MEMORY": "2g",
    "SANDBOX_KERNELS_SNAPSHOT_MAX_COUNT": "10",
    "SANDBOX_KERNELS_SNAPSHOT_MAX_BYTES": "5g",
}
