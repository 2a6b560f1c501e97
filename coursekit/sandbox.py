"""The walls around the student's kernel: ``python -m coursekit.sandbox PLAN.json -- ARGV``.

The grader starts the student's kernel through this launcher. Where Linux allows it
(as root, or through an unprivileged user namespace), the kernel runs in namespaces
of its own:

- a network namespace with no interface up: no connection leaves it (the kernel's
  Jupyter sockets are Unix sockets in its folder, which still work);
- a PID namespace whose first process is the kernel: the grader and every other
  process of the machine are invisible and cannot be signalled, and every process
  the submission starts (a background daemon, a fork bomb's children) dies with it;
- a mount namespace where the whole file system is read-only except the student's
  folder, and where the plan's private folders (the hidden suites, the results,
  other students' submissions and folders, the grader's home) are covered by empty
  file systems, keeping visible only what the kernel needs to run;
- a pids (and memory) control group, when the machine lets the grader make one,
  which bounds the number of processes even for root;
- no capabilities: nothing above can be undone from inside.

Then the plan's limits and user apply and the kernel is exec'd (or forked from the
batch's forge, coursekit.forge, which builds the same walls around the fork through
``launch``). Where namespaces
are refused (an unprivileged container, another OS), the launcher applies the
limits and user alone and says so in the status file it writes before exec: the
grader reads that file before any student code runs.

This module runs before the kernel exists, so it imports nothing heavy.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
_MOUNT_OPTIONS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                  "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
STATUS_FILE = ".sandbox.json"
ORPHAN_POLL_SECONDS = 0.2   # how soon a kernel whose grader died is killed

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(OSError):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


# -- namespaces ---------------------------------------------------------------------

def _enter_pid_namespace() -> str:
    """Unshare the PID namespace (the next child is its first process); return how:
    as root, or inside a user namespace where root is not to be had. The other
    namespaces are the child's alone, so that this process, outside, can still
    remove the control groups once the kernel is gone."""
    if os.geteuid() == 0 and _libc.unshare(CLONE_NEWPID) == 0:
        return "root"
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWUSER), "unshare")
    # Map the user to itself, so files keep their owners as the kernel sees them.
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)
    return "user namespace"


def _mounts() -> list[tuple[str, int]]:
    """Mount points and their per-mount flags, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 and friends
            flags = 0
            for option in fields[5].split(","):
                flags |= _MOUNT_OPTIONS.get(option, 0)
            found.append((point, flags))
    return found


def _make_read_only() -> None:
    for point, flags in _mounts():
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except SandboxError:
            pass  # a mount that cannot be remounted (already gone, or special) stays as it is


