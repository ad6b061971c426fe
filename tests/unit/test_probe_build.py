"""The probe guest build: an ELF64 loaded at 16 MiB, cached by a hash of its sources."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from images import probe_build

# ELF64 header and program header fields (System V ABI, ELF-64 object file format).
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PROGRAM_HEADER_FORMAT = "<IIQQQQQQ"

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="gcc is not installed; it builds the probe guest"
)


def load_segments(image: bytes) -> list[tuple[int, int, int, int]]:
    """Return (p_vaddr, p_paddr, p_filesz, p_memsz) of each PT_LOAD header."""
    (e_phoff,) = struct.unpack_from("<Q", image, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", image, 54)
    segments = []
    for index in range(e_phnum):
        fields = struct.unpack_from(PROGRAM_HEADER_FORMAT, image, e_phoff + index * e_phentsize)
        p_type, _, _, p_vaddr, p_paddr, p_filesz, p_memsz, _ = fields
        if p_type == PT_LOAD:
            segments.append((p_vaddr, p_paddr, p_filesz, p_memsz))
    return segments


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VMM_IMAGES_CACHE", str(cache))
    return cache


def test_build_produces_elf64_loaded_at_16_mib(fresh_cache: Path) -> None:
    elf = probe_build.build_probe()
    assert elf.is_relative_to(fresh_cache)
    image = elf.read_bytes()
    assert image[:4] == ELF_MAGIC
    assert image[4] == ELFCLASS64
    assert image[5] == ELFDATA2LSB
    e_type, e_machine = struct.unpack_from("<HH", image, 16)
    (e_entry,) = struct.unpack_from("<Q", image, 24)
    assert e_type == ET_EXEC
    assert e_machine == EM_X86_64
    segments = load_segments(image)
    assert segments, "no PT_LOAD segment"
    first_vaddr, first_paddr, first_filesz, _ = segments[0]
    assert first_paddr == probe_build.LOAD_ADDRESS
    assert first_vaddr == probe_build.LOAD_ADDRESS
    assert first_filesz > 0
    assert first_paddr <= e_entry < first_paddr + first_filesz


def test_build_is_cached(fresh_cache: Path) -> None:
    first = probe_build.build_probe()
    stamp = first.stat().st_mtime_ns
    second = probe_build.build_probe()
    assert second == first
    assert second.stat().st_mtime_ns == stamp


def test_cache_key_changes_when_a_source_changes(tmp_path: Path) -> None:
    sources = []
    for source in probe_build.probe_sources():
        copy = tmp_path / source.name
        shutil.copyfile(source, copy)
        sources.append(copy)
    before = probe_build.probe_key(sources)
    assert probe_build.probe_key(sources) == before
    shell = tmp_path / "shell.c"
    shell.write_text(shell.read_text() + "\n/* changed */\n")
    assert probe_build.probe_key(sources) != before


def test_sources_include_entry_and_linker_script() -> None:
    names = {path.name for path in probe_build.probe_sources()}
    assert {"start.S", "probe.ld", "probe.h", "shell.c"} <= names


def test_images_cli_prints_probe_path(fresh_cache: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from images.__main__ import main

    assert main(["probe"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert Path(printed["probe"]) == probe_build.build_probe()
    assert Path(printed["probe"]).is_relative_to(fresh_cache)
