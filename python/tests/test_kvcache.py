"""Tests of the Python package (issue #19), with Debian's python3 and numpy on the CPU backend, or
with torch on CUDA tensors (KVCACHE_TEST_BACKEND=cuda; skipped cleanly without torch or a GPU).

Environment: KVCACHE_LIBRARY (libkvcache.so), KVCACHE_HEADER (api/kvcache_c.h, for the struct
layout check, which needs a C compiler), KVCACHE_REFERENCE_DUMP (the reference_dump binary, for
the cache-bytes check against the C++ run). tests/run_python_tests.sh sets them.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

import kvcache
from kvcache import _dlpack, _ffi

BACKEND = os.environ.get("KVCACHE_TEST_BACKEND", "cpu")


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


torch = _torch_cuda() if BACKEND == "cuda" else None
if BACKEND == "cuda" and torch is None:
    print("test_kvcache: KVCACHE_TEST_BACKEND=cuda but torch with CUDA is not available: the "
          "backend tests skip", file=sys.stderr)


class Backend:
    """Creates inputs and outputs as numpy arrays (CPU) or torch CUDA tensors."""

    def __init__(self, name):
        self.name = name
        self.c_backend = kvcache.CUDA if name == "cuda" else kvcache.CPU

    def tensor(self, array):
        array = np.ascontiguousarray(array)
        return torch.from_numpy(array).to("cuda") if self.name == "cuda" else array

    def empty(self, shape):
        if self.name == "cuda":
            return torch.zeros(shape, dtype=torch.float32, device="cuda")
        return np.zeros(shape, np.float32)

    def numpy(self, x):
        if self.name == "cuda":
            return torch.from_dlpack(x).cpu().numpy() if not hasattr(x, "cpu") else x.cpu().numpy()
        return np.from_dlpack(x)

    def slice_kv(self, qkv, heads, head_size):
        """K and V as strided slices of a fused QKV [T, 3 * H * D] (no copy)."""
        t = qkv.shape[0]
        k = qkv[:, heads * head_size:2 * heads * head_size].reshape(t, heads, head_size)
        v = qkv[:, 2 * heads * head_size:].reshape(t, heads, head_size)
        return k, v


B = Backend(BACKEND)


def needs_backend(test):
    return unittest.skipIf(BACKEND == "cuda" and torch is None, "torch with CUDA not available")(
        test)


def make(**overrides):
    config = dict(num_layers=2, num_kv_heads=2, head_size=16, block_size=4, num_blocks=16,
                  cache_dtype=kvcache.INT8, input_dtype=kvcache.FLOAT32, backend=B.c_backend)
    config.update(overrides)
    return kvcache.Manager(**config)


def reference_input(seq, pos, layer, heads=2, head_size=16):
    """reference_dump.cc's Input(): K and V rows [H, D] of one token."""
    h = np.arange(heads).reshape(heads, 1)
    d = np.arange(head_size).reshape(1, head_size)
    base = seq * 7 + pos * 31 + layer * 131 + h * 17 + d * 5
    k = ((base % 255) - 127).astype(np.float32) / np.float32(32)
    v = (((base + 3) % 255) - 127).astype(np.float32) / np.float32(32)
    return k, v


class StructLayoutTest(unittest.TestCase):
    """Every struct of kvcache_c.h is defined once in _ffi with the same fields, sizes and
    offsets (a C program generated from the header prints them)."""

    def test_structs_match_the_header(self):
        header = os.environ.get("KVCACHE_HEADER")
        cc = shutil.which("cc") or shutil.which("gcc")
        if not header or not cc:
            self.skipTest("needs KVCACHE_HEADER and a C compiler")
        with open(header) as f:
            text = f.read()
        structs = {}
        for name, body in re.findall(r"typedef struct (kvcache_\w+) \{(.*?)\} \1;", text, re.S):
            body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
            fields = [re.findall(r"(\w+)\s*(?:\[\d+\])?\s*$", decl.strip())[0]
                      for decl in body.split(";") if decl.strip()]
            structs[name] = fields
        self.assertEqual(sorted(structs), sorted(_ffi.C_STRUCTS))
        lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "kvcache_c.h"',
                 "int main(void) {"]
        for name, fields in structs.items():
            lines.append(f'  printf("{name} %zu\\n", sizeof({name}));')
            for f in fields:
                lines.append(f'  printf("{name}.{f} %zu\\n", offsetof({name}, {f}));')
        lines += ["  return 0;", "}"]
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "layout.c")
            with open(src, "w") as out:
                out.write("\n".join(lines))
            exe = os.path.join(tmp, "layout")
            include = [f"-I{os.path.dirname(header)}"]
            if os.environ.get("KVCACHE_DLPACK_INCLUDE"):
                include.append(f"-I{os.environ['KVCACHE_DLPACK_INCLUDE']}")
            subprocess.run([cc, "-std=c11", *include, src, "-o", exe], check=True)
            printed = dict(line.split() for line in
                           subprocess.run([exe], check=True, capture_output=True,
                                          text=True).stdout.splitlines())
        for name, fields in structs.items():
            py = _ffi.C_STRUCTS[name]
            self.assertEqual([f for f, _ in py._fields_], fields, name)
            self.assertEqual(ctypes.sizeof(py), int(printed[name]), name)
            for f in fields:
                self.assertEqual(getattr(py, f).offset, int(printed[f"{name}.{f}"]), f"{name}.{f}")


