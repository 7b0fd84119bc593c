"""Files that run inside sandboxes (the kernel preloader, the VM guest's init and sshd
configuration): copied into images or guests, never imported by the host."""
