"""The OCI bundle containerd hands over: ``config.json`` to hyperd's container parameters, and
the rootfs mounts onto ``<bundle>/rootfs``.

containerd 1.6 passes the image's snapshot as a list of mounts (one overlay, or a bind for a
snapshot without parent) with an empty target; the shim mounts them on ``<bundle>/rootfs`` and
gives that directory to hyperd as the container's rootfs, which hyperd bind-mounts into the pod's
shared dir (``<shared_root>/<pod>/<container>/rootfs``) at ``container.start``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

SANDBOX_ID_ANNOTATION: Final = "io.kubernetes.cri.sandbox-id"
GROUP_ANNOTATION: Final = "io.containerd.hyperd.v2.group"  # like runc's io.containerd.runc.v2.group
MAX_CONFIG: Final = 8 << 20  # bytes of config.json we read; real ones are a few KiB

MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_NOATIME: Final = 0x400
MS_NODIRATIME: Final = 0x800
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MNT_DETACH: Final = 0x2

_FLAGS: Final = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "suid": 0,
    "nodev": MS_NODEV,
    "dev": 0,
    "noexec": MS_NOEXEC,
    "exec": 0,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
    "defaults": 0,
}


class BundleError(Exception):
    """The bundle cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class RootMount:
    """One entry of ``CreateTaskRequest.rootfs``."""

    type: str
    source: str
    options: tuple[str, ...]


def read_config(bundle: str) -> dict[str, Any]:
    """``<bundle>/config.json`` as a dict; raises :class:`BundleError`."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise BundleError(f"{path} is larger than {MAX_CONFIG} bytes")
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{path} is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise BundleError(f"{path} is not a JSON object")
    return spec


def group_key(spec: dict[str, Any], container_id: str) -> str:
    """The pod a container belongs to: its CRI sandbox id, our group annotation, or itself."""
    annotations = spec.get("annotations") or {}
    if isinstance(annotations, dict):
        for key in (SANDBOX_ID_ANNOTATION, GROUP_ANNOTATION):
            value = annotations.get(key)
            if isinstance(value, str) and value:
                return value
    return container_id


def pod_id(namespace: str, key: str) -> str:
    """hyperd's pod id for a containerd namespace and grouping key (ids repeat across
    namespaces)."""
    return f"{namespace}.{key}"


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BundleError(f"config.json: {what} must be a list of strings")
    return value


def process_params(process: Any) -> dict[str, Any]:
    """hyperd's ``process`` parameter from an OCI ``process`` object."""
    if not isinstance(process, dict):
        raise BundleError("config.json: process is missing")
    args = _strings(process.get("args"), "process.args")
    if not args:
        raise BundleError("config.json: process.args is empty")
    params: dict[str, Any] = {
        "args": args,
        "env": [e for e in _strings(process.get("env"), "process.env") if "=" in e],
        "cwd": process.get("cwd") or "/",
        "terminal": bool(process.get("terminal", False)),
        "no_new_privileges": bool(process.get("noNewPrivileges", False)),
    }
    user = process.get("user") or {}
    if isinstance(user, dict):
        if user.get("username"):
            params["user"] = str(user["username"])
        elif user.get("uid") is not None:
            params["user"] = str(user["uid"])
        if user.get("gid") is not None:
            params["group"] = str(user["gid"])
        extra = user.get("additionalGids") or []
        if isinstance(extra, list):
            params["additional_groups"] = [str(g) for g in extra if g != user.get("gid")]
    return params


def mount_params(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The bind mounts of ``spec`` (host directories and files such as CRI's /etc/hosts).
    proc, sysfs, tmpfs, devpts and the like are the guest's own and are not passed."""
    out = []
    for m in spec.get("mounts") or []:
        if not isinstance(m, dict):
            continue
        options = [o for o in m.get("options") or [] if isinstance(o, str)]
        if m.get("type") != "bind" and "bind" not in options and "rbind" not in options:
            continue
        source, dest = m.get("source"), m.get("destination")
        if not isinstance(source, str) or not isinstance(dest, str):
            continue
        out.append(
            {
                "source": source,
                "destination": dest,
                "type": "bind",
                "options": ["ro"] if "ro" in options else [],
            }
        )
    return out


def readonly_root(spec: dict[str, Any]) -> bool:
    root = spec.get("root") or {}
    return bool(isinstance(root, dict) and root.get("readonly"))


def netns_path(spec: dict[str, Any]) -> str | None:
    """The network namespace path of ``linux.namespaces`` (CRI's sandbox netns), if any."""
    linux = spec.get("linux") or {}
    for ns in (linux.get("namespaces") or []) if isinstance(linux, dict) else []:
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            path = ns["path"]
            return path if isinstance(path, str) and not path.startswith("/proc/") else None
    return None


# ---- rootfs mounts --------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    libc = _libc()
    rc = libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise BundleError(f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def split_options(options: Sequence[str]) -> tuple[int, str]:
    """Mount flags and the filesystem data string of ``options``."""
    flags, data = 0, []
    for opt in options:
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount_rootfs(mounts: Sequence[RootMount], target: str, *, readonly: bool = False) -> bool:
    """Mount ``mounts`` on ``target`` in order; whether anything was mounted. An empty list
    means the rootfs is already there. On failure, what was mounted is undone."""
    done = 0
    try:
        for m in mounts:
            flags, data = split_options(m.options)
            if m.type == "bind" or flags & MS_BIND:
                _mount(m.source, target, "", flags & ~MS_RDONLY | MS_BIND, "")
                done += 1
                if flags & MS_RDONLY:
                    _mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY, "")
            else:
                _mount(m.source, target, m.type, flags, data)
                done += 1
        if readonly and done:
            _mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY, "")
    except BundleError:
        for _ in range(done):
            unmount(target)
        raise
    return done > 0


def is_mounted(path: str) -> bool:
    """Whether a mount sits on ``path`` (per /proc/self/mountinfo)."""
    want = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ").replace("\\134", "\\")
            if point == want:
                return True
    return False


def unmount(path: str) -> None:
    """Detach every mount stacked on ``path``; no error when nothing is mounted."""
    libc = _libc()
    for _ in range(64):  # bounded: each round removes one layer of the stack
        if not os.path.isdir(path) or not is_mounted(path):
            return
        if libc.umount2(path.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise BundleError(f"umount {path}: {os.strerror(err)}")
