"""A FUSE filesystem that loses what was not fsynced when the power is cut (issue #18).

`python -m bench.powerfs BACKING MOUNT --control SOCKET` serves BACKING's tree at MOUNT. The
tree lives in this process's memory (the "page cache"); BACKING is the medium and holds only what
was made durable. The model, which is what POSIX promises and SQLite relies on:

- file data and size (write, truncate) reach BACKING at fsync/fdatasync of that file (any handle);
- names (create, mkdir, unlink, rmdir, rename) reach BACKING at fsync of their directory; a name
  made durable before its file's data was fsynced appears with the data last fsynced (empty if
  never), data fsynced under a name that is not durable yet is kept until the directory is synced
  and lost with a cut before;
- close, flush and the kernel's writeback make nothing durable; modes, owners and times are not
  modelled (chmod applies to BACKING at once, times are the process's);
- no hard or symbolic links, no extended attributes; unlinked open files stay readable until
  released (`hard_remove`); POSIX locks are the kernel's (the mount is local to this machine).

What SQLite in WAL mode with synchronous=FULL needs from this, and gets: a commit appends its
frames to the `-wal` and fsyncs it before it returns, so the commit is durable exactly when it is
acknowledged; recovery reads frames while their salts and cumulative checksums hold and stops at
the first bad one, so a missing or torn tail (or a lone later frame without the ones before) ends
the log there. A checkpoint fsyncs the WAL, copies pages into the database, fsyncs the database,
and only then may the WAL be reset (new salts in its header), so a cut mid-checkpoint replays the
same frames again. The `-shm` index is never fsynced and is rebuilt from the WAL. The `-wal`'s
name becomes durable by a directory fsync SQLite does at the first sync of every connection that
opened it with O_CREAT (so, in practice, at each connection's first commit); a WAL whose deletion
(at the last close) was not synced comes back with frames already checkpointed, harmless.

Control (one JSON line per request on the unix socket):
- `{"op": "cut", "torn": false}`: the power is gone. Every later operation fails with EIO and
  nothing reaches BACKING again; the caller then kills the filesystem's users and unmounts.
  With `"torn": true` and a `"seed"`, the last unsynced write of the mount (if its file has a
  durable name and is not rewritten whole, as the never-synced `-shm` is) reaches the medium
  alone, without the unsynced writes before it, and torn: a prefix of it ending at a random
  512-byte sector boundary inside it, or all of it. The reply counts what was dropped.
- `{"op": "arm", "writes": N, "torn": ..., "seed": ...}`: the same cut, inside the N-th write from
  now (the `-shm` index's writebacks not counted): mid-commit or mid-checkpoint, where a cut at a
  random moment rarely falls. That write fails with EIO and is the last unsynced write.
  `{"op": "wait_cut", "timeout": S}` answers once the power is cut (`"cut": false` after S s).
- `{"op": "sync"}`: `sync(2)`: every file and directory made durable.
- `{"op": "stats"}`: operation counters.

`PowerFs` (below) starts and stops the daemon; `mount()` returns once the kernel serves MOUNT.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTOR = 512
TMP_PREFIX = ".powerfs-tmp-"  # BACKING's own temporary files (never visible at the mount)


@dataclass
class Node:
    """A file or directory in memory. `pending` is what the file's data went through since its
    last fsync, in order: ("w", offset, bytes), ("t", size) or ("all",) (rewrite it whole)."""

    ino: int
    is_dir: bool
    mode: int
    data: bytearray = field(default_factory=bytearray)
    pending: list[tuple[Any, ...]] = field(default_factory=list)
    pending_bytes: int = 0
    entries: dict[str, int] = field(default_factory=dict)  # directories: names now
    durable_entries: dict[str, int] = field(default_factory=dict)  # directories: names on the medium
    orphan: bytes | None = None  # data fsynced while no durable name led to the file
    opens: int = 0
    times: float = field(default_factory=time.time)


def _err(code: int) -> Exception:
    from fuse import FuseOSError

    return FuseOSError(code)  # type: ignore[no-any-return]


class PowerFsOps:
    """The filesystem operations (fusepy `Operations` protocol). One lock serialises them."""

    use_ns = True

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self._mutex = threading.RLock()
        self.nodes: dict[int, Node] = {}
        self._next = 1
        self.dead = False
        self.armed: tuple[int, bool, int] | None = None  # (writes left, torn, seed): cut inside a write
        self.cut_info: dict[str, Any] | None = None
        self.cut_done = threading.Event()
        self.last_write: tuple[int, tuple[Any, ...]] | None = None  # (ino, op) of the latest unsynced write
        self.counters: dict[str, int] = {"writes": 0, "fsyncs": 0, "dir_fsyncs": 0, "bytes_made_durable": 0}
        self.root = self._load(backing)

    # --- the medium -------------------------------------------------------------------------

    def _new(self, is_dir: bool, mode: int) -> Node:
        n = Node(self._next, is_dir, mode)
        self._next += 1
        self.nodes[n.ino] = n
        return n

    def _load(self, path: Path) -> int:
        """Read BACKING into memory: everything on the medium is durable."""
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            n = self._new(True, st.st_mode)
            for child in sorted(path.iterdir()):
                if child.name.startswith(TMP_PREFIX):
                    child.unlink()  # a temporary file of a sync the last cut interrupted
                    continue
                ino = self._load(child)
                n.entries[child.name] = n.durable_entries[child.name] = ino
        else:
            n = self._new(False, st.st_mode)
            n.data = bytearray(path.read_bytes())
        n.times = st.st_mtime
        return n.ino

    def _durable_paths(self, ino: int) -> list[Path]:
        """Where the medium holds `ino` (names durable all the way from the root)."""
        out: list[Path] = []
        stack = [(self.root, self.backing)]
        while stack:
            d, p = stack.pop()
            for name, child in self.nodes[d].durable_entries.items():
                if child == ino:
                    out.append(p / name)
                if self.nodes[child].is_dir:
                    stack.append((child, p / name))
        return out

    def _durable_data(self, n: Node) -> bytes:
        """What the medium would show for file `n` under a new durable name: the data fsynced
        while no durable name led to it, else what a durable name holds, else nothing."""
        if n.orphan is not None:
            return n.orphan
        for p in self._durable_paths(n.ino):
            if p.exists():  # not yet when a directory of new names is being written out
                return p.read_bytes()
        return b""

    def _materialise(self, path: Path, n: Node) -> None:
        if n.is_dir:
            if path.exists() and not path.is_dir():
                path.unlink()
            path.mkdir(exist_ok=True)
            for name, ino in n.durable_entries.items():
                self._materialise(path / name, self.nodes[ino])
            return
        tmp = path.parent / f"{TMP_PREFIX}{n.ino}"
        tmp.write_bytes(self._durable_data(n))
        os.chmod(tmp, stat.S_IMODE(n.mode))
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        n.orphan = None

    def _sync_file(self, n: Node) -> None:
        if n.is_dir or not n.pending:
            return
        paths = self._durable_paths(n.ino)
        if not paths:
            n.orphan = bytes(n.data)
        for p in paths:
            fd = os.open(p, os.O_WRONLY)
            try:
                if n.pending[0][0] == "all":
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, n.data, 0)
                else:
                    for op in n.pending:
                        if op[0] == "w":
                            os.pwrite(fd, op[2], op[1])
                        else:
                            os.ftruncate(fd, op[1])
            finally:
                os.close(fd)
        self.counters["bytes_made_durable"] += n.pending_bytes
        n.pending.clear()
        n.pending_bytes = 0

    def _sync_dir(self, d: Node) -> None:
        old, new = d.durable_entries, dict(d.entries)
        changed = {name: ino for name, ino in new.items() if old.get(name) != ino}
        # read what the medium holds for each newly named file while its old names still lead there
        contents = {ino: self._durable_data(self.nodes[ino]) for ino in changed.values() if not self.nodes[ino].is_dir}
        bases = [self.backing] if d.ino == self.root else self._durable_paths(d.ino)
        d.durable_entries = new
        for base in bases:  # none while the directory itself has no durable name
            for name, ino in changed.items():
                if ino in contents:
                    tmp = base / f"{TMP_PREFIX}{ino}"
                    tmp.write_bytes(contents[ino])
                    os.chmod(tmp, stat.S_IMODE(self.nodes[ino].mode))
                    if (base / name).is_dir():
                        shutil.rmtree(base / name)
                    os.replace(tmp, base / name)
                else:
                    self._materialise(base / name, self.nodes[ino])
            for name in old:
                if name not in new:
                    target = base / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            target.unlink()
        if bases:
            for ino in contents:
                self.nodes[ino].orphan = None
        self._collect()

    def _collect(self) -> None:
        """Forget nodes no name (now or durable) and no handle leads to."""
        reachable: set[int] = set()
        stack = [self.root]
        while stack:
            ino = stack.pop()
            if ino in reachable:
                continue
            reachable.add(ino)
            n = self.nodes[ino]
            stack += list(n.entries.values()) + list(n.durable_entries.values())
        for ino in [i for i, n in self.nodes.items() if i not in reachable and n.opens == 0]:
            del self.nodes[ino]

    def sync_all(self) -> None:
        with self._mutex:
            for n in list(self.nodes.values()):
                self._sync_file(n)
            stack = [self.root]
            while stack:  # parents before children: a new directory exists before its entries
                d = self.nodes[stack.pop()]
                self._sync_dir(d)
                stack += [i for i in d.entries.values() if self.nodes[i].is_dir]

    def cut(self, torn: bool, seed: int) -> dict[str, Any]:
        """The power is gone: nothing reaches the medium any more (but a torn last write)."""
        with self._mutex:
            self.dead = True
            dropped = sum(len(n.pending) for n in self.nodes.values())
            dropped_bytes = sum(n.pending_bytes for n in self.nodes.values())
            names = sum(1 for n in self.nodes.values() if n.is_dir and n.entries != n.durable_entries)
            torn_bytes = 0
            if torn and self.last_write is not None:
                ino, op = self.last_write
                n = self.nodes.get(ino)
                if n is not None and any(o is op for o in n.pending):
                    _w, off, data = op
                    # the medium writes whole sectors: the write stops at a sector boundary inside
                    # it, or it landed whole (a write within one sector is atomic)
                    ends = [*range((off // SECTOR + 1) * SECTOR, off + len(data), SECTOR), off + len(data)]
                    end = random.Random(seed).choice(ends)
                    torn_bytes = end - off
                    for p in self._durable_paths(ino) if torn_bytes else []:
                        fd = os.open(p, os.O_WRONLY)
                        try:
                            os.pwrite(fd, data[:torn_bytes], off)
                        finally:
                            os.close(fd)
            self.cut_info = {"dropped_writes": dropped, "dropped_bytes": dropped_bytes,
                             "dirs_with_unsynced_names": names, "torn_bytes": torn_bytes}
            self.cut_done.set()
            return self.cut_info

    # --- helpers of the operations ----------------------------------------------------------

    def _check(self) -> None:
        if self.dead:
            raise _err(errno.EIO)

    def _lookup(self, path: str) -> Node:
        n = self.nodes[self.root]
        for part in [p for p in path.split("/") if p]:
            if not n.is_dir or part not in n.entries:
                raise _err(errno.ENOENT)
            n = self.nodes[n.entries[part]]
        return n

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        d = self._lookup(head or "/")
        if not d.is_dir:
            raise _err(errno.ENOTDIR)
        return d, name

    def _node(self, path: str | None, fh: int | None) -> Node:
        if fh:
            n = self.nodes.get(fh)
            if n is not None:
                return n
        if path is None:
            raise _err(errno.EBADF)
        return self._lookup(path)

    def _record(self, n: Node, op: tuple[Any, ...], size: int) -> None:
        if n.pending and n.pending[0][0] == "all":
            if op[0] == "w":
                self.last_write = None  # a file rewritten whole at its fsync: no single write to tear
            return
        n.pending.append(op)
        n.pending_bytes += size
        if n.pending_bytes > 2 * len(n.data) + 65536:  # bound the log of a file never fsynced (-shm)
            n.pending, n.pending_bytes = [("all",)], len(n.data)
            self.last_write = None
        elif op[0] == "w":
            self.last_write = (n.ino, op)

    # --- fusepy operations ------------------------------------------------------------------

    def __call__(self, op: str, *args: Any) -> Any:
        if not hasattr(self, op):
            raise _err(errno.EFAULT)
        with self._mutex:
            if op not in ("init", "destroy", "flush", "release", "releasedir"):  # closing touches no medium
                self._check()
            return getattr(self, op)(*args)

    def init(self, path: str) -> None:
        pass

    def destroy(self, path: str) -> None:
        pass

    def access(self, path: str, amode: int) -> int:
        self._lookup(path)
        return 0

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        n = self._node(path, fh)
        ns = int(n.times * 1e9)
        return {"st_mode": n.mode, "st_nlink": 2 if n.is_dir else 1, "st_size": 4096 if n.is_dir else len(n.data),
                "st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": ns, "st_mtime": ns, "st_ctime": ns,
                "st_blocks": (len(n.data) + 511) // 512}

    def statfs(self, path: str) -> dict[str, Any]:
        sv = os.statvfs(self.backing)
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                            "f_files", "f_flag", "f_frsize", "f_namemax")}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self._lookup(path).entries]

    def opendir(self, path: str) -> int:
        return self._lookup(path).ino

    def releasedir(self, path: str | None, fh: int) -> int:
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self.counters["dir_fsyncs"] += 1
        self._sync_dir(self._node(path, fh))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        d, name = self._parent(path)
        if name in d.entries:
            raise _err(errno.EEXIST)
        d.entries[name] = self._new(True, stat.S_IFDIR | stat.S_IMODE(mode)).ino
        return 0

    def rmdir(self, path: str) -> int:
        d, name = self._parent(path)
        n = self._lookup(path)
        if not n.is_dir:
            raise _err(errno.ENOTDIR)
        if n.entries:
            raise _err(errno.ENOTEMPTY)
        del d.entries[name]
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        d, name = self._parent(path)
        if name in d.entries:
            n = self.nodes[d.entries[name]]
        else:
            n = self._new(False, stat.S_IFREG | stat.S_IMODE(mode))
            d.entries[name] = n.ino
        n.opens += 1
        return n.ino

    def open(self, path: str, flags: int) -> int:
        n = self._lookup(path)
        n.opens += 1
        return n.ino

    def release(self, path: str | None, fh: int) -> int:
        n = self.nodes.get(fh)
        if n is not None:
            n.opens -= 1
            if n.opens == 0:
                self._collect()
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0  # close() makes nothing durable

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return bytes(self._node(path, fh).data[offset:offset + size])

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        n = self._node(path, fh)
        end = offset + len(data)
        if len(n.data) < offset:
            n.data.extend(bytes(offset - len(n.data)))
        n.data[offset:end] = data
        n.times = time.time()
        self.counters["writes"] += 1
        self._record(n, ("w", offset, bytes(data)), len(data))
        if self.armed is not None and not (path or "").endswith("-shm"):
            left, torn, seed = self.armed
            self.armed = (left - 1, torn, seed) if left > 1 else None
            if left <= 1:  # the power fails as this write reaches the disk
                self.cut(torn, seed)
                raise _err(errno.EIO)
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        n = self._node(path, fh)
        if length < len(n.data):
            del n.data[length:]
        else:
            n.data.extend(bytes(length - len(n.data)))
        n.times = time.time()
        self._record(n, ("t", length), 8)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.counters["fsyncs"] += 1
        self._sync_file(self._node(path, fh))
        return 0

    def unlink(self, path: str) -> int:
        d, name = self._parent(path)
        n = self._lookup(path)
        if n.is_dir:
            raise _err(errno.EISDIR)
        del d.entries[name]
        self._collect()
        return 0

    def rename(self, old: str, new: str) -> int:
        od, oname = self._parent(old)
        nd, nname = self._parent(new)
        n = self._lookup(old)
        if nname in nd.entries:
            target = self.nodes[nd.entries[nname]]
            if target.is_dir and target.entries:
                raise _err(errno.ENOTEMPTY)
        del od.entries[oname]
        nd.entries[nname] = n.ino
        self._collect()
        return 0

    def chmod(self, path: str, mode: int) -> int:
        n = self._lookup(path)
        n.mode = (n.mode & ~0o7777) | stat.S_IMODE(mode)
        for p in self._durable_paths(n.ino):
            os.chmod(p, stat.S_IMODE(mode))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._lookup(path).times = times[1] / 1e9 if times else time.time()
        return 0

    # --- control ----------------------------------------------------------------------------

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        if req["op"] == "cut":
            return self.cut(bool(req.get("torn")), int(req.get("seed", 0)))
        if req["op"] == "arm":
            with self._mutex:
                self.armed = (max(1, int(req["writes"])), bool(req.get("torn")), int(req.get("seed", 0)))
            return {"ok": True}
        if req["op"] == "wait_cut":
            if not self.cut_done.wait(float(req["timeout"])):
                return {"cut": False}
            return {"cut": True, **(self.cut_info or {})}
        if req["op"] == "sync":
            if self.dead:
                return {"error": "the power is cut"}
            self.sync_all()
            return {"ok": True}
        if req["op"] == "stats":
            with self._mutex:
                return dict(self.counters)
        return {"error": f"unknown op {req['op']!r}"}


def _serve_control(ops: PowerFsOps, sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = ops.control(json.loads(line))
                except Exception as exc:  # a bad request must not stop the control thread
                    reply = {"error": repr(exc)}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()


class _Ready:
    """Wraps the operations to tell the parent (a line on stdout) once the kernel serves the mount."""

    def __init__(self, ops: PowerFsOps) -> None:
        self.ops = ops
        self.use_ns = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ops, name)

    def __call__(self, op: str, *args: Any) -> Any:
        if op == "init":
            print("mounted", flush=True)
            return None
        return self.ops(op, *args)


def main(argv: list[str] | None = None) -> int:
    from fuse import FUSE

    ap = argparse.ArgumentParser(prog="python -m bench.powerfs", description=__doc__.split("\n")[0])
    ap.add_argument("backing", type=Path)
    ap.add_argument("mount", type=Path)
    ap.add_argument("--control", type=Path, required=True, help="unix socket for cut/sync/stats")
    args = ap.parse_args(argv)
    ops = PowerFsOps(args.backing.resolve())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        args.control.unlink()
    sock.bind(str(args.control))
    sock.listen(4)
    threading.Thread(target=_serve_control, args=(ops, sock), name="powerfs-control", daemon=True).start()
    # hard_remove: an unlinked open file is not renamed to .fuse_hidden* (SQLite unlinks its WAL
    # while open); big_writes: SQLite's page writes arrive whole, not cut into 4 KiB requests.
    FUSE(_Ready(ops), str(args.mount), foreground=True, nothreads=False, hard_remove=True, big_writes=True,
         fsname="powerfs")
    return 0


# --- the parent's side -----------------------------------------------------------------------


def fuse_available() -> str | None:
    """None when this machine has FUSE, else why not (a test's skip reason). Root and Debian's
    libfuse2 (./dev installs it) are required, not checked: without them a mount fails loudly."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent (no FUSE in this kernel or container)"
    return None


class PowerFs:
    """A PowerFs daemon serving `backing` at `mount`; `cut()` then `unmount()` is a power cut,
    `mount()` again the power coming back. Always `unmount()` (also on failure)."""

    def __init__(self, backing: Path, mount: Path, control: Path, log: Path) -> None:
        self.backing, self.mountpoint, self.control_path, self.log = backing, mount, control, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounts = 0

    def mount(self, timeout: float = 30.0) -> None:
        from bench.common import readline, tail

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mounts += 1
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.powerfs", str(self.backing), str(self.mountpoint),
                 "--control", str(self.control_path)],
                stdout=subprocess.PIPE, stderr=err, cwd=Path(__file__).resolve().parent.parent)
        try:
            line = readline(self.proc, timeout)
        except TimeoutError:
            line = "(no answer)"
        if line.strip() != "mounted":
            self.unmount()
            hint = "" if os.geteuid() == 0 else " (mounting needs root here)"
            raise RuntimeError(f"powerfs did not mount {self.mountpoint}{hint}: {line.strip()!r}\n{tail(self.log)}")

    def request(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.control_path))
            s.sendall(json.dumps(req).encode() + b"\n")
            with s.makefile("rb") as f:
                reply: dict[str, Any] = json.loads(f.readline())
        if "error" in reply:
            raise RuntimeError(f"powerfs {req}: {reply['error']}")
        return reply

    def cut(self, torn: bool = False, seed: int = 0) -> dict[str, Any]:
        return self.request({"op": "cut", "torn": torn, "seed": seed})

    def arm(self, writes: int, torn: bool = False, seed: int = 0) -> None:
        self.request({"op": "arm", "writes": writes, "torn": torn, "seed": seed})

    def wait_cut(self, timeout: float) -> dict[str, Any] | None:
        """The cut's account once an armed cut happened; None if it did not within `timeout`."""
        reply = self.request({"op": "wait_cut", "timeout": timeout}, timeout=timeout + 10)
        return reply if reply.pop("cut") else None

    def sync(self) -> None:
        self.request({"op": "sync"})

    def stats(self) -> dict[str, Any]:
        return self.request({"op": "stats"})

    def unmount(self, timeout: float = 15.0) -> None:
        """Unmount (lazily if still busy) and reap the daemon; SIGKILL it if it does not exit."""
        proc, self.proc = self.proc, None
        if self.mounted() and subprocess.run(["umount", str(self.mountpoint)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)  # still busy
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if self.mounted():  # the daemon died without unmounting
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if proc.stdout is not None:
            proc.stdout.close()

    def mounted(self) -> bool:
        """Whether the kernel lists our mount point (a dead daemon's mount included)."""
        target = os.path.realpath(self.mountpoint)
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target for line in f)


if __name__ == "__main__":
    sys.exit(main())