class ManagerTest(unittest.TestCase):
    @needs_backend
    def test_engine_loop_with_fused_qkv_slices(self):
        rng = np.random.default_rng(19)
        with make(num_layers=3) as m:
            prompts = {1: list(range(10)), 2: list(range(50, 57))}
            computed = {s: m.add_sequence(s, p) for s, p in prompts.items()}
            self.assertEqual(computed, {1: 0, 2: 0})
            plan = m.reserve([(s, len(p) - computed[s]) for s, p in prompts.items()])
            self.assertEqual(plan.num_tokens, 17)
            self.assertEqual(len(plan.host_slot_mapping), 17)
            self.assertEqual(len(set(plan.host_slot_mapping)), 17)
            inputs = []
            for layer in range(3):
                qkv = B.tensor(rng.standard_normal((17, 3 * 2 * 16)).astype(np.float32))
                k, v = B.slice_kv(qkv, 2, 16)
                m.append(plan, layer, k, v)
                inputs.append((B.numpy(k), B.numpy(v)))
            m.commit(plan)
            # A decode step: the sampled token goes in with the reservation.
            step = m.reserve([(1, 1, [99]), (2, 1, [98])])
            for layer in range(3):
                m.append(step, layer, B.tensor(np.ones((2, 2, 16), np.float32)),
                         B.tensor(np.ones((2, 2, 16), np.float32)))
            m.commit(step)
            self.assertEqual(m.sequence_length(1), 11)
            self.assertTrue(m.prefix_loaded(1))  # No host tier: always landed.
            with self.assertRaises(kvcache.KVCacheError):
                m.prefix_loaded(404)
            key, value = B.empty((10, 2, 16)), B.empty((10, 2, 16))
            m.gather(1, 2, 0, 10, key, value)
            k_in, v_in = inputs[2]
            for got, want in ((B.numpy(key), k_in[:10]), (B.numpy(value), v_in[:10])):
                self.assertLess(np.linalg.norm(got - want) / np.linalg.norm(want), 7e-3)
            self.assertEqual(len(m.block_table(1)), 3)
            metrics = m.metrics()
            self.assertEqual(metrics["tokens_committed"], 19)
            self.assertIn("kvcache_sequences 2", m.metrics_text())
            m.fork(1, 3)
            table = m.batch_block_table([1, 3])
            rows = B.numpy(table["block_table"])
            self.assertEqual(list(rows[0][:3]), m.block_table(1))
            self.assertEqual(list(B.numpy(table["seq_lens"])), [11, 11])
            m.free(3)
            m.validate()

    @needs_backend
    def test_kv_events(self):
        rng = np.random.default_rng()
        prompt = [int(t) for t in rng.integers(0, 50000, 9)]
        with make(enable_kv_events=True) as m:
            m.add_sequence(1, prompt)
            plan = m.reserve([(1, 9)])
            for layer in range(2):
                zeros = B.tensor(np.zeros((9, 2, 16), np.float32))
                m.append(plan, layer, zeros, zeros)
            m.commit(plan)
            batches = m.take_events()
            self.assertEqual([b["sequence"] for b in batches], [0])
            (stored,) = batches[0]["events"]
            self.assertEqual(stored["type"], "BlockStored")
            self.assertEqual(stored["medium"], "device")
            self.assertEqual(len(stored["block_hashes"]), 2)
            self.assertIsNone(stored["parent_block_hash"])
            self.assertEqual(stored["token_ids"], prompt[:8])
            self.assertEqual(m.take_events(), [])
            m.reset_prefix_cache()
            (cleared,) = m.take_events()
            self.assertEqual(cleared["sequence"], 1)
            self.assertEqual(cleared["events"][0]["type"], "AllBlocksCleared")
            self.assertEqual(m.metrics()["kv_event_batches"], 2)

    @needs_backend
    def test_errors_carry_code_and_message(self):
        with make() as m:
            with self.assertRaises(kvcache.KVCacheError) as e:
                m.free(42)
            self.assertEqual(e.exception.code, kvcache.Status.NOT_FOUND)
            self.assertIn("42", e.exception.message)
            m.add_sequence(1, range(8))
            with self.assertRaises(kvcache.KVCacheError) as e:
                m.reserve([(1, 1000)])
            self.assertEqual(e.exception.code, kvcache.Status.INVALID_ARGUMENT)
            self.assertTrue(m.can_reserve([(1, 1)]))
            plan = m.reserve([(1, 8)])
            bad = B.tensor(np.zeros((8, 3, 16), np.float32))  # 3 heads, not 2
            with self.assertRaises(kvcache.KVCacheError) as e:
                m.append(plan, 0, bad, bad)
            self.assertEqual(e.exception.code, kvcache.Status.INVALID_ARGUMENT)
            with self.assertRaises(kvcache.KVCacheError) as e:
                m.commit(plan)  # No layer appended.
            self.assertEqual(e.exception.code, kvcache.Status.FAILED_PRECONDITION)
            m.abort(plan)
            with self.assertRaises(TypeError):
                m.append(plan, 0, [1.0], [1.0])  # Not a DLPack tensor.
        with self.assertRaises(kvcache.KVCacheError) as e:
            make(head_size=12)
        self.assertIn("head_size 12", e.exception.message)
        with self.assertRaises(TypeError):
            make(no_such_field=1)

    def test_pool_full_is_resource_exhausted(self):
        with make(backend=kvcache.CPU, num_blocks=2) as m:
            # Each sequence fits the pool alone (2 blocks of 4), both together do not: not now.
            m.add_sequence(1, range(8))
            m.add_sequence(2, range(100, 108))
            self.assertFalse(m.can_reserve([(1, 8), (2, 8)]))
            with self.assertRaises(kvcache.KVCacheError) as e:
                m.reserve([(1, 8), (2, 8)])
            self.assertEqual(e.exception.code, kvcache.Status.RESOURCE_EXHAUSTED)
            # A prompt of 5 blocks never fits a pool of 2.
            with self.assertRaises(kvcache.KVCacheError) as e:
                m.add_sequence(3, range(20))
            self.assertEqual(e.exception.code, kvcache.Status.OUT_OF_RANGE)
            self.assertIn("can never fit", e.exception.message)

    def test_struct_size_mismatch_is_refused(self):
        lib = kvcache.library()
        c = _ffi.Config()
        lib.kvcache_config_init(ctypes.byref(c))
        self.assertEqual(c.struct_size, ctypes.sizeof(_ffi.Config))
        c.struct_size -= 8
        handle = ctypes.c_void_p()
        status = lib.kvcache_create(ctypes.byref(c), ctypes.byref(handle))
        self.assertEqual(status, kvcache.Status.INVALID_ARGUMENT)
        self.assertIn(b"kvcache_config.struct_size", lib.kvcache_last_error(None))

    def test_logging_quiet_by_default_and_sink(self):
        messages = []
        with make(backend=kvcache.CPU, log_sink=lambda level, text: messages.append(text)):
            pass
        self.assertEqual(messages, [])
        with make(backend=kvcache.CPU, log_level=kvcache.LogLevel.INFO,
                  log_sink=lambda level, text: messages.append((level, text))):
            pass
        self.assertEqual(len(messages), 1)
        self.assertEqual(messages[0][0], kvcache.LogLevel.INFO)
        self.assertIn("kvcache: CPU backend, 2 layers", messages[0][1])

    def test_versioned_dlpack_input(self):
        """A producer of DLPack 1.x (DLManagedTensorVersioned) is read as well as 0.x."""
        with make(backend=kvcache.CPU) as m:
            m.add_sequence(1, range(4))
            plan = m.reserve([(1, 4)])
            k = np.arange(4 * 2 * 16, dtype=np.float32).reshape(4, 2, 16) / 64
            exported = _dlpack.ExportedTensor(k, k.ctypes.data, (_ffi.DL_FLOAT, 32), k.shape,
                                              [s // 4 for s in k.strides], _ffi.DL_CPU, 0)
            capsule, _ = _dlpack.to_dltensor(exported)
            self.assertEqual(_dlpack._api.PyCapsule_GetName(capsule), b"dltensor_versioned")
            del capsule
            for layer in range(2):
                m.append(plan, layer, exported, k)
            m.commit(plan)
            out, out_v = np.zeros_like(k), np.zeros_like(k)
            m.gather(1, 0, 0, 4, out, out_v)
            self.assertLess(np.abs(out - k).max(), 0.02)
            np.testing.assert_array_equal(out, out_v)
            self.assertEqual(_dlpack._live, {})

    @needs_backend
    def test_layer_tensors_are_dlpack_views(self):
        with make() as m:
            m.add_sequence(1, range(4))
            plan = m.reserve([(1, 4)])
            for layer in range(2):
                m.append(plan, layer, B.tensor(np.full((4, 2, 16), 2.0, np.float32)),
                         B.tensor(np.full((4, 2, 16), -1.0, np.float32)))
            m.commit(plan)
            t = m.layer_tensors(1)
            key = B.numpy(t["key_cache"])
            self.assertEqual(key.shape, (16, 4, 2, 16))
            self.assertEqual(key.dtype, np.int8)
            block = m.block_table(1)[0]
            self.assertTrue((key[block] == 127).all())
            scale = B.numpy(t["key_scale"])
            np.testing.assert_allclose(scale[block], 2.0 / 127, rtol=1e-6)

    @needs_backend
    def test_inline_scales_hold_the_codes_and_scales_of_side_scales(self):
        rng = np.random.default_rng()
        k = rng.normal(size=(6, 2, 16)).astype(np.float32)
        v = rng.normal(size=(6, 2, 16)).astype(np.float32)
        got = {}
        for placement in (kvcache.SCALES_SIDE, kvcache.SCALES_INLINE):
            with make(scale_placement=placement) as m:
                m.add_sequence(1, range(6))
                plan = m.reserve([(1, 6)])
                for layer in range(2):
                    m.append(plan, layer, B.tensor(k), B.tensor(v))
                m.commit(plan)
                view = m.layer_view(0)
                t = m.layer_tensors(0)
                blocks = m.block_table(1)
                got[placement] = [np.ascontiguousarray(B.numpy(t[name])[blocks])
                                  for name in ("key_cache", "value_cache", "key_scale",
                                               "value_scale")]
                if placement == kvcache.SCALES_INLINE:
                    # 16 codes, the float32 scale at byte 16, padding to 32 bytes.
                    self.assertEqual(view.key_row_pitch_bytes, 32)
                    self.assertEqual(view.scale_byte_offset, 16)
                    self.assertEqual(tuple(view.key_strides), (4 * 2 * 32, 2 * 32, 32, 1))
                    self.assertEqual(tuple(view.scale_strides), (4 * 2 * 8, 2 * 8, 8))
        for side, inline in zip(got[kvcache.SCALES_SIDE], got[kvcache.SCALES_INLINE]):
            self.assertEqual(side.tobytes(), inline.tobytes())
        with self.assertRaises(kvcache.KVCacheError):
            make(scale_placement=kvcache.SCALES_INLINE, cache_dtype=kvcache.BFLOAT16,
                 input_dtype=kvcache.BFLOAT16)


class CacheBytesEqualTheCppRun(unittest.TestCase):
    """The cache after the same steps through this binding (numpy on the CPU, torch on CUDA)
    holds exactly the bytes of reference_dump.cc's C++ run."""

    @needs_backend
    def test_int8_and_fp8(self):
        dump = os.environ.get("KVCACHE_REFERENCE_DUMP")
        if not dump:
            self.skipTest("KVCACHE_REFERENCE_DUMP not set")
        for name, dtype in (("int8", kvcache.INT8), ("fp8", kvcache.FP8_E4M3)):
            with self.subTest(cache=name), tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "cache.bin")
                subprocess.run([dump, name, out], check=True)
                with open(out, "rb") as f:
                    want = f.read()
                got = self._python_run(dtype)
                self.assertEqual(len(got), len(want))
                self.assertTrue(got == want, f"{name}: cache bytes differ from the C++ run")

    def _python_run(self, cache_dtype):
        with make(cache_dtype=cache_dtype) as m:
            m.add_sequence(1, range(100, 110))
            m.add_sequence(2, range(200, 207))
            rows = [(1, i) for i in range(10)] + [(2, i) for i in range(7)]
            self._step(m, [(1, 10), (2, 7)], rows)
            self._step(m, [(1, 1, [110]), (2, 1, [207])], [(1, 10), (2, 7)])
            parts = []
            for layer in range(2):
                t = m.layer_tensors(layer)
                for name in ("key_cache", "value_cache", "key_scale", "value_scale"):
                    parts.append(np.ascontiguousarray(B.numpy(t[name])).tobytes())
            return b"".join(parts)

    def _step(self, m, batch, rows):
        plan = m.reserve(batch)
        for layer in range(2):
            k = np.stack([reference_input(s, p, layer)[0] for s, p in rows])
            v = np.stack([reference_input(s, p, layer)[1] for s, p in rows])
            m.append(plan, layer, B.tensor(k), B.tensor(v))
        m.commit(plan)


if __name__ == "__main__":
    print(f"test_kvcache: backend {BACKEND}, kvcache {kvcache.version()}, numpy {np.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else ""))
    unittest.main(verbosity=2)
