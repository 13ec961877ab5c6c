"""The compiled module stands alone: one wheel for every torch.

It must not depend on libtorch, libc10, libpython or a shared CUDA runtime
(the module takes plain pointers and values, so that one wheel serves
every torch). This reads the DT_NEEDED entries of the
installed ``fusedoptim._C`` straight from its ELF dynamic section.
"""

import struct
import sys

import pytest

import fusedoptim._C as _C

FORBIDDEN = ("torch", "c10", "libpython", "cudart", "libgomp", "libiomp", "libomp")


def _needed(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        pytest.skip("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(shnum):
        off = shoff + i * shentsize
        _name, sh_type, _flags, _addr, sh_offset, sh_size, sh_link = struct.unpack_from("<IIQQQQI", data, off)
        sections.append((sh_type, sh_offset, sh_size, sh_link))
    needed = []
    for sh_type, sh_offset, sh_size, sh_link in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab_off = sections[sh_link][1]
        for k in range(0, sh_size, 16):
            tag, val = struct.unpack_from("<qQ", data, sh_offset + k)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab_off + val)
                needed.append(data[strtab_off + val:end].decode())
    return needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ELF")
def test_compiled_module_links_no_torch_python_or_cuda():
    needed = _needed(_C.__file__)
    assert needed, "no DT_NEEDED entries found: the ELF reader is broken"
    assert any(n.startswith("libc.so") for n in needed), needed
    bad = [n for n in needed if any(f in n for f in FORBIDDEN)]
    assert not bad, f"fusedoptim._C depends on {bad} (all: {needed})"
