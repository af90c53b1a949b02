"""kvcache: a paged KV-cache manager, from Python.

A thin binding over the C API of libkvcache.so (ctypes; api/kvcache_c.h documents every call).
K/V go in, and dequantized K/V come out, as any tensor that speaks DLPack (`__dlpack__`): numpy
arrays on the CPU backend, torch tensors on either. Every failed call raises KVCacheError with the
status code and the library's message, and changes nothing.

    import kvcache, numpy as np
    m = kvcache.Manager(num_layers=2, num_kv_heads=8, head_size=128, num_blocks=1024,
                        cache_dtype=kvcache.INT8, input_dtype=kvcache.FLOAT32)
    computed = m.add_sequence(7, prompt_tokens)
    plan = m.reserve([(7, len(prompt_tokens) - computed)])
    for layer in range(2):
        m.append(plan, layer, k[layer], v[layer])         # [T, H, D] each
    m.commit(plan)

The library is found through $KVCACHE_LIBRARY, next to this package, in an install prefix above
it, or on the system's library path.
"""

import ctypes
import enum

from . import _dlpack, _ffi

__all__ = [
    "Manager", "KVCacheError", "Status", "LogLevel", "Plan", "library", "version",
    "FLOAT32", "FLOAT16", "BFLOAT16", "INT8", "FP8_E4M3", "CPU", "CUDA",
    "SCALES_SIDE", "SCALES_INLINE",
]

FLOAT32, FLOAT16, BFLOAT16, INT8, FP8_E4M3 = 0, 1, 2, 3, 4
CPU, CUDA = 0, 1
SCALES_SIDE, SCALES_INLINE = 0, 1  # config scale_placement


