"""Guest side: import ipykernel once, then fork a kernel for each request.

Copied into the VM and run there by the libvirt runtime (it is not imported on the host).
Under TCG, importing ipykernel takes a guest 10-15 s; a kernel forked from a process that has
already imported it starts in about a second, so a restart costs a fork instead of an import.

Protocol, in the directory given as the only argument (0700, the kernel's directory):

* ``fork-request`` (written atomically by the host): JSON ``{"argv": [...], "env": {...},
  "cwd": "...", "log": "..."}``. ``argv`` is ipykernel_launcher's command line.
* ``fork-reply``: the child's pid, written atomically once it runs.
* ``<log>.exit``: the child's exit status once it ends (128 + N for signal N), as the
  host's detached-process wrapper writes it, so the same process watch serves both.

The child leads its own session (signals to its group reach it alone), writes stdout and
stderr to ``log``, and reseeds ``random`` so kernels forked from one parent differ.
"""

import json
import os
import sys
import time

_POLL = 0.05


def _reap(children):
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        log = children.pop(pid, None)
        if log is None:
            continue
        code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _write(log + ".exit", "%d\n" % code)


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _child(request):
    os.setsid()
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if request.get("cwd"):
        os.chdir(request["cwd"])
    os.environ.update(request.get("env") or {})
    import random

    random.seed()
    sys.argv = list(request["argv"])
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


def main(directory):
    from ipykernel import kernelapp  # noqa: F401  the slow part, done once

    request_path = os.path.join(directory, "fork-request")
    reply_path = os.path.join(directory, "fork-reply")
    children = {}
    print("preloaded", flush=True)
    while True:
        _reap(children)
        if os.path.exists(request_path):
            with open(request_path) as f:
                request = json.load(f)
            os.unlink(request_path)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    _child(request)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            children[pid] = request["log"]
            _write(reply_path, "%d\n" % pid)
        time.sleep(_POLL)


if __name__ == "__main__":
    main(sys.argv[1])
