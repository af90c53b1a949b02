"""ctypes declarations of api/kvcache_c.h: every struct once, every function's signature.

tests/test_kvcache.py checks each struct's size and field offsets against the header (it compiles a
small C program that prints them). Keep the field order of the header.
"""

import ctypes
import ctypes.util
import os
from ctypes import (POINTER, Structure, c_char_p, c_double, c_float, c_int32, c_int64,
                    c_size_t, c_uint8, c_uint16, c_uint64, c_void_p)

# ---- DLPack (dlpack.h 0.6 and the versioned 1.x managed tensor) ----


class DLDevice(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


class DLManagedTensor(Structure):
    pass


DLManagedTensorDeleter = ctypes.CFUNCTYPE(None, POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", c_void_p),
    ("deleter", DLManagedTensorDeleter),
]


class DLPackVersion(Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", c_void_p),
        ("deleter", c_void_p),
        ("flags", c_uint64),
        ("dl_tensor", DLTensor),
    ]


DLPACK_FLAG_READ_ONLY = 1
DL_CPU, DL_CUDA, DL_CUDA_HOST = 1, 2, 3
DL_INT, DL_UINT, DL_FLOAT, DL_BFLOAT = 0, 1, 2, 4

# ---- kvcache_c.h ----

LOG_SINK = ctypes.CFUNCTYPE(None, c_int32, c_char_p, c_void_p)


class LayerGroup(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("layers", POINTER(c_int32)),
        ("num_layers", c_int32),
        ("kind", c_int32),
        ("sliding_window", c_int32),
        ("num_kv_heads", c_int32),
        ("head_size", c_int32),
        ("head_size_v", c_int32),
        ("cache_dtype", c_int32),
    ]


class Config(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_layers", c_int32),
        ("num_kv_heads", c_int32),
        ("head_size", c_int32),
        ("head_size_v", c_int32),
        ("block_size", c_int32),
        ("cache_dtype", c_int32),
        ("input_dtype", c_int32),
        ("backend", c_int32),
        ("device", c_int32),
        ("num_blocks", c_int64),
        ("memory_budget_bytes", c_int64),
        ("memory_fraction", c_double),
        ("enable_prefix_caching", c_int32),
        ("max_tokens_per_step", c_int32),
        ("max_sequences_per_step", c_int32),
        ("max_blocks_per_sequence", c_int32),
        ("max_inflight_plans", c_int32),
        ("log_level", c_int32),
        ("log_sink", LOG_SINK),
        ("log_sink_user_data", c_void_p),
        ("num_q_heads", c_int32),
        ("enable_kv_events", c_int32),
        ("kv_events_queue_capacity", c_int32),
        ("kv_events_endpoint", c_char_p),
        ("kv_events_replay_endpoint", c_char_p),
        ("kv_events_topic", c_char_p),
        ("kv_events_replay_batches", c_int32),
        ("kv_events_data_parallel_rank", c_int32),
        ("scale_placement", c_int32),
        ("graph_max_tokens", c_int32),
        # Layer groups (kvcache_layer_group); the Python package leaves them
        # unset: one uniform group.
        ("num_layer_groups", c_int32),
        ("layer_groups", POINTER(LayerGroup)),
        ("host_tier_bytes", c_int64),
        ("tier_offload_min_hits", c_int32),
        ("tier_offload_max_in_flight_bytes", c_int64),
        ("tier_hold_offloads", c_int32),
        ("tier_offload_ahead_blocks", c_int64),
        ("tier_copy_thread_blocks", c_int32),
    ]


class Tensor(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("data", c_void_p),
        ("dtype", c_int32),
        ("ndim", c_int32),
        ("shape", c_int64 * 4),
        ("strides", c_int64 * 4),
        ("memory", c_int32),
        ("device", c_int32),
    ]


class ReserveRequest(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("sequence", c_int64),
        ("num_tokens", c_int64),
        ("new_token_ids", POINTER(c_int32)),
        ("num_new_token_ids", c_int64),
    ]


class Plan(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("id", c_uint64),
        ("num_tokens", c_int64),
        ("slot_mapping", POINTER(c_int64)),
        ("host_slot_mapping", POINTER(c_int64)),
        ("num_block_copies", c_int64),
        ("graph_tokens", c_int64),
    ]


class BlockTableView(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("block_table", POINTER(c_int32)),
        ("seq_lens", POINTER(c_int32)),
        ("num_sequences", c_int32),
        ("max_blocks", c_int32),
        ("row_stride", c_int32),
    ]


class LayerView(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("key_cache", c_void_p),
        ("value_cache", c_void_p),
        ("key_scale", c_void_p),
        ("value_scale", c_void_p),
        ("cache_dtype", c_int32),
        ("memory", c_int32),
        ("device", c_int32),
        ("num_blocks", c_int64),
        ("block_size", c_int64),
        ("num_kv_heads", c_int64),
        ("head_size", c_int64),
        ("head_size_v", c_int64),
        ("key_strides", c_int64 * 4),
        ("value_strides", c_int64 * 4),
        ("scale_strides", c_int64 * 3),
        ("scale_placement", c_int32),
        ("key_row_pitch_bytes", c_int64),
        ("value_row_pitch_bytes", c_int64),
        ("scale_byte_offset", c_int64),
    ]


class Metrics(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("blocks_total", c_int64),
        ("blocks_free", c_int64),
        ("blocks_cached", c_int64),
        ("blocks_in_use", c_int64),
        ("usage", c_double),
        ("sequences", c_int64),
        ("plans_in_flight", c_int64),
        ("prefix_queries", c_int64),
        ("prefix_query_tokens", c_int64),
        ("prefix_hit_tokens", c_int64),
        ("evictions", c_int64),
        ("tokens_appended", c_int64),
        ("tokens_committed", c_int64),
        ("kernel_launches", c_int64),
        ("reserve_failures", c_int64),
        ("block_copies", c_int64),
        ("kv_event_batches", c_int64),
        ("kv_event_batches_dropped", c_int64),
        ("kv_event_batches_unpublished", c_int64),
        ("host_tier_blocks_total", c_int64),
        ("host_tier_blocks_stored", c_int64),
        ("prefix_hit_tokens_device", c_int64),
        ("prefix_hit_tokens_host", c_int64),
        ("host_tier_evictions", c_int64),
        ("tier_offloads", c_int64),
        ("tier_onboards", c_int64),
        ("tier_offload_bytes", c_int64),
        ("tier_onboard_bytes", c_int64),
        ("tier_copy_failures", c_int64),
        ("tier_offloads_skipped", c_int64),
        ("tier_offloads_unselected", c_int64),
        ("tier_offloads_waited", c_int64),
        ("tier_offload_ahead_copies", c_int64),
        ("tier_offloads_ahead", c_int64),
        ("tier_offloads_kept", c_int64),
        ("tier_evictions_deferred", c_int64),
    ]


class PrefixHits(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("device_tokens", c_int64),
        ("host_tokens", c_int64),
    ]


# The C name of each struct above (the layout test's map).
class AttentionOptions(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("softmax_scale", c_float),
        ("soft_cap", c_float),
        ("window", c_int32),
        ("num_query_tokens_per_sequence", c_int32),
    ]


class Shortfall(Structure):
    _fields_ = [
        ("blocks_needed", c_int64),
        ("blocks_free", c_int64),
        ("blocks_evictable", c_int64),
        ("blocks_total", c_int64),
        ("never_fits", c_int32),
    ]


class Event(Structure):
    _fields_ = [
        ("type", c_int32),
        ("medium", c_int32),
        ("block_hashes", POINTER(c_uint64)),
        ("num_block_hashes", c_int64),
        ("has_parent", c_int32),
        ("parent_block_hash", c_uint64),
        ("token_ids", POINTER(c_int32)),
        ("num_token_ids", c_int64),
        ("block_size", c_int32),
        ("adapter_id", c_int64),
    ]


class EventBatch(Structure):
    _fields_ = [
        ("sequence", c_uint64),
        ("timestamp", c_double),
        ("events", POINTER(Event)),
        ("num_events", c_int64),
    ]


class Events(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("batches", POINTER(EventBatch)),
        ("num_batches", c_int64),
        ("owner", c_void_p),
    ]


class GraphStepInputs(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("slot_mapping", POINTER(c_int64)),
        ("positions", POINTER(c_int64)),
        ("seq_lens", POINTER(c_int32)),
        ("block_table", POINTER(c_int32)),
        ("max_tokens", c_int64),
        ("max_sequences", c_int32),
        ("row_stride", c_int32),
    ]


class GatherRequest(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("sequence", c_int64),
        ("token_begin", c_int64),
        ("num_tokens", c_int64),
    ]


C_STRUCTS = {
    "kvcache_event": Event,
    "kvcache_event_batch": EventBatch,
    "kvcache_events": Events,
    "kvcache_graph_step_inputs": GraphStepInputs,
    "kvcache_gather_request": GatherRequest,
    "kvcache_attention_options": AttentionOptions,
    "kvcache_shortfall": Shortfall,
    "kvcache_config": Config,
    "kvcache_layer_group": LayerGroup,
    "kvcache_tensor": Tensor,
    "kvcache_reserve_request": ReserveRequest,
    "kvcache_plan": Plan,
    "kvcache_block_table_view": BlockTableView,
    "kvcache_layer_view": LayerView,
    "kvcache_metrics": Metrics,
    "kvcache_prefix_hits": PrefixHits,
}

_M = c_void_p  # kvcache_manager*
_S = c_int32  # kvcache_status

# name: (restype, argtypes)
_FUNCTIONS = {
    "kvcache_version": (c_char_p, []),
    "kvcache_config_init": (None, [POINTER(Config)]),
    "kvcache_config_block_bytes": (_S, [POINTER(Config), POINTER(c_int64)]),
    "kvcache_status_name": (c_char_p, [c_int32]),
    "kvcache_create": (_S, [POINTER(Config), POINTER(c_void_p)]),
    "kvcache_last_create_error": (c_char_p, []),
    "kvcache_destroy": (None, [_M]),
    "kvcache_last_error": (c_char_p, [_M]),
    "kvcache_add_sequence": (_S, [_M, c_int64, POINTER(c_int32), c_int64, c_int64,
                                  POINTER(c_uint8), c_size_t, POINTER(c_int64)]),
    "kvcache_add_sequence_hits": (_S, [_M, c_int64, POINTER(c_int32), c_int64, c_int64,
                                       POINTER(c_uint8), c_size_t, POINTER(c_int64),
                                       POINTER(PrefixHits)]),
    "kvcache_reserve": (_S, [_M, POINTER(ReserveRequest), c_int64, c_void_p, POINTER(Plan)]),
    "kvcache_can_reserve": (_S, [_M, POINTER(ReserveRequest), c_int64]),
    "kvcache_append": (_S, [_M, c_uint64, c_int32, POINTER(Tensor), POINTER(Tensor), c_void_p]),
    "kvcache_append_dlpack": (_S, [_M, c_uint64, c_int32, POINTER(DLTensor), POINTER(DLTensor),
                                   c_void_p]),
    "kvcache_commit": (_S, [_M, c_uint64]),
    "kvcache_abort": (_S, [_M, c_uint64]),
    "kvcache_fork": (_S, [_M, c_int64, c_int64]),
    "kvcache_free": (_S, [_M, c_int64]),
    "kvcache_block_table": (_S, [_M, c_int64, POINTER(c_int32), c_int64, POINTER(c_int64)]),
    "kvcache_sequence_length": (_S, [_M, c_int64, POINTER(c_int64)]),
    "kvcache_prefix_loaded": (_S, [_M, c_int64, POINTER(c_int32)]),
    "kvcache_batch_block_table": (_S, [_M, POINTER(c_int64), c_int64, c_void_p,
                                       POINTER(BlockTableView)]),
    "kvcache_get_layer_view": (_S, [_M, c_int32, POINTER(LayerView)]),
    "kvcache_num_block_tables": (_S, [_M, POINTER(c_int32)]),
    "kvcache_layer_block_table": (_S, [_M, c_int32, POINTER(c_int32)]),
    "kvcache_group_block_table": (_S, [_M, c_int64, c_int32, POINTER(c_int32), c_int64,
                                       POINTER(c_int64)]),
    "kvcache_group_batch_block_table": (_S, [_M, c_int32, POINTER(c_int64), c_int64, c_void_p,
                                             POINTER(BlockTableView)]),
    "kvcache_held_blocks": (_S, [_M, c_int32, POINTER(c_int64)]),
    "kvcache_gather": (_S, [_M, c_int64, c_int32, c_int64, c_int64, POINTER(Tensor),
                            POINTER(Tensor), c_void_p]),
    "kvcache_gather_dlpack": (_S, [_M, c_int64, c_int32, c_int64, c_int64, POINTER(DLTensor),
                                   POINTER(DLTensor), c_void_p]),
    "kvcache_tokens_that_fit": (_S, [_M, c_int64, POINTER(c_int64)]),
    "kvcache_get_metrics": (_S, [_M, POINTER(Metrics)]),
    "kvcache_metrics_text": (c_size_t, [_M, c_char_p, c_size_t]),
    "kvcache_validate": (_S, [_M]),
    "kvcache_take_events": (_S, [_M, POINTER(Events)]),
    "kvcache_events_free": (None, [POINTER(Events)]),
    "kvcache_reset_prefix_cache": (_S, [_M]),
}


def _candidates():
    env = os.environ.get("KVCACHE_LIBRARY")
    if env:
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("libkvcache.so", "libkvcache.so.1"):
        yield os.path.join(here, name)  # Shipped next to the package.
        # An install prefix: PREFIX/lib/python3/dist-packages/kvcache or PREFIX/python/kvcache.
        for up in ("../../..", "../..", ".."):
            yield os.path.normpath(os.path.join(here, up, "lib", name))
    found = ctypes.util.find_library("kvcache")
    if found:
        yield found


def load_library():
    """Loads libkvcache.so: $KVCACHE_LIBRARY, else next to this package or in an install prefix
    above it, else the system's library path. Declares every function's signature."""
    errors = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            errors.append(f"{path}: {e}")
    else:
        raise OSError("libkvcache.so not found (set KVCACHE_LIBRARY to its path, or install it "
                      "with `bazel run -c opt //:install -- PREFIX`)" +
                      (": " + "; ".join(errors) if errors else ""))
    for name, (restype, argtypes) in _FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib
