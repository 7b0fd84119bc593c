"""Image builders: Debian root filesystems for Docker images and VM disks."""
