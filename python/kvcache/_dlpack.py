"""DLPack both ways, over ctypes and the CPython capsule API.

to_dltensor(obj): the DLTensor of any object with __dlpack__ (numpy >= 1.22, torch, cupy, jax...),
accepting the legacy 0.x capsule ("dltensor") and the versioned 1.x one ("dltensor_versioned").
The capsule is returned with it and must be kept alive while the pointer is used; it is not
consumed, so its producer frees the tensor when the capsule is collected.

Exported: an object whose __dlpack__ hands out a legacy capsule over memory the manager owns
(a layer's cache), so np.from_dlpack / torch.from_dlpack view it without a copy.
"""

import ctypes
import threading

from . import _ffi

_api = ctypes.pythonapi
_api.PyCapsule_GetName.restype = ctypes.c_char_p
_api.PyCapsule_GetName.argtypes = [ctypes.py_object]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_CapsuleDestructor = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _CapsuleDestructor]


def to_dltensor(obj, stream=None, writable=False):
    """(capsule, POINTER(DLTensor)) for `obj`. `stream`: the CUDA stream (int handle) the tensor
    will be used on, passed to a CUDA producer so it orders its pending work before it; None means
    the legacy default stream."""
    if not hasattr(obj, "__dlpack__"):
        raise TypeError(f"{type(obj).__name__} does not support DLPack (__dlpack__)")
    device_type = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else 1
    kwargs = {}
    if device_type == _ffi.DL_CUDA:
        kwargs["stream"] = 1 if stream is None else int(stream)
    try:
        capsule = obj.__dlpack__(max_version=(1, 0), **kwargs)
    except TypeError:  # A producer of the 0.x protocol (numpy 1.x, older torch).
        capsule = obj.__dlpack__(**kwargs)
    name = _api.PyCapsule_GetName(capsule)
    address = _api.PyCapsule_GetPointer(capsule, name)
    if name == b"dltensor_versioned":
        managed = _ffi.DLManagedTensorVersioned.from_address(address)
        if managed.version.major != 1:
            raise ValueError(f"DLPack version {managed.version.major}.{managed.version.minor} "
                             "is not supported (0.x and 1.x are)")
        if writable and managed.flags & _ffi.DLPACK_FLAG_READ_ONLY:
            raise ValueError("the output tensor is read-only (DLPack flag)")
        offset = _ffi.DLManagedTensorVersioned.dl_tensor.offset
    elif name == b"dltensor":
        offset = _ffi.DLManagedTensor.dl_tensor.offset
    else:
        raise ValueError(f"__dlpack__ returned a capsule named {name!r}")
    return capsule, ctypes.cast(address + offset, ctypes.POINTER(_ffi.DLTensor))


# Exported tensors alive in some consumer, by the address of their managed tensor.
_live = {}
_live_lock = threading.Lock()


def _release(address):
    with _live_lock:
        _live.pop(address, None)


@_ffi.DLManagedTensorDeleter
def _deleter(managed):
    _release(ctypes.cast(managed, ctypes.c_void_p).value)


_VersionedDeleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@_VersionedDeleter
def _versioned_deleter(address):
    _release(address)


# The capsule API on a borrowed PyObject* (no reference counting from ctypes).
_is_valid_raw = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi))
_get_pointer_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


@_CapsuleDestructor
def _capsule_destructor(capsule):
    # A capsule never consumed still carries its name: free what it holds.
    for name in (b"dltensor", b"dltensor_versioned"):
        if _is_valid_raw(capsule, name):
            _release(_get_pointer_raw(capsule, name))


class ExportedTensor:
    """A strided view of memory owned by `owner` (kept alive while any consumer holds a view).
    __dlpack__ hands out a versioned 1.0 capsule to a consumer that asks for one (max_version),
    else a legacy 0.x capsule."""

    def __init__(self, owner, data, dtype, shape, strides, device_type, device_id):
        self._owner = owner
        self._data = data
        self._dtype = dtype  # (code, bits)
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)  # In elements.
        self._device = (device_type, device_id)

    def __dlpack_device__(self):
        return self._device

    def __dlpack__(self, stream=None, max_version=None, **_):
        versioned = max_version is not None and tuple(max_version)[0] >= 1
        managed = _ffi.DLManagedTensorVersioned() if versioned else _ffi.DLManagedTensor()
        ndim = len(self.shape)
        shape = (ctypes.c_int64 * ndim)(*self.shape)
        strides = (ctypes.c_int64 * ndim)(*self.strides)
        t = managed.dl_tensor
        t.data = self._data
        t.device = _ffi.DLDevice(*self._device)
        t.ndim = ndim
        t.dtype = _ffi.DLDataType(self._dtype[0], self._dtype[1], 1)
        t.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
        t.byte_offset = 0
        if versioned:
            managed.version = _ffi.DLPackVersion(1, 0)
            managed.deleter = ctypes.cast(_versioned_deleter, ctypes.c_void_p)
            name = b"dltensor_versioned"
        else:
            managed.deleter = _deleter
            name = b"dltensor"
        address = ctypes.addressof(managed)
        with _live_lock:
            _live[address] = (managed, shape, strides, self._owner)
        return _api.PyCapsule_New(address, name, _capsule_destructor)
