"""Compiled CPU kernels: packed-weight matrix-vector products for decode steps, and attention.

A decode step of smollm2-135m at 4,000 tokens of context spends its time reading memory: 537 MB of
fp32 weights through torch's matmul and 184 MB of cached keys and values through SDPA, whose CPU
kernels took 2.5-4x as long as a plain read of K and V for the 3 query rows of a step
(`scripts/probes/decode_kernels.py`). `pml_kernels.c` does both with fewer bytes or fewer passes:

- `matvec`: y = W x for a few input rows, W held in the GGUF block format the weights came from
  (Q4_1: 0.75 bytes a weight as stored here, Q8_0: 1.125, against 4 in fp32). The values are
  exactly the fp32 weights (`attention_store.kernels.packed` checks every row at load);
- `decode_attention`: up to `DECODE_ROWS` query rows per key/value head over a preallocated
  cache, one pass over K and one over V: tiles of a few rows for a plain step, rows in vector
  lanes from 16 rows (a packed batch's step);
- `flash_attention`: more rows (prefills, a packed batch's prefill): blocks of keys with an online
  softmax, scores from the same lanes tiles (with AVX-512VL; from transposed key panels
  otherwise), so scores stay in cache (faster than SDPA's flash kernel from about 48 rows).

Results equal torch's up to the order of summation (a few 1e-7 relative, as between two BLAS
libraries); tests compare them.

The library is plain C, compiled at first use with the system C compiler (`$CC`, else `cc`) into
`cache_dir()/kernels/` under a name that hashes the source, the flags, the compiler and the CPU's
feature flags, and loaded with ctypes: no build step at install, no torch headers. It uses AVX2 and
FMA where the CPU has them and plain C elsewhere.

`PML_KERNELS` chooses: `auto` (default: use them when they build, else torch's kernels, with a
warning saying why), `on` (an error if they cannot be built), `off` (torch's kernels only).
`status()` says which is in use (reported by `pml run --json` as `kernels`); `disabled()` turns them
off within a block (the speed benchmark's "before" path).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

from attention_store.paths import cache_dir

log = logging.getLogger(__name__)

ENV = "PML_KERNELS"
MODES = ("auto", "on", "off")
SOURCE = Path(__file__).with_name("pml_kernels.c")
ABI = 4  # pml_kernels_abi() of the source this loader speaks to
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")
BLOCK_WEIGHTS = 32  # weights per block in Q4_1 and Q8_0
# Query rows per key/value head up to which attention runs `decode_attention` (one pass over K and
# V); more rows run `flash_attention` (key blocks, online softmax). With each layer's K/V cold, as
# in a real step, `python scripts/probes/decode_kernels.py` measured (ms, 30 layers, two runs):
# 3 rows 14.1 vs 32.6 and 16.3 vs 38.5; 24 rows (a packed batch's step) 42.1 vs 49.8 and 61.7 vs
# 57.2 (even); 48 rows 86.7 vs 85.4 and 99.9 vs 77.4; 117 rows 213.8 vs 162.0 and 221.3 vs 156.6.
# With rows in vector lanes in both (one run): 3 rows 12.5 vs 24.6, 24 rows 32.3 vs 37.9, 48 rows
# 59.1 vs 64.6, 117 rows 145.8 vs 142.2; the bound stays where both runs agree.
DECODE_ROWS = 32
SIMD_NAMES = {0: "off", 1: "AVX2", 2: "AVX2 + AVX-512"}  # pml_kernels_simd()
BLOCK_BYTES = {"q4_1": 24, "q8_0": 36}  # a block as laid out here (fp32 scales); checked against the library

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # set once building or loading failed (or the mode is off)
_local = threading.local()  # .off: disabled() in this thread


class KernelError(RuntimeError):
    """`PML_KERNELS` is not a mode, or is `on` and the kernels cannot be built or loaded."""


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise KernelError(f"{ENV} must be one of {', '.join(MODES)}, not {value!r}")
    return value


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def _build(cc: str) -> Path:
    """Compile `SOURCE` once per (source, flags, compiler, CPU); returns the shared library's path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
        SOURCE.read_bytes(), " ".join(FLAGS), version, _cpu_flags(), platform.machine()))).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"pml_kernels-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = [cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"]
    log.info("building decode kernels: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a concurrent builder renames an identical file
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    for name in ("pml_q4_1_matvec", "pml_q8_0_matvec"):
        getattr(lib, name).argtypes = [p, p, p, p, i64, i64, i64, i32]
        getattr(lib, name).restype = None
    for name in ("pml_q4_1_dequantize", "pml_q8_0_dequantize"):
        getattr(lib, name).argtypes = [p, p, i64]
        getattr(lib, name).restype = None
    lib.pml_decode_attention.argtypes = [p, p, p, p, p] + [i64] * 15 + [f32, i32]
    lib.pml_flash_attention.argtypes = [p, p, p, p, p] + [i64] * 16 + [f32, i32]  # + causal
    for name in ("pml_decode_attention", "pml_flash_attention"):
        getattr(lib, name).restype = None


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it the first time; None when not in use (see `status`)."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    with _lock:
        if _lib is not None or _why_not is not None:
            return _lib
        chosen = mode()
        if chosen == "off":
            _why_not = f"{ENV}=off"
            return None
        try:
            cc = _compiler()
            if cc is None:
                raise OSError("no C compiler found (set CC, or install gcc)")
            path = _build(cc)
            lib = ctypes.CDLL(str(path))
            if lib.pml_kernels_abi() != ABI:
                raise OSError(f"library ABI {lib.pml_kernels_abi()} != {ABI}")
            sizes = {"q4_1": lib.pml_q4_1_block_bytes(), "q8_0": lib.pml_q8_0_block_bytes()}
            if sizes != BLOCK_BYTES:
                raise OSError(f"block sizes {sizes} != {BLOCK_BYTES}")
            _declare(lib)
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            _why_not = f"could not build the C kernels: {e}"
            if chosen == "on":
                raise KernelError(f"{ENV}=on but {_why_not}") from e
            log.warning("%s; decoding uses torch's kernels (slower, same results up to summation order)", _why_not)
            return None
        _lib = lib
        log.info("decode kernels: %s (SIMD %s)", path.name, SIMD_NAMES.get(lib.pml_kernels_simd(), "off"))
        return _lib


def active() -> bool:
    """Whether the kernels are used right now (built, and not `disabled()` in this thread)."""
    return not getattr(_local, "off", False) and library() is not None


def status() -> str:
    """`"c"` when the kernels are in use, else `"torch (<why>)"`."""
    if getattr(_local, "off", False):
        return "torch (disabled)"
    return "c" if library() is not None else f"torch ({_why_not})"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the block with torch's kernels only (in this thread)."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before
