"""CUDA virtual memory management through the driver API (ctypes on libcuda.so.1): reserve a
virtual address range, create physical pages, map and unmap them, and view a mapped range as a
torch tensor.

What the KV pool is built on: a model's cache keeps one virtual address for its whole residency
(CUDA graphs and kernels see a fixed pointer) while physical pages come and go underneath.
"""

from __future__ import annotations

import ctypes
import functools

import torch

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class CudaDriverError(RuntimeError):
    def __init__(self, call: str, code: int, name: str):
        super().__init__(f"{call} failed: {name} ({code})")
        self.code = code


CUDA_ERROR_OUT_OF_MEMORY = 2


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(call: str, code: int) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(code, ctypes.byref(name))
        raise CudaDriverError(call, code, (name.value or b"?").decode())


def available(device: torch.device) -> bool:
    """Whether the device supports virtual memory management (and the driver is reachable)."""
    if device.type != "cuda":
        return False
    torch.cuda.init()  # the driver is initialised with the runtime
    try:
        attribute = ctypes.c_int()
        # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
        code = _driver().cuDeviceGetAttribute(ctypes.byref(attribute), 102, _ordinal(device))
    except OSError:
        return False
    return code == 0 and attribute.value == 1


def _ordinal(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class DevicePages:
    """Physical pages of one device and the calls that map them into reserved ranges."""

    def __init__(self, device: torch.device):
        # The driver calls act on the current context: the primary one, which the runtime
        # creates and makes current with its first allocation on the device.
        torch.zeros(1, device=device)
        self.device = device
        self.prop = _AllocationProp()
        self.prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location = _Location(CU_MEM_LOCATION_TYPE_DEVICE, _ordinal(device))
        self.access = _AccessDesc(self.prop.location, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        granularity = ctypes.c_size_t()
        _check(
            "cuMemGetAllocationGranularity",
            _driver().cuMemGetAllocationGranularity(
                ctypes.byref(granularity), ctypes.byref(self.prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM
            ),
        )
        self.page_bytes = granularity.value

    def create(self) -> int | None:
        """A new physical page, or None when the device has no memory for one."""
        handle = ctypes.c_ulonglong()
        code = _driver().cuMemCreate(
            ctypes.byref(handle),
            ctypes.c_size_t(self.page_bytes),
            ctypes.byref(self.prop),
            ctypes.c_ulonglong(0),
        )
        if code == CUDA_ERROR_OUT_OF_MEMORY:
            return None
        _check("cuMemCreate", code)
        return handle.value

    def release(self, handle: int) -> None:
        """Hands a page (mapped nowhere) back to the driver."""
        _check("cuMemRelease", _driver().cuMemRelease(ctypes.c_ulonglong(handle)))

    def reserve_range(self, nbytes: int) -> int:
        address = ctypes.c_ulonglong()
        _check(
            "cuMemAddressReserve",
            _driver().cuMemAddressReserve(
                ctypes.byref(address),
                ctypes.c_size_t(nbytes),
                ctypes.c_size_t(self.page_bytes),
                ctypes.c_ulonglong(0),
                ctypes.c_ulonglong(0),
            ),
        )
        return address.value

    def free_reservation(self, address: int, nbytes: int) -> None:
        _check(
            "cuMemAddressFree",
            _driver().cuMemAddressFree(ctypes.c_ulonglong(address), ctypes.c_size_t(nbytes)),
        )

    def map(self, address: int, handles: list[int]) -> None:
        """Maps pages at consecutive page addresses from `address`, then opens them to the
        device (one access call for the whole run)."""
        for index, handle in enumerate(handles):
            _check(
                "cuMemMap",
                _driver().cuMemMap(
                    ctypes.c_ulonglong(address + index * self.page_bytes),
                    ctypes.c_size_t(self.page_bytes),
                    ctypes.c_size_t(0),
                    ctypes.c_ulonglong(handle),
                    ctypes.c_ulonglong(0),
                ),
            )
        _check(
            "cuMemSetAccess",
            _driver().cuMemSetAccess(
                ctypes.c_ulonglong(address),
                ctypes.c_size_t(len(handles) * self.page_bytes),
                ctypes.byref(self.access),
                ctypes.c_size_t(1),
            ),
        )

    def unmap(self, address: int, num_pages: int) -> None:
        _check(
            "cuMemUnmap",
            _driver().cuMemUnmap(
                ctypes.c_ulonglong(address), ctypes.c_size_t(num_pages * self.page_bytes)
            ),
        )


class _CudaArray:
    """A device range as `__cuda_array_interface__` sees it: what torch.as_tensor wraps."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
            "stream": None,  # nothing to wait for: the range is ours alone
        }


def tensor_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over a reserved range; only its mapped pages may be touched."""
    return torch.as_tensor(_CudaArray(address, nbytes), device=device)
