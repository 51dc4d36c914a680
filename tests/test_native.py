"""The native library on the CPU side: build output, exported symbols, embedded GPU targets, and the
binding's behaviour without a library or without a GPU (a warning, never a crash)."""
import ctypes
import re
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from nunchaku_lite import native

REPO = Path(__file__).resolve().parent.parent
HEADER = REPO / "native" / "nunchaku_lite.h"
TARGETS = {80, 86, 89, 90}


def _declared_functions() -> set[str]:
    return set(re.findall(r"\b(nl_\w+)\s*\(", native.cdef_source(HEADER)))


@pytest.fixture
def built_lib() -> Path:
    if not native.LIB_PATH.is_file():
        pytest.skip(f"native library not built ({native.LIB_PATH}); run `make`")
    return native.LIB_PATH


def test_header_declares_the_documented_api():
    funcs = _declared_functions()
    assert {"nl_last_error", "nl_version", "nl_default_path", "nl_quantize_act", "nl_repack_weight",
            "nl_w4a4_gemm", "nl_w4a16_gemm", "nl_w4a4_gemm_fp8", "nl_w4a4_gemm_fp8_pow2",
            "nl_w4a4_gemm_fp8_gelu_quantize", "nl_repack_weight_sm90", "nl_w4a4_gemm_s8", "nl_act_stats",
            "nl_layernorm_quantize_act"} <= funcs
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(native.cdef_source(HEADER))  # the CDEF block is plain C that cffi parses
    assert ffi.typeof("int(*)(const void *, int, int64_t, int64_t, int64_t, const float *, float, int, "
                      "const void *, int, int, uint8_t *, float *, int64_t, float *, void *)") is not None
    cdef = " ".join(native.cdef_source(HEADER).split())
    assert "const void *lora_down, int rank, int layout, uint8_t *codes" in cdef  # both quantize entry points


def test_library_exports_every_declared_symbol(built_lib):
    lib = ctypes.CDLL(str(built_lib))  # loads without a GPU: the CUDA runtime is linked statically
    missing = [f for f in _declared_functions() if not hasattr(lib, f)]
    assert not missing
    if shutil.which("nm"):
        out = subprocess.run(["nm", "-D", "--defined-only", str(built_lib)], capture_output=True, text=True).stdout
        exported = set(re.findall(r" T (nl_\w+)", out))
        assert _declared_functions() <= exported


def test_library_abi_version_matches_the_binding(built_lib):
    """The binding loads only a library of its own ABI version (a stale build with the same symbols and other
    meanings, e.g. smooth where 1/smooth is expected, must not be called)."""
    assert f"nl_version(void) {{ return {native.ABI_VERSION}; }}" in (REPO / "native" / "api.cu").read_text()
    lib = ctypes.CDLL(str(built_lib))
    assert lib.nl_version() == native.ABI_VERSION


def test_a_library_of_another_abi_version_is_refused(monkeypatch):
    class StaleLib:
        def nl_version(self):
            return native.ABI_VERSION - 1

    class FakeFFI:
        def cdef(self, source):
            pass

        def dlopen(self, path):
            return StaleLib()

    import cffi
    monkeypatch.setattr(cffi, "FFI", FakeFFI)
    monkeypatch.setattr(native, "LIB_PATH", Path(__file__))  # any existing file
    monkeypatch.setattr(native, "_state", {})
    assert native._load() is None
    assert f"needs {native.ABI_VERSION}" in native.library_error() and "make" in native.library_error()


def _fatbin_archs(path: Path) -> set[int]:
    """SM versions of the cubins in the library's .nv_fatbin section (ELF + fatbin headers, little endian)."""
    data = path.read_bytes()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = secs[shstrndx][4]
    name = lambda s: data[names_off + s[0]: data.index(b"\0", names_off + s[0])].decode()
    fat = next((s for s in secs if name(s) == ".nv_fatbin"), None)
    assert fat is not None, "no .nv_fatbin section: the library holds no GPU code"
    archs, p, end = set(), fat[4], fat[4] + fat[5]
    while p + 16 <= end:
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, p)
        if magic != 0xBA55ED50:  # fatbin headers are 8-byte aligned
            p += 8
            continue
        q, stop = p + hsize, p + hsize + fsize
        while q < stop:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, q)
            if kind == 2:  # ELF (cubin); 1 would be PTX
                archs.add(struct.unpack_from("<I", data, q + 28)[0])
            q += ehsize + psize
        p = stop
    return archs