class Status(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    ALREADY_EXISTS = 3
    RESOURCE_EXHAUSTED = 4
    FAILED_PRECONDITION = 5
    OUT_OF_RANGE = 6
    INTERNAL = 7
    UNKNOWN = 8
    UNIMPLEMENTED = 9


class LogLevel(enum.IntEnum):
    DEFAULT = 0
    TRACE = 1
    DEBUG = 2
    INFO = 3
    WARNING = 4
    ERROR = 5
    OFF = 6


class KVCacheError(Exception):
    """A failed call: .code (Status) and .message (the library's, naming the bad value)."""

    def __init__(self, code, message):
        try:
            code = Status(code)
        except ValueError:
            pass
        super().__init__(f"{getattr(code, 'name', code)}: {message}")
        self.code = code
        self.message = message


_lib = None


def library():
    """The loaded libkvcache.so (ctypes.CDLL), loaded on first use."""
    global _lib
    if _lib is None:
        _lib = _ffi.load_library()
    return _lib


def version():
    return library().kvcache_version().decode()


def _check(status):
    if status != 0:
        message = library().kvcache_last_error(None) or b""
        raise KVCacheError(status, message.decode(errors="replace"))


def _stream(stream):
    """A CUDA stream as the C API's void*: None, an int handle, or an object with .cuda_stream
    (torch.cuda.Stream)."""
    if stream is None:
        return None
    return ctypes.c_void_p(int(getattr(stream, "cuda_stream", stream)))


def _int32_array(values):
    values = list(values)
    return (ctypes.c_int32 * len(values))(*values), len(values)


class Plan:
    """What reserve() hands back. slot_mapping is the backend's pointer (device memory on CUDA);
    host_slot_mapping a list copied from the host slots."""

    def __init__(self, c_plan):
        self.id = int(c_plan.id)
        self.num_tokens = int(c_plan.num_tokens)
        self.slot_mapping = ctypes.cast(c_plan.slot_mapping, ctypes.c_void_p).value
        self.host_slot_mapping = [c_plan.host_slot_mapping[i] for i in range(self.num_tokens)]
        self.num_block_copies = int(c_plan.num_block_copies)

    def __repr__(self):
        return f"Plan(id={self.id}, num_tokens={self.num_tokens})"


def _plan_id(plan):
    return plan.id if isinstance(plan, Plan) else int(plan)


class Manager:
    """A KV cache (C: kvcache_manager). Keyword arguments are kvcache_config's fields
    (num_layers, num_kv_heads, head_size, head_size_v, block_size, cache_dtype, input_dtype,
    backend, device, num_blocks | memory_budget_bytes | memory_fraction, enable_prefix_caching,
    max_tokens_per_step, max_sequences_per_step, max_blocks_per_sequence, max_inflight_plans,
    log_level, num_q_heads, scale_placement), plus log_sink: a callable(level: LogLevel,
    message: str).
    Thread-safe like the C API; use as a context manager or call close()."""

    def __init__(self, log_sink=None, **config):
        lib = library()
        c = _ffi.Config()
        lib.kvcache_config_init(ctypes.byref(c))
        names = {name for name, _ in _ffi.Config._fields_} - {
            "struct_size", "log_sink", "log_sink_user_data"}
        for key, value in config.items():
            if key not in names:
                raise TypeError(f"unknown config field {key!r}")
            if key in ("enable_prefix_caching", "enable_kv_events"):
                value = int(bool(value))
            if isinstance(value, str):  # kv_events_endpoint and the like.
                value = value.encode()
            setattr(c, key, value)
        self._sink = None
        if log_sink is not None:
            def forward(level, message, _user_data):
                try:
                    log_sink(LogLevel(level), message.decode(errors="replace"))
                except Exception:  # Never unwind into the library.
                    pass
            self._sink = _ffi.LOG_SINK(forward)  # Kept alive as long as the manager.
            c.log_sink = self._sink
        self._config = c
        handle = ctypes.c_void_p()
        _check(lib.kvcache_create(ctypes.byref(c), ctypes.byref(handle)))
        self._m = handle

    # -- life cycle --
    def close(self):
        if getattr(self, "_m", None):
            library().kvcache_destroy(self._m)
            self._m = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    @property
    def backend(self):
        return self._config.backend

    # -- sequences and steps --
    def add_sequence(self, sequence, prompt, adapter_id=0, salt=b""):
        """Registers a sequence with its prompt token ids; returns the tokens already computed
        (prefix cache). `salt` (bytes) separates tenants."""
        tokens, n = _int32_array(prompt)
        salt = bytes(salt)
        salt_buf = (ctypes.c_uint8 * len(salt)).from_buffer_copy(salt) if salt else None
        computed = ctypes.c_int64()
        _check(library().kvcache_add_sequence(self._m, sequence, tokens, n, adapter_id, salt_buf,
                                              len(salt), ctypes.byref(computed)))
        return computed.value

    @staticmethod
    def _requests(batch):
        """[(sequence, num_tokens[, new_token_ids])] as a C array (kept alive by the caller)."""
        batch = list(batch)
        array = (_ffi.ReserveRequest * len(batch))()
        keep = []
        for r, item in zip(array, batch):
            sequence, num_tokens, *rest = item
            r.struct_size = ctypes.sizeof(_ffi.ReserveRequest)
            r.sequence = sequence
            r.num_tokens = num_tokens
            if rest and len(rest[0]) > 0:
                ids, n = _int32_array(rest[0])
                keep.append(ids)
                r.new_token_ids = ctypes.cast(ids, ctypes.POINTER(ctypes.c_int32))
                r.num_new_token_ids = n
        return array, keep

    def reserve(self, batch, stream=None):
        """Room for a batch [(sequence, num_tokens[, new_token_ids])], all or nothing
        (KVCacheError RESOURCE_EXHAUSTED when it does not fit: preempt and retry)."""
        array, _keep = self._requests(batch)
        plan = _ffi.Plan(struct_size=ctypes.sizeof(_ffi.Plan))
        _check(library().kvcache_reserve(self._m, array, len(array), _stream(stream),
                                         ctypes.byref(plan)))
        return Plan(plan)

    def can_reserve(self, batch):
        """True when reserve(batch) would succeed now; False when the pool is too full."""
        array, _keep = self._requests(batch)
        status = library().kvcache_can_reserve(self._m, array, len(array))
        if status == Status.RESOURCE_EXHAUSTED:
            return False
        _check(status)
        return True

    def append(self, plan, layer, key, value, stream=None):
        """Writes the plan's next key.shape[0] tokens of `layer`: key [T, H, D], value [T, H, Dv],
        any DLPack tensors of input_dtype in the backend's memory (token/head strides free, e.g.
        slices of a fused QKV output)."""
        k_capsule, k = _dlpack.to_dltensor(key, stream)
        v_capsule, v = _dlpack.to_dltensor(value, stream)
        _check(library().kvcache_append_dlpack(self._m, _plan_id(plan), layer, k, v,
                                               _stream(stream)))
        del k_capsule, v_capsule

    def commit(self, plan):
        _check(library().kvcache_commit(self._m, _plan_id(plan)))

    def abort(self, plan):
        _check(library().kvcache_abort(self._m, _plan_id(plan)))

    def fork(self, parent, child):
        _check(library().kvcache_fork(self._m, parent, child))

    def free(self, sequence):
        _check(library().kvcache_free(self._m, sequence))

    # -- lookups --
    def block_table(self, sequence):
        """The sequence's block ids (a list)."""
        n = ctypes.c_int64()
        _check(library().kvcache_block_table(self._m, sequence, None, 0, ctypes.byref(n)))
        blocks = (ctypes.c_int32 * max(n.value, 1))()
        _check(library().kvcache_block_table(self._m, sequence, blocks, n.value, ctypes.byref(n)))
        return list(blocks[:n.value])

    def sequence_length(self, sequence):
        n = ctypes.c_int64()
        _check(library().kvcache_sequence_length(self._m, sequence, ctypes.byref(n)))
        return n.value

    def prefix_loaded(self, sequence):
        """False while a host-tier onboard that fills the sequence's prefix is still copying."""
        loaded = ctypes.c_int32()
        _check(library().kvcache_prefix_loaded(self._m, sequence, ctypes.byref(loaded)))
        return bool(loaded.value)

    def tokens_that_fit(self, sequence):
        n = ctypes.c_int64()
        _check(library().kvcache_tokens_that_fit(self._m, sequence, ctypes.byref(n)))
        return n.value

    def batch_block_table(self, sequences, stream=None):
        """The block tables of a batch in the manager's fixed buffers (kvcache_block_table_view):
        a dict with block_table and seq_lens as ExportedTensors (DLPack: torch.from_dlpack /
        np.from_dlpack view them), valid until the next batch_block_table call."""
        ids = (ctypes.c_int64 * len(sequences))(*sequences)
        view = _ffi.BlockTableView(struct_size=ctypes.sizeof(_ffi.BlockTableView))
        _check(library().kvcache_batch_block_table(self._m, ids, len(sequences), _stream(stream),
                                                   ctypes.byref(view)))
        device = self._device()
        n, stride = view.num_sequences, view.row_stride
        return {
            "block_table": _dlpack.ExportedTensor(
                self, ctypes.cast(view.block_table, ctypes.c_void_p).value,
                (_ffi.DL_INT, 32), (n, stride), (stride, 1), *device),
            "seq_lens": _dlpack.ExportedTensor(
                self, ctypes.cast(view.seq_lens, ctypes.c_void_p).value, (_ffi.DL_INT, 32),
                (n,), (1,), *device),
            "num_sequences": n, "max_blocks": view.max_blocks, "row_stride": stride,
        }

    def _device(self):
        if self._config.backend == CUDA:
            return (_ffi.DL_CUDA, self._config.device)
        return (_ffi.DL_CPU, 0)

    def layer_view(self, layer):
        """The raw kvcache_layer_view of `layer` (pointers, sizes, strides in elements)."""
        view = _ffi.LayerView(struct_size=ctypes.sizeof(_ffi.LayerView))
        _check(library().kvcache_get_layer_view(self._m, layer, ctypes.byref(view)))
        return view

    def layer_tensors(self, layer):
        """`layer`'s caches as DLPack tensors over the manager's memory (no copy): key_cache
        [num_blocks, block_size, H, D], value_cache [..., Dv] (int8; fp8 e4m3 as uint8 bytes,
        DLPack 0.6 has no fp8; bf16/fp16 as such) and, for quantized caches, key_scale /
        value_scale [num_blocks, block_size, H] float32. With scale_placement=SCALES_INLINE
        the code and scale tensors are strided views of the same rows (row pitch
        key_row_pitch_bytes)."""
        v = self.layer_view(layer)
        code_bits = {INT8: (_ffi.DL_INT, 8), FP8_E4M3: (_ffi.DL_UINT, 8),
                     BFLOAT16: (_ffi.DL_BFLOAT, 16), FLOAT16: (_ffi.DL_FLOAT, 16)}[v.cache_dtype]
        device = self._device()
        shape = (v.num_blocks, v.block_size, v.num_kv_heads)
        out = {
            "key_cache": _dlpack.ExportedTensor(self, v.key_cache, code_bits,
                                                shape + (v.head_size,), tuple(v.key_strides),
                                                *device),
            "value_cache": _dlpack.ExportedTensor(self, v.value_cache, code_bits,
                                                  shape + (v.head_size_v,),
                                                  tuple(v.value_strides), *device),
        }
        if v.key_scale:
            for name in ("key_scale", "value_scale"):
                out[name] = _dlpack.ExportedTensor(self, getattr(v, name), (_ffi.DL_FLOAT, 32),
                                                   shape, tuple(v.scale_strides), *device)
        return out

    def gather(self, sequence, layer, token_begin, num_tokens, key_out, value_out, stream=None):
        """Dequantizes tokens [token_begin, token_begin + num_tokens) of `layer` into key_out
        [T, H, D] / value_out [T, H, Dv] (DLPack tensors: float32, float16 or bfloat16 in the
        backend's memory). Waits for its own work on CUDA."""
        k_capsule, k = _dlpack.to_dltensor(key_out, stream, writable=True)
        v_capsule, v = _dlpack.to_dltensor(value_out, stream, writable=True)
        _check(library().kvcache_gather_dlpack(self._m, sequence, layer, token_begin, num_tokens,
                                               k, v, _stream(stream)))
        del k_capsule, v_capsule

    # -- metrics --
    def metrics(self):
        m = _ffi.Metrics(struct_size=ctypes.sizeof(_ffi.Metrics))
        _check(library().kvcache_get_metrics(self._m, ctypes.byref(m)))
        return {name: getattr(m, name) for name, _ in _ffi.Metrics._fields_[1:]}

    def metrics_text(self):
        n = library().kvcache_metrics_text(self._m, None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        library().kvcache_metrics_text(self._m, buf, n + 1)
        return buf.value.decode()

    def validate(self):
        _check(library().kvcache_validate(self._m))

    # -- KV events (README "KV events") --
    _EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")
    _MEDIA = ("device", "host")

    def take_events(self):
        """The batches made since the last call (enable_kv_events=True), oldest first: a list of
        dicts {sequence, timestamp, events: [{type, medium, block_hashes, parent_block_hash,
        token_ids, block_size, adapter_id}]}; parent_block_hash is None for a chain's first block."""
        ev = _ffi.Events(struct_size=ctypes.sizeof(_ffi.Events))
        _check(library().kvcache_take_events(self._m, ctypes.byref(ev)))
        try:
            out = []
            for b in range(ev.num_batches):
                cb = ev.batches[b]
                events = []
                for i in range(cb.num_events):
                    e = cb.events[i]
                    events.append({
                        "type": self._EVENT_TYPES[e.type],
                        "medium": self._MEDIA[e.medium],
                        "block_hashes": [e.block_hashes[j] for j in range(e.num_block_hashes)],
                        "parent_block_hash": e.parent_block_hash if e.has_parent else None,
                        "token_ids": [e.token_ids[j] for j in range(e.num_token_ids)],
                        "block_size": e.block_size,
                        "adapter_id": e.adapter_id,
                    })
                out.append({"sequence": cb.sequence, "timestamp": cb.timestamp,
                            "events": events})
            return out
        finally:
            library().kvcache_events_free(ctypes.byref(ev))

    def reset_prefix_cache(self):
        _check(library().kvcache_reset_prefix_cache(self._m))