def _cover(folder: str, keep: list[str], writable: set[str]) -> None:
    """Put an empty read-only file system over `folder`, then bring back the
    paths of `keep` (each below `folder`) at their own places, writable where the
    plan says so."""
    handles = [(path, os.open(path, os.O_PATH)) for path in keep if os.path.exists(path)]
    _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path, fd in handles:
        relative = os.path.relpath(path, folder)
        target = os.path.join(folder, relative)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        os.close(fd)
        if path in writable:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    _mount(None, folder, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_file_system(plan: dict) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below leaks out to the machine
    _make_read_only()
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    writable = set(plan.get("writable", []))
    for folder, keep in plan.get("cover", []):
        if os.path.isdir(folder):
            _cover(folder, keep, writable)
    for path in writable:
        if not any(path in keep for _, keep in plan.get("cover", [])):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=256m,mode=1777")


def _drop_capabilities() -> None:
    """Empty the bounding set: after exec, even uid 0 has no capability left, so
    it cannot unmount a cover, remount, or leave the namespaces."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last = int(handle.read())
    for cap in range(last + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


# -- control groups -----------------------------------------------------------------

def _control_group(plan: dict) -> str | None:
    """A pids (and memory) group for this kernel, joined by this process so that
    every process started from here on counts against it. None where the machine's
    control groups cannot be written."""
    limits = {"pids": plan.get("max_processes"), "memory": plan.get("memory_bytes")}
    name = f"coursekit-{os.getpid()}"
    root = "/sys/fs/cgroup"
    groups: list[str] = []
    try:
        if os.path.exists(f"{root}/cgroup.controllers"):  # cgroup v2: one tree
            group = f"{root}/{name}"
            os.mkdir(group)
            groups.append(group)
            files = {"pids": "pids.max", "memory": "memory.max"}
            for kind, value in limits.items():
                if value:
                    _write(f"{group}/{files[kind]}", value)
            _write(f"{group}/cgroup.procs", os.getpid())
            return group
        for kind, file in (("pids", "pids.max"), ("memory", "memory.limit_in_bytes")):
            if limits[kind] and os.path.isdir(f"{root}/{kind}"):
                group = f"{root}/{kind}/{name}"
                os.mkdir(group)
                groups.append(group)
                _write(f"{group}/{file}", limits[kind])
                _write(f"{group}/cgroup.procs", os.getpid())
        return ",".join(groups) or None
    except OSError:
        remove_control_groups(",".join(groups))
        return None


def _write(path: str, value) -> None:
    with open(path, "w") as handle:
        handle.write(str(value))


def remove_control_groups(groups: str | None, wait: float = 0.0) -> None:
    """Called once the kernel's processes are dead. A group can go only once the last of
    them is reaped, which may take a moment after a kill: try for up to `wait` seconds."""
    paths = [g for g in (groups or "").split(",")
             if g.startswith("/sys/fs/cgroup/") and os.path.basename(g).startswith("coursekit-")]
    deadline = time.monotonic() + wait
    while True:
        for group in paths:
            try:
                os.rmdir(group)
            except OSError:
                pass
        paths = [g for g in paths if os.path.exists(g)]
        if not paths or time.monotonic() >= deadline:
            return
        time.sleep(0.02)   # a kernel just killed is usually reaped within milliseconds


# -- the launcher -------------------------------------------------------------------

def _apply_limits_and_user(plan: dict, control_group: str | None) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if plan.get("address_space_bytes"):
        limit = plan["address_space_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    user = plan.get("user")
    if user:
        if plan.get("max_processes") and not control_group:
            # Counted per user, so shared by every kernel graded at once: the control
            # group's per-kernel count is the fair bound, this the fallback.
            resource.setrlimit(resource.RLIMIT_NPROC, (plan["max_processes"],) * 2)
        for path in plan.get("give", []):  # the connection file, written by the grader
            if os.path.exists(path):
                os.chown(path, user["uid"], user["gid"])
        os.setgroups([])
        os.setgid(user["gid"])
        os.setuid(user["uid"])


def launch(plan: dict, argv: list[str], start=None, wanted=None, started=None) -> None:
    """Build the walls of `plan`, then run the kernel: exec `argv`, or call `start()` (a
    kernel forked from coursekit.forge, whose Python is already loaded). `wanted()` says
    whether the kernel is still wanted (default: while the grader that started this
    launcher lives); `started(pid, status)` hears the kernel's pid, `started(None, status)`
    that the namespaces were refused (the kernel would then be this very process)."""
    grader = os.getppid()
    wanted = wanted or (lambda: os.getppid() == grader)
    status = {"namespaces": False, "control_group": None}
    if plan.get("sandbox", True):
        status["control_group"] = _control_group(plan)
        try:
            how = _enter_pid_namespace()
        except (SandboxError, OSError) as exc:
            status["why"] = str(exc)
            if started:
                started(None, status)
        else:
            _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            child = os.fork()
            if child:
                if started:
                    started(child, status)
                _wait_as_parent(child, status["control_group"], wanted)
            # The kernel is the namespace's first process: when it dies, all it started dies.
            die_with_parent()
            try:
                _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
                status["namespaces"] = how
                _build_file_system(plan)
                status["file_system"] = "read-only, private folders covered"
            except (SandboxError, OSError) as exc:
                status["why" if not status["namespaces"] else "file_system"] = f"not isolated: {exc}"
    _write(os.path.join(plan["workdir"], STATUS_FILE), json.dumps(status))
    if status["namespaces"]:
        _drop_capabilities()
    _apply_limits_and_user(plan, status["control_group"])
    if start is not None:
        start()
    os.execv(argv[0], argv)


def die_with_parent() -> None:
    """SIGKILL for this process when the thread that started it ends."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _wait_as_parent(child: int, groups: str | None, wanted) -> None:
    """Stay outside the namespaces until the kernel exits, then leave and remove
    the control groups and exit as the kernel did. Interrupts reach the kernel
    directly (the grader signals the process group, or coursekit.forge's relay passes
    them on). If the grader dies first (killed, timed out, its terminal closed),
    `wanted()` turns false: then the kernel is killed, and with it everything in its
    namespace, so that no student process outlives the grader that started it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ended = _exit_notice(child)
    # SIGTERM (how coursekit.kernel ends a kernel) ends the kernel; the groups go right after.
    signal.signal(signal.SIGTERM, lambda *_: signal_kernel(child, ended, signal.SIGKILL))
    code = 1
    while True:
        try:
            done, status = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            break
        if done:
            code = os.waitstatus_to_exitcode(status) & 0xFF
            break
        if not wanted():
            signal_kernel(child, ended, signal.SIGKILL)
        # Woken by the kernel's exit where Linux says so (the grader waits for the groups to go).
        if ended is not None:
            select.select([ended], [], [], ORPHAN_POLL_SECONDS)
        else:
            time.sleep(ORPHAN_POLL_SECONDS)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the kernel is gone: what is left is the clean-up
    # The namespace's other processes, killed with the kernel, are this subreaper's to reap:
    # a control group holding their zombies could not be removed.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.05)
        except ChildProcessError:
            break
    leave_control_groups(groups)
    os._exit(code)


def signal_kernel(pid: int, pidfd: int | None, signum: int) -> None:
    """`signum` to the kernel `pid`, through its pidfd where there is one: never to a process
    that reused the number of a kernel already reaped. A kernel already gone is no error."""
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_notice(pid: int) -> int | None:
    """A file descriptor that turns readable when process `pid` exits (None before Linux 5.3)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def leave_control_groups(groups: str | None) -> None:
    """Move this process out of its kernel's control groups, and remove them."""
    for group in filter(None, (groups or "").split(",")):
        try:
            _write(os.path.join(os.path.dirname(group), "cgroup.procs"), os.getpid())
        except OSError:
            pass
    remove_control_groups(groups, wait=5.0)


def read_status(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, STATUS_FILE)) as handle:
            status = json.load(handle)
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def describe(status: dict) -> str:
    if not status.get("namespaces"):
        return f"no namespaces ({status.get('why', 'unknown')}): only limits and user apply"
    parts = [f"namespaces ({status['namespaces']}): no network, own process tree",
             f"file system {status.get('file_system', 'unknown')}"]
    parts.append("process and memory control group" if status.get("control_group")
                 else "no control group (process count bound per user only)")
    return "; ".join(parts)


if __name__ == "__main__":
    with open(sys.argv[1]) as plan_file:  # written by the grader, read before anything runs
        launch(json.load(plan_file), sys.argv[sys.argv.index("--") + 1:])
