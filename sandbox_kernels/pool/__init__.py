"""Warm pools: sandboxes made ready before anyone asks, shared by every process of a user.

A small host agent (``sandbox-kernels pool``; :mod:`.agent`) keeps, per kernelspec
configuration (:mod:`.recipe`), ``pool_size`` sandboxes with a kernel already running in each
(:mod:`.member`). A kernel start (:mod:`.claim`, from the provisioner's ``pre_launch``) asks
the agent over a unix socket in a 0700 directory (:mod:`.client`, :mod:`.protocol`); the agent
hands one member over, whole and once, and refills in the background (:mod:`.warm_pool`).
"""
