"""A GGUF file's token embedding matrix, memory-mapped, located with ggml's own GGUF parser (the C
library that llama-cpp-python ships, called through ctypes; nothing of llama.cpp is loaded).

ggml parses a header in milliseconds; gguf's Python `GGUFReader` builds an array view for every
tokenizer entry, seconds for a 150k-token vocabulary, which a router would pay at each start.

    rows, qtype = embedding_rows(path)   # [vocab, bytes per row] uint8, read as rows are indexed
    vectors = gguf.quants.dequantize(rows[ids], qtype)   # [len(ids), d]
"""

from __future__ import annotations

import ctypes
import functools
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class GGUFError(ValueError):
    pass


class _InitParams(ctypes.Structure):  # struct gguf_init_params
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _ggml() -> ctypes.CDLL:
    spec = find_spec("llama_cpp")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("reading GGUF files needs llama-cpp-python's ggml library: pip install llama-cpp-python")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(lib_dir.glob("libggml-base.*"))  # .so (with its versioned names) or .dylib
    if not found:
        raise GGUFError(f"no libggml-base library in {lib_dir}")
    lib = ctypes.CDLL(str(found[0]))
    ctx, i64, size, text = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_char_p
    for name, argtypes, restype in (
        ("gguf_init_from_file", [text, _InitParams], ctx),
        ("gguf_free", [ctx], None),
        ("gguf_find_key", [ctx, text], i64),
        ("gguf_get_val_str", [ctx, i64], text),
        ("gguf_get_val_u32", [ctx, i64], ctypes.c_uint32),
        ("gguf_find_tensor", [ctx, text], i64),
        ("gguf_get_data_offset", [ctx], size),
        ("gguf_get_tensor_offset", [ctx, i64], size),
        ("gguf_get_tensor_size", [ctx, i64], size),
        ("gguf_get_tensor_type", [ctx, i64], ctypes.c_int),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def embedding_rows(path: str | Path) -> tuple[np.ndarray, GGMLQuantizationType]:
    """`token_embd.weight` of a GGUF model: its rows as they lie in the file (memory-mapped uint8
    [vocab, bytes per row]) and their quantisation type."""
    lib = _ggml()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise GGUFError(f"{path}: not a GGUF file, or its header is cut short")
    try:
        arch_key = lib.gguf_find_key(ctx, b"general.architecture")
        tensor = lib.gguf_find_tensor(ctx, b"token_embd.weight")
        if arch_key < 0 or tensor < 0:
            raise GGUFError(f"{path}: no architecture or no token_embd.weight tensor")
        width_key = lib.gguf_find_key(ctx, lib.gguf_get_val_str(ctx, arch_key) + b".embedding_length")
        if width_key < 0:
            raise GGUFError(f"{path}: no embedding_length")
        width = lib.gguf_get_val_u32(ctx, width_key)
        qtype = GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, tensor))
        offset = lib.gguf_get_data_offset(ctx) + lib.gguf_get_tensor_offset(ctx, tensor)
        nbytes = lib.gguf_get_tensor_size(ctx, tensor)
    finally:
        lib.gguf_free(ctx)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    row_bytes = width // block * block_bytes
    return np.memmap(path, np.uint8, "r", offset, (nbytes // row_bytes, row_bytes)), qtype
