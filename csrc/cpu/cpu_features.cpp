#include "cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define FO_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace fusedoptim {
namespace cpu {
namespace {

#if FO_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
  int out[4];
  __cpuidex(out, int(leaf), int(sub));
  for (int i = 0; i < 4; ++i) r[i] = unsigned(out[i]);
#else
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

unsigned long long xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if FO_X86
  f.x86 = true;
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  // The vendor string is EBX EDX ECX: "Auth" "enti" "cAMD", "Hygo" "nGen" "uine".
  f.amd = (r[1] == 0x68747541u && r[3] == 0x69746e65u && r[2] == 0x444d4163u) ||
          (r[1] == 0x6f677948u && r[3] == 0x6e65476eu && r[2] == 0x656e6975u);
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1;
  f.fma = (r[2] >> 12) & 1;
  f.avx = (r[2] >> 28) & 1;
  f.f16c = (r[2] >> 29) & 1;
  if (osxsave) {
    const unsigned long long xcr0 = xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;       // SSE and YMM state
    f.os_avx512 = (xcr0 & 0xe6) == 0xe6;  // plus opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    f.avx2 = (r[1] >> 5) & 1;
    f.avx512f = (r[1] >> 16) & 1;
    f.avx512dq = (r[1] >> 17) & 1;
    f.avx512bw = (r[1] >> 30) & 1;
    f.avx512vl = (r[1] >> 31) & 1;
    cpuid(7, 1, r);
    f.avx512_bf16 = (r[0] >> 5) & 1;
  }
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool can_run_avx2() {
  const CpuFeatures& f = cpu_features();
  return f.avx && f.avx2 && f.fma && f.f16c && f.os_avx;
}

bool can_run_avx512() {
  const CpuFeatures& f = cpu_features();
  // F, BW and VL: every AVX-512 CPU but the Xeon Phi, which runs the AVX2 variant.
  return can_run_avx2() && f.avx512f && f.avx512bw && f.avx512vl && f.os_avx512;
}

bool can_run_avx512bf16() {
  const CpuFeatures& f = cpu_features();
  return can_run_avx512() && f.avx512dq && f.avx512_bf16;
}

}  // namespace cpu
}  // namespace fusedoptim
