"""The shell scripts that run a kernel in a sandbox, shared by every :class:`~.shell.Shell`.

Each script is a constant: user-controlled values reach it only as positional parameters
(``"$1"``, ``"$@"``), never as shell syntax. Both shells (SSH exec and Kubernetes exec) run
these same texts with ``sh -c SCRIPT NAME ARGS...``. Environment names are checked against a
strict pattern; values reach the process byte for byte.

A detached process runs under a small wrapper that starts a new session (``setsid``), so it
survives the command channel dropping, and writes the process's exit status to
``<log_path>.exit`` when it ends. Over SSH, where every user of the host can read
``/proc/*/cmdline``, the environment travels on stdin (:data:`LAUNCH_ENV_STDIN`); in a pod,
whose argv only the pod can read and whose exec stream may not carry an end-of-file, as
``NAME=VALUE`` words (:data:`LAUNCH_ARGV`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from ..errors import SandboxConfigError

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The most bytes of an environment file (names and quoted values) sent to a detached process.
MAX_ENV_BYTES = 16 << 20

#: $1 cwd ('' = stay in the login directory), $2 log path, $3 the wrapper script, $4 the size
#: of the environment file on stdin, then the command. The log and the environment file are
#: created new (noclobber: a planted symlink fails the start instead of being followed), 0600;
#: the wrapper reads the environment file and removes it.
LAUNCH_ENV_STDIN = """\
command -v setsid >/dev/null || { echo "setsid (util-linux) is not installed" >&2; exit 125; }
if [ -n "$1" ]; then cd -- "$1" || exit 125; fi
log=$2
wrapper=$3
size=$4
shift 4
rm -f -- "$log" "$log.exit" "$log.env" || exit 125
(umask 077 && set -C && : >"$log" && head -c "$size" >"$log.env") || exit 125
[ "$(wc -c <"$log.env")" -eq "$size" ] || { rm -f -- "$log.env"; exit 125; }
setsid sh -c "$wrapper" sandbox-kernels-wrapper "$log.exit" "$log.env" "$@" </dev/null >>"$log" 2>&1 &
echo "$!"
"""

#: $1 exit-status file, $2 environment file (``export NAME='value'`` lines, every value quoted
#: by shlex.quote: no expansion), then the command. Traps (not ignores) stop the wrapper dying
#: of a signal meant for the process group; the child gets default handlers back, so an
#: interrupt reaches it as usual.
WRAPPER_ENV_FILE = """\
exitfile=$1
envfile=$2
shift 2
vars=$(cat -- "$envfile") || exit 125
rm -f -- "$envfile"
eval "$vars" || exit 125
unset vars
trap : HUP INT QUIT TERM
"$@"
rc=$?
echo "$rc" >"$exitfile"
exit "$rc"
"""

#: The argv-only launch (NAME=VALUE words in argv), for shells whose argv only the sandbox
#: itself can read (a pod's exec). Positional parameters as for LAUNCH_ENV_STDIN, without $4.
LAUNCH_ARGV = """\
command -v setsid >/dev/null || { echo "setsid (util-linux) is not installed" >&2; exit 125; }
if [ -n "$1" ]; then cd -- "$1" || exit 125; fi
log=$2
wrapper=$3
shift 3
rm -f -- "$log" "$log.exit" || exit 125
(umask 077 && : >"$log") || exit 125
setsid sh -c "$wrapper" sandbox-kernels-wrapper "$log.exit" "$@" </dev/null >>"$log" 2>&1 &
echo "$!"
"""

#: $1 exit-status file, $2 number of NAME=VALUE words, the words, argv (see LAUNCH_ARGV).
WRAPPER_ARGV = """\
exitfile=$1
n=$2
shift 2
while [ "$n" -gt 0 ]; do export "$1" || exit 125; shift; n=$((n - 1)); done
trap : HUP INT QUIT TERM
"$@"
rc=$?
echo "$rc" >"$exitfile"
exit "$rc"
"""

# Defines alive PID: true if the process exists and is not a zombie (a zombie still takes
# signals, but has ended).
_ALIVE = """\
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [ "$(sed -n 's/^.*) \\(.\\).*$/\\1/p' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
"""

#: $1 pid, $2 exit-status file. Prints ``running``, ``exited N`` or ``gone``.
STATUS = _ALIVE + """\
if alive "$1"; then echo running; exit 0; fi
if [ -f "$2" ]; then echo "exited $(head -c 16 -- "$2")"; else echo gone; fi
"""

#: $1 signal name, $2 pid: the process group first (the wrapper made one), then the process.
#: Exit status 3: no such (live) process; its group is signalled all the same, so a dead
#: kernel's leftover children (what a fork bomb left) go too.
SIGNAL = _ALIVE + """\
if ! alive "$2"; then kill -s "$1" -- "-$2" 2>/dev/null; exit 3; fi
kill -s "$1" -- "-$2" 2>/dev/null || kill -s "$1" "$2"
"""

#: $1 pid, $2 exit-status file: runs while the process runs, then reports how it ended
#: (``exited N`` or ``gone``). Costs nothing to poll: the remote shell waits.
WATCH = r"""
pid=$1 exitfile=$2
while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
for _ in 1 2 3 4; do
    if [ -s "$exitfile" ]; then echo "exited $(head -c 16 -- "$exitfile")"; exit 0; fi
    sleep 0.25
done
echo gone
"""

#: $1 connection file, $2 kernel pid, $3 most bytes: wait (in the remote shell, no round trip
#: per check) until the kernel has written its real ports and print the file; exit 3 if the
#: kernel died first.
WAIT_PORTS = r"""
file=$1 pid=$2 max=$3
while kill -0 "$pid" 2>/dev/null; do
    if grep -q '"hb_port"' "$file" 2>/dev/null && ! grep -q '_port": 0' "$file"; then
        head -c "$max" -- "$file"; exit 0
    fi
    sleep 0.1
done
exit 3
"""

#: $1 kernel directory, $2 preloader pid, $3 kernel log. One round trip starts a preloaded
#: kernel: the connection file and the fork request arrive as two base64 lines on stdin (the
#: key and the environment never appear in a command line), the preloader's reply (the
#: child's pid) is printed. Exit 3 if the preloader is gone, 4 if the files cannot be written.
FORK = r"""
dir=$1 pid=$2 log=$3
umask 077
mkdir -p "$dir" && chmod 700 "$dir" || exit 4
read -r connection && read -r request || exit 4
# What the old kernel left here may be links or directories: remove them, create the new
# files exclusively (noclobber), and rename them into place, so nothing planted is followed.
rm -rf "$log" "$log.exit" "$dir/fork-reply" "$dir/fork-request.tmp" "$dir/connection.json" \
    "$dir/connection.json.new" || exit 4
set -C
printf '%s' "$connection" | base64 -d > "$dir/connection.json.new" || exit 4
mv -f "$dir/connection.json.new" "$dir/connection.json" || exit 4
kill -0 "$pid" 2>/dev/null || exit 3
printf '%s' "$request" | base64 -d > "$dir/fork-request.tmp" || exit 4
mv -f "$dir/fork-request.tmp" "$dir/fork-request" || exit 4
while kill -0 "$pid" 2>/dev/null; do
    if [ -s "$dir/fork-reply" ]; then head -c 32 "$dir/fork-reply"; rm -f "$dir/fork-reply"; exit 0; fi
    sleep 0.05
done
rm -f "$dir/fork-request"
exit 3
"""

#: $1 target path, $2 octal mode; the bytes on stdin, up to its end. Written to a 0600
#: temporary file next to the target, then renamed: no reader sees a partial file or wider rights.
WRITE = """\
tmp=$(mktemp "$1.XXXXXX") || exit 1
cat >"$tmp" && chmod "$2" "$tmp" && mv -f -- "$tmp" "$1" && exit 0
rc=$?
rm -f -- "$tmp"
exit "$rc"
"""

#: As WRITE, with $3 the byte count: exactly that many bytes are read (an exec stream may not
#: carry an end-of-file).
WRITE_SIZED = """\
umask 077
tmp=$(mktemp "$1.XXXXXX") || exit 1
head -c "$3" >"$tmp" && [ "$(wc -c <"$tmp")" -eq "$3" ] && chmod "$2" "$tmp" && mv -f -- "$tmp" "$1" && exit 0
rc=$?
rm -f -- "$tmp"
exit "$rc"
"""

#: $1 lines, $2 path, $3 most bytes: the end of a file the sandbox writes (maybe one endless line).
TAIL = 'tail -n "$1" -- "$2" | tail -c "$3"'


def env_file(env: Mapping[str, str]) -> bytes:
    """``env`` as ``export NAME='value'`` lines for a POSIX shell, every value quoted by
    ``shlex.quote`` (so no ``$``, backtick or ``;`` is ever evaluated).

    Raises:
        SandboxConfigError: a name does not match the pattern, a value is not a string or
            holds NUL, or the whole is larger than ``MAX_ENV_BYTES``.
    """
    data = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in checked_env(env))
    encoded = data.encode("utf-8", errors="surrogateescape")
    if len(encoded) > MAX_ENV_BYTES:
        raise SandboxConfigError(
            f"the kernel's environment is {len(encoded)} bytes; at most {MAX_ENV_BYTES} are sent")
    return encoded


def env_words(env: Mapping[str, str]) -> list[str]:
    """``env`` as ``NAME=VALUE`` words, after checking every name and value.

    Only for launchers whose argv nobody but the sandbox can read (see :data:`LAUNCH_ARGV`).

    Raises:
        SandboxConfigError: a name does not match the pattern or a value is not a string.
    """
    return [f"{name}={value}" for name, value in checked_env(env)]


def checked_env(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """The items of ``env`` after checking every name and value.

    Raises:
        SandboxConfigError: a name does not match the pattern or a value is not a string.
    """
    items = []
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise SandboxConfigError(
                f"environment variable name {name!r} is invalid: use letters, digits and '_', "
                "not starting with a digit."
            )
        if not isinstance(value, str) or "\0" in value:
            raise SandboxConfigError(f"environment variable {name} must be a string without NUL")
        items.append((name, value))
    return items
