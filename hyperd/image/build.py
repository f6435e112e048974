"""``hyperd image build``: the guest kernel and initrd from Debian packages and installed hyperd.

The image is two files in a cache directory (``vmlinux`` and ``initrd.img``, plus
``manifest.json``), which the ``[vm.qemu]`` defaults point at. The initrd holds static busybox,
the kernel modules the guest needs, Debian's Python 3.11 (binary, the libraries its loader lists,
the standard library without tests/GUI/build tools, compiled to sourceless ``.pyc``) and hyperd's
agent with its dependencies as installed in the running Python.

Reproducible: every package is pinned to the archive's version and SHA-256, files are archived
in sorted order with fixed owners and times, ``.pyc`` files carry a hash instead of an mtime and
are compiled in a fresh interpreter, and gzip gets a zero mtime. The cache key hashes all inputs;
a build whose key matches the manifest in the cache does nothing (``force`` rebuilds).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import hyperd
from hyperd.image import cpio, debs, kernel
from hyperd.image.errors import ImageError
from hyperd.image.initscript import INIT_SCRIPT

__all__ = ["FORMAT", "ImageResult", "build_image", "default_cache_dir", "image_paths"]

FORMAT = 1  # bump when the image layout changes: part of the cache key
PYTHON = "python3.11"
PACKAGES = (
    "busybox-static",
    PYTHON + "-minimal",
    "lib" + PYTHON + "-minimal",
    "lib" + PYTHON + "-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",  # ctypes (pyroute2 uses it for setns)
    "libssl3",  # _ssl: anyio imports ssl
    "libsqlite3-0",  # _sqlite3: pyroute2 imports sqlite3
)
LIB_DIR = "lib/x86_64-linux-gnu"
LOADER = "lib64/ld-linux-x86-64.so.2"
# stdlib parts an agent never imports: tests, GUI, build and packaging tools, databases
STDLIB_SKIP = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "venv",
        "dbm",
        "curses",
        "site-packages",
        "dist-packages",
        "__phello__",
        "config-3.11-x86_64-linux-gnu",
        "turtle.py",
        "pydoc.py",
    }
)
DYNLOAD_SKIP = re.compile(r"^(_test|_xx|xxlimited|_ctypes_test)")
PY_SUFFIXES = (".py", ".so")
GZIP_LEVEL = 6  # decompression is quick at any level; 6 is zlib's own default trade-off

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageResult:
    """What a build made (or found up to date)."""

    kernel: Path
    initrd: Path
    manifest: Path
    key: str
    built: bool  # False: the cache was up to date
    seconds: float
    kernel_bytes: int
    initrd_bytes: int


def default_cache_dir() -> Path:
    """``/var/cache/hyperd/image`` for root, else ``$XDG_CACHE_HOME/hyperd/image``."""
    if os.geteuid() == 0:
        return Path("/var/cache/hyperd/image")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hyperd" / "image"


def image_paths(cache: Path) -> tuple[Path, Path]:
    """The kernel and initrd paths of the image in ``cache``."""
    return cache / "vmlinux", cache / "initrd.img"


# -- what goes in: the agent's Python distributions -----------------------------------------------


HOST_ONLY: Final = frozenset({"protobuf"})
"""Runtime dependencies the guest never imports: protobuf is the containerd shim's (host side);
its C extension needs libraries the guest does not carry."""


def _agent_distributions() -> list[importlib.metadata.Distribution]:
    """hyperd's runtime dependencies (no extras, none of :data:`HOST_ONLY`), transitively, as
    installed here."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = ["hyperd"]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key in HOST_ONLY:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise ImageError(
                f"Python package {name!r} (needed by the agent) is not installed in this Python"
            ) from None
        seen[key] = dist
        for req in dist.requires or ():
            if "extra ==" in req:
                continue
            marker_ok = True
            if ";" in req:
                req, marker = req.split(";", 1)
                marker_ok = _marker_true(marker)
            if marker_ok:
                todo.append(re.split(r"[ <>=!~\[(]", req.strip(), maxsplit=1)[0])
    return [seen[k] for k in sorted(seen)]


