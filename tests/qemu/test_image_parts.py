"""The pure parts of the image build, fed bytes: the cpio writer, the kernel payload, the
module order, the environment markers, and the QEMU command line."""

from __future__ import annotations

import io
import lzma
import stat
from pathlib import Path

import pytest

from hyperd.image import cpio, kernel
from hyperd.image.build import _marker_true
from hyperd.image.errors import ImageError
from hyperd.vm.qemu import QemuLaunch, qemu_argv


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        head = data[pos : pos + 110]
        assert head[:6] == cpio.MAGIC
        fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize, mode = fields[11], fields[6], fields[1]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == cpio.TRAILER:
            assert pos == len(data)
            return entries
        entries[name] = (mode, body)


def test_cpio_archive_is_reproducible_and_readable(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "bin" / "tool").chmod(0o755)
    (tmp_path / "bin" / "link").symlink_to("tool")
    (tmp_path / "odd-length-name.txt").write_bytes(b"abc")
    devices = (cpio.Device("dev/console", stat.S_IFCHR | 0o600, 5, 1),)
    first, second = io.BytesIO(), io.BytesIO()
    count = cpio.write_archive(tmp_path, first, devices=devices)
    cpio.write_archive(tmp_path, second, devices=devices)
    assert first.getvalue() == second.getvalue()
    entries = _read_newc(first.getvalue())
    assert count == len(entries) == 5
    assert list(entries)[:2] == ["bin", "bin/link"]  # parents first, sorted
    assert entries["bin/tool"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert entries["bin/link"] == (stat.S_IFLNK | 0o777, b"tool")
    assert entries["odd-length-name.txt"][1] == b"abc"
    assert stat.S_ISCHR(entries["dev/console"][0])


def test_vmlinux_is_found_after_a_false_magic() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 4
    image = b"boot" + kernel.XZ_MAGIC + b"junk" + lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert kernel.extract_vmlinux(image) == elf
    with pytest.raises(ImageError, match="no xz-compressed ELF"):
        kernel.extract_vmlinux(b"boot" + lzma.compress(b"not elf", format=lzma.FORMAT_XZ))


def test_modules_come_after_their_dependencies(tmp_path: Path) -> None:
    def ko(name: str, depends: str) -> Path:
        path = tmp_path / f"{name}.ko"
        path.write_bytes(b"\x7fELF\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")
        return path

    available = {
        "9p": ko("9p", "9pnet,netfs"),
        "9pnet": ko("9pnet", ""),
        "netfs": ko("netfs", "fscache"),
        "fscache": ko("fscache", ""),
    }
    order = [p.stem for p in kernel.module_order(("9p",), available)]
    assert order == ["9pnet", "fscache", "netfs", "9p"]
    with pytest.raises(ImageError, match="'virtio_console' is not in the kernel package"):
        kernel.module_order(("virtio_console",), available)
    ko("a", "b")
    ko("b", "a")
    with pytest.raises(ImageError, match="cycle"):
        kernel.module_order(("a",), kernel.find_modules(tmp_path))


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ('platform_system == "Windows"', False),
        ('python_version < "3.11"', False),
        ('python_version >= "3.8"', True),
        ('sys_platform == "linux" and python_version < "3.0"', False),
        ('os_name == "nt" or platform_system == "Linux"', True),
        ('extra_thing == "x"', True),
    ],
)
def test_environment_markers(marker: str, expected: bool) -> None:
    assert _marker_true(marker) is expected


def test_qemu_command_line() -> None:
    launch = QemuLaunch(
        binary="/usr/bin/qemu-system-x86_64",
        kernel="/k",
        initrd="/i",
        memory_mib=256,
        cpus=2,
        accel="tcg",
        kernel_args="foo=1",
        machine="q35",
        share_dir="/s/p",
        share_tag="tag",
        run_dir="/r/p",
        dialect="hyper",
        netns="/var/run/netns/n",
        tap="hyperd-tap0",
        mac="02:00:00:00:00:01",
    )
    argv = qemu_argv(launch, {"ctl": 5, "tty": 6, "qmp": 7})
    assert argv[1:3] == ["--net=/var/run/netns/n", "--"]
    text = " ".join(argv)
    assert "-accel tcg" in text and "-cpu max" in text and "-m 256 -smp 2" in text
    append = argv[argv.index("-append") + 1]
    assert "hyperd.share=tag" in append and "hyperd.agent=--dialect,hyper" in append
    assert append.endswith(" foo=1")
    assert "socket,id=ctl,fd=5,server=on,wait=off" in argv
    assert "virtserialport,chardev=tty,name=sh.hyper.channel.1,id=port1" in argv
    assert "virtio-9p-pci,fsdev=share,mount_tag=tag" in argv
    assert "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01" in argv
    assert "file:/r/p/console.log" in argv


def test_compiled_modules_are_sourceless_and_identical(tmp_path: Path) -> None:
    import marshal

    from hyperd.image.build import _compile

    source = "VALUE = ('a', 'b', 1.5)\ndef f():\n    return VALUE\n"
    outputs = []
    for name in ("one", "two"):
        root = tmp_path / name / "pkg"
        root.mkdir(parents=True)
        (root / "mod.py").write_text(source)
        _compile(root.parent, "/usr/lib/python3.11")
        assert not (root / "mod.py").exists()
        outputs.append((root / "mod.pyc").read_bytes())
    assert outputs[0] == outputs[1]
    code = marshal.loads(outputs[0][16:])  # after the 16-byte pyc header
    assert code.co_filename == "/usr/lib/python3.11/pkg/mod.py"


def test_missing_qemu_and_packages_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shutil

    from hyperd.image import build, debs

    real_which = shutil.which

    def which(name: str) -> str | None:
        return None if name == "qemu-system-x86_64" else real_which(name)

    monkeypatch.setattr(shutil, "which", which)  # (the module build.py uses)
    with pytest.raises(ImageError, match=r"qemu-system-x86_64 not found.*apt-get install"):
        build.build_image(tmp_path)
    with pytest.raises(ImageError, match="no-such-package-hyperd") as err:
        debs.resolve(["busybox-static", "no-such-package-hyperd"])
    assert "busybox-static" not in str(err.value)
    with pytest.raises(ImageError, match="missing program"):
        debs.need_tools("no-such-program-hyperd")
