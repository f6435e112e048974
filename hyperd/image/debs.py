"""Debian packages for the guest image: resolved, downloaded and unpacked with apt and dpkg-deb.

Nothing is installed on the host: ``apt-get download`` fetches the ``.deb`` files of the
host's configured archive into a cache directory and ``dpkg-deb -x`` unpacks them into a
scratch sysroot. :func:`resolve` pins each package to the archive's candidate version and its
SHA-256, which is what makes a build reproducible (and what the image's cache key is made of).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hyperd.image.errors import ImageError

__all__ = ["Package", "download", "need_tools", "resolve", "unpack"]

KERNEL_METAPACKAGE = "linux-image-amd64"  # depends on the current linux-image-<abi>-amd64


@dataclass(frozen=True)
class Package:
    """One package version: its name, version, the archive's SHA-256 and the ``.deb`` name."""

    name: str
    version: str
    sha256: str
    filename: str  # what apt-get download names it: name_version_arch.deb, ":" quoted


def need_tools(*names: str) -> None:
    """Raise ``ImageError`` naming every missing program (and the package that has it)."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise ImageError(
            f"missing program(s) {', '.join(missing)}: the image build needs "
            "Debian's apt and dpkg (a Debian or Ubuntu host)"
        )


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ImageError(f"cannot run {argv[0]}: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ImageError(f"{' '.join(argv[:3])}…: {detail[-1] if detail else 'failed'}")
    return done.stdout


def _fields(record: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in record.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def show(names: list[str]) -> dict[str, dict[str, str]]:
    """The archive's candidate record of each of ``names`` (one apt-cache run: it is slow).

    Raises ``ImageError`` naming the packages apt does not know.
    """
    try:
        text = _run(["apt-cache", "show", "--no-all-versions", *names])
    except ImageError:
        # apt-cache fails as a whole when one name is unknown: find out which
        missing = names if len(names) == 1 else [n for n in names if not _known(n)]
        raise ImageError(
            f"package(s) {', '.join(missing or names)} not available from apt "
            "(is the package list current? run: apt-get update)"
        ) from None
    found: dict[str, dict[str, str]] = {}
    for record in text.split("\n\n"):
        fields = _fields(record)
        if {"Package", "Version", "Architecture"} <= fields.keys():
            found.setdefault(fields["Package"], fields)
    missing = [n for n in names if n not in found]
    if missing:
        raise ImageError(
            f"package(s) {', '.join(missing)} not available from apt "
            "(is the package list current? run: apt-get update)"
        )
    return found


def _known(name: str) -> bool:
    try:
        _run(["apt-cache", "show", "--no-all-versions", name])
    except ImageError:
        return False
    return True


def kernel_package() -> str:
    """The versioned kernel package that ``linux-image-amd64`` currently depends on."""
    depends = show([KERNEL_METAPACKAGE])[KERNEL_METAPACKAGE].get("Depends", "")
    for alternative in depends.split(","):
        name = alternative.split("|")[0].split("(")[0].strip()
        if name.startswith("linux-image-"):
            return name
    raise ImageError(f"{KERNEL_METAPACKAGE} names no kernel package (Depends: {depends!r})")


def resolve(names: list[str]) -> list[Package]:
    """Pin every package of ``names`` to its candidate version (sorted by name)."""
    records = show(sorted(set(names)))
    return [
        Package(
            name=name,
            version=f["Version"],
            sha256=f.get("SHA256", ""),
            filename=f"{name}_{f['Version'].replace(':', '%3a')}_{f['Architecture']}.deb",
        )
        for name, f in sorted(records.items())
    ]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(packages: list[Package], into: Path) -> list[Path]:
    """The ``.deb`` file of every package in ``into``, downloading those not there yet."""
    into.mkdir(parents=True, exist_ok=True)
    wanted = []
    for p in packages:
        path = into / p.filename
        if path.exists() and (not p.sha256 or _sha256(path) == p.sha256):
            continue
        wanted.append(f"{p.name}={p.version}")
    if wanted:
        # the sandbox user (_apt) may not be able to write into the cache dir: download as us
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *wanted], cwd=into)
    paths = []
    for p in packages:
        path = into / p.filename
        if not path.exists():
            raise ImageError(f"apt-get download did not produce {p.filename}")
        if p.sha256 and _sha256(path) != p.sha256:
            raise ImageError(f"{p.filename}: SHA-256 differs from the archive's")
        paths.append(path)
    return paths


def unpack(debs: list[Path], root: Path) -> None:
    """``dpkg-deb -x`` every package into ``root`` (no maintainer scripts run)."""
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)])