_MARKER_CLAUSE = re.compile(r"""\s*(\w+)\s*(<=|>=|==|!=|<|>)\s*["']([^"']*)["']\s*""")


def _marker_true(marker: str) -> bool:
    """Evaluate an environment marker of ``VAR OP "VALUE"`` clauses joined by and/or.

    Enough for the markers of hyperd's dependencies (platform_system, sys_platform,
    python_version, os_name); a clause it cannot read counts as true.
    """
    env = {
        "python_version": "{}.{}".format(*sys.version_info[:2]),
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "implementation_name": sys.implementation.name,
        "platform_python_implementation": "CPython",
    }

    def clause(text: str) -> bool:
        m = _MARKER_CLAUSE.fullmatch(text.strip("() "))
        if m is None or m.group(1) not in env:
            return True
        have, op, want = env[m.group(1)], m.group(2), m.group(3)
        if m.group(1) == "python_version":
            h = tuple(int(x) for x in have.split("."))
            w = tuple(int(x) for x in want.split("."))
            return {"<": h < w, "<=": h <= w, ">": h > w, ">=": h >= w, "==": h == w, "!=": h != w}[
                op
            ]
        return {"==": have == want, "!=": have != want}.get(op, True)

    return any(all(clause(c) for c in alt.split(" and ")) for alt in marker.split(" or "))


def _hyperd_sources() -> list[tuple[str, Path]]:
    """(archive name, file) of hyperd's and protocol's own modules."""
    import protocol

    files = []
    for pkg in (hyperd, protocol):
        root = Path(pkg.__file__ or "").parent
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                files.append((path.relative_to(root.parent).as_posix(), path))
    return files


def _dist_files(dist: importlib.metadata.Distribution) -> list[tuple[str, Path]]:
    files = []
    for f in dist.files or ():
        name = f.as_posix()
        if (
            name.startswith("..")
            or ".dist-info/" in name
            or "__pycache__" in name
            or not name.endswith(PY_SUFFIXES)
        ):
            continue
        files.append((name, Path(str(dist.locate_file(f)))))
    return files


def cache_key(packages: list[debs.Package]) -> str:
    """The hash of every input: format, packages, Python distributions and hyperd's sources."""
    h = hashlib.sha256(f"format {FORMAT}\n{INIT_SCRIPT}".encode())
    for p in packages:
        h.update(f"deb {p.name} {p.version} {p.sha256}\n".encode())
    for dist in _agent_distributions():
        h.update(f"dist {dist.metadata['Name']} {dist.version}\n".encode())
        if dist.metadata["Name"] == "hyperd":
            for name, path in _hyperd_sources():
                h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# -- building -------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, stat.S_IMODE(os.stat(src).st_mode) | stat.S_IRUSR)


def _needed_libs(sysroot: Path, elf: Path) -> list[Path] | None:
    """The sysroot libraries ``elf`` loads, or None when one of them is not in the sysroot."""
    libdirs = f"{sysroot / LIB_DIR}:{sysroot / 'usr' / LIB_DIR}"
    done = subprocess.run(
        [str(sysroot / LOADER), "--library-path", libdirs, "--list", str(elf)],
        capture_output=True,
        text=True,
        check=False,
    )
    libs = []
    for line in done.stdout.splitlines():
        if "=>" not in line:
            continue
        target = line.split("=>", 1)[1].strip().split(" (", 1)[0]
        if target == "not found" or not target.startswith(str(sysroot)):
            return None
        libs.append(Path(target))
    return libs