def test_library_contains_code_for_all_targets(built_lib):
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:
        out = subprocess.run([cuobjdump, "--list-elf", str(built_lib)], capture_output=True, text=True).stdout
        found = {int(a) for a in re.findall(r"sm_(\d+)a?\b", out)}
    else:
        found = _fatbin_archs(built_lib)
    assert TARGETS <= found, f"missing targets: {sorted(TARGETS - found)}"


def test_make_without_nvcc_skips_with_one_line():
    if not shutil.which("make"):
        pytest.skip("make not installed")
    r = subprocess.run(["make", "--no-print-directory", "-C", str(REPO / "native"), "NVCC="],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1 and "nvcc not found" in lines[0]


def _fresh_state(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_warned", set())


def test_missing_library_warns_and_reports(monkeypatch, tmp_path):
    _fresh_state(monkeypatch)
    monkeypatch.setattr(native, "LIB_PATH", tmp_path / "libnunchaku_lite.so")
    with pytest.warns(RuntimeWarning, match="not found"):
        assert native.available() is False
    assert "not found" in native.library_error()
    with pytest.raises(native.NativeError, match="unavailable"):
        native.quantize_act(torch.zeros(1, 64))


def test_broken_library_warns_not_crashes(monkeypatch, tmp_path):
    _fresh_state(monkeypatch)
    bad = tmp_path / "libnunchaku_lite.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setattr(native, "LIB_PATH", bad)
    with pytest.warns(RuntimeWarning, match="could not load"):
        assert native.available() is False


def test_no_gpu_gives_a_warning(monkeypatch, built_lib):
    _fresh_state(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        assert native.available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert native.available() is False


def test_error_codes_become_exceptions(built_lib, monkeypatch):
    _fresh_state(monkeypatch)
    lib, ffi = native._lib()
    # argument errors are detected before any CUDA call, so they work without a GPU
    rc = lib.nl_repack_weight(ffi.NULL, 100, 64, ffi.NULL, ffi.NULL)
    assert rc == 1 and b"nl_repack_weight: N=100" in ffi.string(lib.nl_last_error())
    with pytest.raises(ValueError, match="nl_w4a4_gemm: K=100"):
        native._call("nl_w4a4_gemm", ffi.NULL, ffi.NULL, 128, 0, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 1, 0,
                     ffi.NULL, ffi.NULL, 1, 128, 1, 128, 100, 0, 0, 0, ffi.NULL)


def test_python_checks_name_the_argument():
    with pytest.raises(ValueError, match="quantize_act: x must be on a CUDA device"):
        native._check(torch.zeros(2, 64), "x", "quantize_act")


@pytest.mark.parametrize("zeros", [False, True])
def test_w4a16_dense_path_matches_reference(zeros):
    """Many rows go through dequantize-to-16-bit + matmul (pure torch, so it runs here on the CPU)."""
    from nunchaku_lite.quant import ops
    gen = torch.Generator().manual_seed(5)
    n, k, m = 1500, 256, 40  # n > DEQUANT_ROWS: two chunks
    codes = torch.randint(0 if zeros else -8, 16 if zeros else 8, (n, k), generator=gen, dtype=torch.int16)
    qweight = ops.pack_int4(codes)
    wscales = (torch.rand(n, k // 64, generator=gen) * 0.02).float()
    wzeros = -7 * wscales if zeros else None
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    prep = native.PreparedW4A16(qweight, wscales, wzeros, bias, n, k)
    y = native._w4a16_dense(x, prep)
    ref = ops.w4a16_linear(x, qweight, wscales, bias, wzeros).float()
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
