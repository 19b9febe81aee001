"""A real llama.cpp for the GGUF tests: the prebuilt `llama-cpp-py-sync` wheel, made loadable here.

Why this and not `llama-cpp-python`: pip builds llama-cpp-python from source (its PyPI release has
no CPU wheel), which took more than 50 minutes on this 2-core machine -- too slow for CI. The
`llama-cpp-py-sync==0.9982` wheel (5 MB, a test extra and installed by setup.sh with --no-deps)
carries a prebuilt libllama.so of llama.cpp (commit 0ce8cd1) with CFFI ABI-mode bindings: the
high-level `Llama` (tokenize, generate) and the whole C API, `llama_model_quantize` and the
logits included, which is all the tests need.

Its libraries were linked against glibc 2.38 but use only four symbols newer than 2.36 (the
glibc of this machine and of CI): `__isoc23_strtol/strtoul/strtoull/sscanf`, C23's spellings of
the old functions. When the system glibc is older than 2.38 we therefore (never touching
site-packages) copy the libraries to a cache directory, mark their `GLIBC_2.38` version needs
weak (VER_FLG_WEAK in .gnu.version_r, so the dynamic loader accepts a glibc without that
version), compile a four-function shim forwarding to the old functions with the system's `cc`,
load it RTLD_GLOBAL so the libraries' references resolve to it, and point the bindings at the
patched libllama.so. Without `cc` the tests that need llama.cpp skip, saying so.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["llama_cpp", "llama_cpp_unavailable", "quantize_with_llama_cpp", "logits", "FTYPES"]

_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
    va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r;
}
"""
_SHT_GNU_VERNEED = 0x6FFFFFFE
_VER_FLG_WEAK = 0x2

# llama_ftype values (llama.h) of the types the tests compare.
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


def _glibc_version() -> tuple[int, ...]:
    text = os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0"
    return tuple(int(part) for part in text.split()[-1].split("."))


def _weaken_version_needs(path: Path, version: bytes = b"GLIBC_2.38") -> int:
    """Set VER_FLG_WEAK on every `version` entry of the ELF's version needs; returns how many."""
    data = bytearray(path.read_bytes())
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size)
                for i in range(count)]
    marked = 0
    for section in sections:
        if section[1] != _SHT_GNU_VERNEED:
            continue
        strings = sections[section[6]][4]
        need = section[4]
        while True:
            _, aux_count, _, aux, next_need = struct.unpack_from("<HHIII", data, need)
            entry = need + aux
            for _ in range(aux_count):
                _, flags, _, name, next_aux = struct.unpack_from("<IHHII", data, entry)
                start = strings + name
                if bytes(data[start:data.index(b"\0", start)]) == version:
                    struct.pack_into("<H", data, entry + 4, flags | _VER_FLG_WEAK)
                    marked += 1
                entry += next_aux
            if not next_need:
                break
            need += next_need
    path.write_bytes(bytes(data))
    return marked


def _cache_root() -> Path:
    return Path(os.environ.get("QUANTFLEET_CACHE", Path.home() / ".cache" / "quantfleet"))