def _stage_python(sysroot: Path, stage: Path, progress: Progress) -> None:
    binary = sysroot / "usr/bin" / PYTHON
    _copy(binary, stage / "usr/bin" / PYTHON)
    (stage / "usr/bin/python3").symlink_to(PYTHON)
    libs = _needed_libs(sysroot, binary)
    if libs is None:
        raise ImageError(f"{PYTHON} needs a library that none of the packages provide")
    needed = set(libs)
    src_lib = sysroot / "usr/lib" / PYTHON
    dst_lib = stage / "usr/lib" / PYTHON
    for dirpath, dirnames, filenames in os.walk(src_lib):
        rel = Path(dirpath).relative_to(src_lib)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not (rel == Path(".") and d in STDLIB_SKIP)
            and d != "__pycache__"
            and not (d == "tests" or d == "idle_test")
        )
        for name in sorted(filenames):
            if rel == Path(".") and name in STDLIB_SKIP:
                continue
            src = Path(dirpath) / name
            if rel.parts[:1] == ("lib-dynload",):
                if DYNLOAD_SKIP.match(name):
                    continue
                mod_libs = _needed_libs(sysroot, src)
                if mod_libs is None:
                    continue  # e.g. _ssl, _sqlite3: their libraries are left out on purpose
                needed.update(mod_libs)
            elif not name.endswith(".py"):
                continue
            _copy(src, dst_lib / rel / name)
    for dist in _agent_distributions():
        own = dist.metadata["Name"] == "hyperd"
        files = _hyperd_sources() if own else _dist_files(dist)
        for name, path in files:
            if path.suffix == ".so":
                so_libs = _needed_libs(sysroot, path)
                if so_libs is None:
                    raise ImageError(
                        f"{name} (from {dist.metadata['Name']}) needs a library "
                        "that the guest does not have"
                    )
                needed.update(so_libs)
            _copy(path, dst_lib / name)
    for lib in sorted(needed):
        _copy(lib.resolve(), stage / LIB_DIR / lib.name)
    _copy((sysroot / LOADER).resolve(), stage / LOADER)
    progress(f"  python: {len(needed)} libraries; compiling the modules")
    _compile(dst_lib, "/usr/lib/" + PYTHON)


# Run in a fresh interpreter: marshal marks objects by reference count, which depends on what the
# process imported before, so compiling in the builder itself (a CLI, a test run) gives .pyc bytes
# that differ between callers; a fresh ``python -I`` starts from the same state every time.
_COMPILE_SCRIPT = """
import pathlib, py_compile, sys
root, guest = pathlib.Path(sys.argv[1]), sys.argv[2]
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
for path in sorted(root.rglob("*.py")):
    target = guest + "/" + path.relative_to(root).as_posix()
    try:
        py_compile.compile(str(path), cfile=str(path) + "c", dfile=target, doraise=True,
                           invalidation_mode=mode)
    except py_compile.PyCompileError:
        continue  # keep the source (e.g. Python 2 leftovers nothing imports)
    path.unlink()
"""


def _compile(root: Path, guest_root: str) -> None:
    """Replace every ``.py`` under ``root`` by a sourceless, hash-based ``.pyc``.

    Tracebacks name the file as the guest sees it (``guest_root``), not the build's scratch dir.
    """
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _COMPILE_SCRIPT, str(root), guest_root],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ImageError(f"compiling the guest's Python modules failed: {done.stderr.strip()}")


def _stage_busybox(sysroot: Path, stage: Path) -> None:
    busybox = sysroot / "bin/busybox"
    _copy(busybox, stage / "bin/busybox")
    listing = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=False
    )
    if listing.returncode != 0:
        raise ImageError(f"cannot list busybox applets: {listing.stderr.strip()}")
    for applet in sorted(listing.stdout.split()):
        link = stage / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(stage / "bin/busybox", link.parent))


def _stage_modules(sysroot: Path, stage: Path) -> tuple[str, int]:
    roots = sorted((sysroot / "lib/modules").iterdir())
    if len(roots) != 1:
        raise ImageError(f"expected one kernel's modules, found {[r.name for r in roots]}")
    available = kernel.find_modules(roots[0] / "kernel")
    ordered = kernel.module_order(kernel.GUEST_MODULES, available)
    for ko in ordered:
        _copy(ko, stage / "lib/modules" / ko.name)
    (stage / "lib/modules/order").write_text("".join(ko.name + "\n" for ko in ordered))
    return roots[0].name, len(ordered)


