// What the CPU and the OS let us run, read once at import.
#pragma once

namespace fusedoptim {
namespace cpu {

struct CpuFeatures {
  bool x86 = false;
  bool amd = false;        // AuthenticAMD or HygonGenuine (tuning only, never correctness)
  bool avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512_bf16 = false;
  bool os_avx = false;     // XCR0 enables YMM state
  bool os_avx512 = false;  // XCR0 enables opmask and ZMM state
};

const CpuFeatures& cpu_features();

// A variant may run only when the CPU has every instruction it uses and the
// OS saves the registers it needs (ggml and NumPy ask XGETBV too).
bool can_run_avx2();
bool can_run_avx512();
bool can_run_avx512bf16();

}  // namespace cpu
}  // namespace fusedoptim