def _patched_libraries(package_dir: Path, version: str) -> Path:
    """A cache directory with the package's libraries, weakened, and the shim; built once."""
    target = _cache_root() / f"llama-cpp-py-sync-{version}-glibc236"
    if (target / "libisoc23.so").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        for library in package_dir.glob("lib*.so*"):
            copy = work / library.name
            shutil.copyfile(library, copy)  # follows symlinks: each name a real file
            _weaken_version_needs(copy)
        (work / "shim.c").write_text(_SHIM)
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(work / "libisoc23.so"),
                        str(work / "shim.c")], check=True, capture_output=True)
        try:
            work.rename(target)
        except OSError:  # another process built it first
            shutil.rmtree(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


@cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from llama_cpp_py_sync import _cffi_bindings
    except ImportError as error:
        return None, f"llama-cpp-py-sync is not installed ({error}); run setup.sh"
    import llama_cpp_py_sync

    if _glibc_version() < (2, 38):
        if shutil.which("cc") is None:
            return None, (f"llama-cpp-py-sync's libraries need glibc 2.38 (this is "
                          f"{os.confstr('CS_GNU_LIBC_VERSION')}) and no C compiler (cc) is there "
                          "to build the 4-function shim that stands in for it")
        package_dir = Path(_cffi_bindings.__file__).parent
        libraries = _patched_libraries(package_dir, llama_cpp_py_sync.__version__)
        ctypes.CDLL(str(libraries / "libisoc23.so"), mode=ctypes.RTLD_GLOBAL)
        _cffi_bindings._lib = _cffi_bindings.ffi.dlopen(str(libraries / "libllama.so"))
    lib = _cffi_bindings.get_lib()
    lib.llama_backend_init()
    _quiet(lib, _cffi_bindings.ffi)
    return llama_cpp_py_sync, ""


_LOG_CALLBACK: Any = None


def _quiet(lib: Any, ffi: Any) -> None:
    """Keep llama.cpp's per-tensor loading log off the test output (errors still reach stderr)."""
    global _LOG_CALLBACK
    if not hasattr(lib, "llama_log_set"):
        return
    def log(level: int, text: Any, _user: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            os.write(2, ffi.string(text))
    _LOG_CALLBACK = ffi.callback("void(int, const char *, void *)", log)
    lib.llama_log_set(ffi.cast("ggml_log_callback", _LOG_CALLBACK), ffi.NULL)


def llama_cpp_unavailable() -> str:
    """Why llama.cpp cannot be loaded here ('' when it can): a skip reason."""
    return _load()[1]


def llama_cpp() -> ModuleType:
    """The `llama_cpp_py_sync` package with a loadable libllama (call llama_cpp_unavailable first)."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def _lib() -> tuple[Any, Any]:
    llama_cpp()
    from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

    return get_lib(), get_ffi()


def quantize_with_llama_cpp(
    source: Path, target: Path, ftype: str, *, threads: int = 2, pure: bool = False
) -> None:
    """llama.cpp's own quantizer (`llama-quantize` without an importance matrix); `pure` gives every
    weight the ftype's base type (`--pure`) instead of the mix's rules."""
    lib, ffi = _lib()
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    params.pure = pure
    status = lib.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source}, {ftype}) failed with {status}")


def logits(model_path: Path, tokens: list[int], *, context: int = 512, threads: int = 2) -> np.ndarray:
    """Next-token logits (len(tokens), vocab) of a GGUF model for windows of `context` tokens;
    the first split of a split model loads them all."""
    lib, ffi = _lib()
    model_params = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(model_path).encode(), model_params)
    if model == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    try:
        context_params = lib.llama_context_default_params()
        context_params.n_ctx = context
        context_params.n_batch = context
        context_params.n_ubatch = context
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        ctx = lib.llama_init_from_model(model, context_params)
        if ctx == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not create a context for {model_path}")
        try:
            vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
            rows = []
            for start in range(0, len(tokens), context):
                window = tokens[start:start + context]
                lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
                batch = lib.llama_batch_init(len(window), 0, 1)
                try:
                    for i, token in enumerate(window):
                        batch.token[i] = token
                        batch.pos[i] = i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = 1
                    batch.n_tokens = len(window)
                    if lib.llama_decode(ctx, batch) != 0:
                        raise RuntimeError(f"llama_decode failed on {model_path}")
                    for i in range(len(window)):
                        pointer = lib.llama_get_logits_ith(ctx, i)
                        rows.append(np.frombuffer(ffi.buffer(pointer, vocab * 4), dtype=np.float32).copy())
                finally:
                    lib.llama_batch_free(batch)
            return np.stack(rows)
        finally:
            lib.llama_free(ctx)
    finally:
        lib.llama_model_free(model)
