"""The guest kernel: the uncompressed ``vmlinux`` out of Debian's bzImage, and its modules.

Under TCG, the guest decompressing its own xz payload is the largest single boot cost (~4.5 s
measured), so the build extracts it once: the bzImage's payload is one xz stream, and the ELF it
holds carries a PVH note, which QEMU's ``-kernel`` boots directly.

The Debian package ships no ``modules.dep``; :func:`module_order` reads each module's
``depends=`` from its ``.modinfo`` and orders the wanted modules dependencies first, for
busybox ``insmod``.
"""

from __future__ import annotations

import lzma
from pathlib import Path

from hyperd.image.errors import ImageError

__all__ = ["GUEST_MODULES", "extract_vmlinux", "find_modules", "module_order"]

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"

# what the guest agent needs: virtio-serial ports, the 9p share, a virtio NIC, overlayfs
GUEST_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "virtio_net",
    "overlay",
)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside an xz-compressed bzImage; ``ImageError`` if there is none."""
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(ELF_MAGIC):
            return elf
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise ImageError("the kernel image holds no xz-compressed ELF payload (not CONFIG_KERNEL_XZ?)")


def find_modules(module_root: Path) -> dict[str, Path]:
    """Every ``.ko`` under ``module_root`` by module name (``-`` and ``_`` are the same)."""
    found: dict[str, Path] = {}
    for path in sorted(module_root.rglob("*.ko")):
        found.setdefault(path.name[: -len(".ko")].replace("-", "_"), path)
    return found


def _depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    for field in data.split(b"\0"):
        if field.startswith(b"depends="):
            value = field[len(b"depends=") :].decode()
            return [d.replace("-", "_") for d in value.split(",") if d]
    return []


def module_order(wanted: tuple[str, ...], available: dict[str, Path]) -> list[Path]:
    """``wanted`` and everything they depend on, each after its dependencies."""
    ordered: list[Path] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        ko = available.get(name)
        if ko is None:
            raise ImageError(
                f"kernel module {name!r} is not in the kernel package "
                "(built in, or a different kernel configuration?)"
            )
        for dep in _depends(ko):
            visit(dep, (*chain, name))
        done.add(name)
        ordered.append(ko)

    for name in wanted:
        visit(name, ())
    return ordered
