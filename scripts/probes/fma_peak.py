"""This core's single-precision FMA peak: what the C kernels' GFLOP/s are a fraction of.

Compiles a loop of 12 independent 512-bit (or, without AVX-512F, 256-bit) fused multiply-adds with
the kernel library's compiler and `-O3 -march=native`, runs it on one core and prints GFLOP/s
(2 FLOPs per lane per FMA). No memory is touched: nothing real runs faster than this.

    python scripts/probes/fma_peak.py [--runs 3]
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import _setup  # noqa: F401 (puts the checkout on sys.path)

SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#ifdef __AVX512F__
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define LANES 16
static float total(vec a) { return _mm512_reduce_add_ps(a); }
#else
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define LANES 8
static float total(vec a) { float f[8]; _mm256_storeu_ps(f, a); return f[0] + f[7]; }
#endif
int main(void) {
  vec a[12], b = SET1(1.0000001f), c = SET1(1e-7f);
  for (int i = 0; i < 12; ++i) a[i] = SET1((float)i);
  const long n = 200000000;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = FMA(a[i], b, c);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  float r = 0.f;
  for (int i = 0; i < 12; ++i) r += total(a[i]);
  printf("%.1f GFLOP/s (%d lanes; checksum %g)\n", n * 12.0 * LANES * 2 / s / 1e9, LANES, r);
  return 0;
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs of the loop (default: %(default)s)")
    args = p.parse_args()

    from attention_store import kernels

    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([kernels._compiler(), "-O3", "-march=native", str(src), "-o", str(exe)], check=True)
        for _ in range(args.runs):
            subprocess.run([str(exe)], check=True)


if __name__ == "__main__":
    main()
