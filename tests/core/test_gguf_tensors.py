"""The token embedding rows of a GGUF file, located by ggml's own parser, are gguf's reader's rows."""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from specrouter.core import catalog
from specrouter.core.gguf_tensors import GGUFError, embedding_rows


def _reader_rows(path: Path):
    (table,) = [t for t in GGUFReader(path).tensors if t.name == "token_embd.weight"]
    return table


@pytest.mark.parametrize("which", ["smollm2-135m (quantised)", "tiny target (F32)"])
def test_embedding_rows_are_the_tensor_gguf_reads(which, tiny_gguf_dirs):
    path = catalog.prepare_gguf("smollm2-135m") if which.startswith("smollm2") else Path(tiny_gguf_dirs["target"]) / "model.gguf"
    rows, qtype = embedding_rows(path)
    table = _reader_rows(path)
    assert qtype == table.tensor_type and rows.shape[0] == table.shape[-1]  # gguf lists shapes innermost first
    ids = np.array([0, 17, rows.shape[0] - 1])
    assert np.array_equal(dequantize(rows[ids], qtype), dequantize(table.data[ids], table.tensor_type))
    assert np.array_equal(rows, np.asarray(table.data).view(np.uint8).reshape(rows.shape))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        embedding_rows(path)