def _stage_rest(stage: Path) -> None:
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc"):
        (stage / d).mkdir(exist_ok=True)
    init = stage / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (stage / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (stage / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (stage / "etc/hosts").write_text("127.0.0.1 localhost\n")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_image(
    cache: Path | None = None,
    *,
    force: bool = False,
    progress: Progress = lambda line: None,
    check_qemu: bool = True,
) -> ImageResult:
    """Build the guest image into ``cache`` (default :func:`default_cache_dir`).

    Raises ``ImageError`` naming what is missing (apt/dpkg, a package, QEMU) or wrong.
    """
    started = time.monotonic()
    cache = cache or default_cache_dir()
    debs.need_tools("apt-get", "apt-cache", "dpkg-deb")
    if check_qemu and shutil.which("qemu-system-x86_64") is None:
        raise ImageError(
            "qemu-system-x86_64 not found: the image is for the qemu backend; "
            "install it with: apt-get install qemu-system-x86"
        )
    progress("[1/6] resolving packages")
    names = [debs.kernel_package(), *PACKAGES]
    packages = debs.resolve(names)
    key = cache_key(packages)
    vmlinux, initrd = image_paths(cache)
    manifest_path = cache / "manifest.json"
    if not force and vmlinux.exists() and initrd.exists() and manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("key") == key:
            progress("image is up to date")
            return ImageResult(
                vmlinux,
                initrd,
                manifest_path,
                key,
                False,
                time.monotonic() - started,
                vmlinux.stat().st_size,
                initrd.stat().st_size,
            )
    cache.mkdir(parents=True, exist_ok=True)
    progress(f"[2/6] downloading {len(packages)} packages with apt")
    files = debs.download(packages, cache / "debs")
    with tempfile.TemporaryDirectory(prefix="hyperd-image-", dir=cache) as scratch:
        sysroot, stage = Path(scratch) / "sysroot", Path(scratch) / "initrd"
        sysroot.mkdir()
        stage.mkdir()
        progress("[3/6] unpacking")
        debs.unpack(files, sysroot)
        progress("[4/6] kernel: extracting vmlinux and modules")
        bzimages = sorted((sysroot / "boot").glob("vmlinuz-*"))
        if len(bzimages) != 1:
            raise ImageError(f"expected one kernel image, found {[b.name for b in bzimages]}")
        elf = kernel.extract_vmlinux(bzimages[0].read_bytes())
        release, nmodules = _stage_modules(sysroot, stage)
        progress(f"[5/6] initrd: busybox, {nmodules} modules, {PYTHON} and the agent")
        _stage_busybox(sysroot, stage)
        _stage_python(sysroot, stage, progress)
        _stage_rest(stage)
        progress("[6/6] writing the archive")
        raw = io.BytesIO()
        entries = cpio.write_archive(
            stage, raw, devices=(cpio.Device("dev/console", stat.S_IFCHR | 0o600, 5, 1),)
        )
        packed = gzip.compress(raw.getvalue(), compresslevel=GZIP_LEVEL, mtime=0)
    _write_atomic(vmlinux, elf)
    _write_atomic(initrd, packed)
    manifest = {
        "format": FORMAT,
        "key": key,
        "kernel_release": release,
        "packages": [f"{p.name}={p.version}" for p in packages],
        "python": [f"{d.metadata['Name']}=={d.version}" for d in _agent_distributions()],
        "initrd_entries": entries,
        "initrd_uncompressed_bytes": len(raw.getvalue()),
    }
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return ImageResult(
        vmlinux, initrd, manifest_path, key, True, time.monotonic() - started, len(elf), len(packed)
    )
