"""Whether KVM can really run a guest here: ``/dev/kvm`` existing is not enough.

:func:`kvm_usable` creates a VM with one vCPU and 64 KiB of memory at the reset vector holding
a ``hlt``, runs it, and expects the HLT exit (a container, nested virtualization without
support, or a locked-down kernel fail at one step or another). Returns ``(ok, why)``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

__all__ = ["kvm_usable"]

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12  # the only stable API version
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(KVMIO, 0x46, struct of 32 bytes)
KVM_RUN = 0xAE80
KVM_EXIT_HLT = 5
RESET_BASE = 0xFFFF0000  # real-mode CS base after reset; the first instruction is at +0xFFF0
REGION = 0x10000
HLT = b"\xf4"


def kvm_usable(device: str = KVM_DEVICE) -> tuple[bool, str]:
    """``(True, "")`` when a vCPU runs to its HLT, else ``(False, reason)``."""
    fds: list[int] = []
    try:
        kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        if fcntl.ioctl(kvm, KVM_GET_API_VERSION) != KVM_API_VERSION:
            return False, "unexpected KVM API version"
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)
        memory = mmap.mmap(-1, REGION)
        memory[0xFFF0:0xFFF1] = HLT
        address = ctypes_address(memory)
        region = struct.pack("=IIQQQ", 0, 0, RESET_BASE, REGION, address)
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        (reason,) = struct.unpack_from("=I", run, 8)
        run.close()
        memory.close()
        if reason != KVM_EXIT_HLT:
            return False, f"a test vCPU stopped with exit reason {reason}, not HLT"
        return True, ""
    except OSError as exc:
        return False, f"{device}: {exc.strerror or exc}"
    finally:
        for fd in reversed(fds):
            os.close(fd)


def ctypes_address(buffer: mmap.mmap) -> int:
    """The address of an mmap's memory (what KVM maps into the guest)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
