// Macros and codes shared by every layer: the host/device qualifiers of the
// code that compiles for both, and the enums whose values travel from Python
// as plain integers (part of the module's ABI; see python/fusedoptim).
#pragma once

#include <cstddef>
#include <cstdint>

// FO_HD: host and device (update math, conversions, coefficients).
// FO_HD_ALWAYS: the same, and always inlined on the host too, for helpers
// of the CPU loops that take vectors of up to 64 bytes by value: inlined,
// they live in registers; called, they would go through the stack.
// FO_DEVICE: device only with nvcc; plain inline on a host compiler, where
// cuda/emulation.h runs the device code on the CPU.
#if defined(__CUDACC__)
#define FO_HD __host__ __device__ __forceinline__
#define FO_HD_ALWAYS __host__ __device__ __forceinline__
#define FO_DEVICE __device__ __forceinline__
#else
#define FO_HD inline
#define FO_HD_ALWAYS inline __attribute__((always_inline))
#define FO_DEVICE inline
#endif

// The arithmetic of Note [one source of math] (update_math.h) for a vector
// type V that holds its lanes in V::x: add, sub, mul, div, sqrt and fma,
// each the named correctly rounded operation on V::x. QUAL qualifies the
// functions (inline, FO_DEVICE).
#define FO_VEC_ARITH(QUAL, V, ADD, SUB, MUL, DIV, SQRT, FMA) \
  QUAL V add(V a, V b) { return V(ADD(a.x, b.x)); }         \
  QUAL V sub(V a, V b) { return V(SUB(a.x, b.x)); }         \
  QUAL V mul(V a, V b) { return V(MUL(a.x, b.x)); }         \
  QUAL V div(V a, V b) { return V(DIV(a.x, b.x)); }         \
  QUAL V sqrt(V a) { return V(SQRT(a.x)); }                 \
  QUAL V fma(V a, V b, V c) { return V(FMA(a.x, b.x, c.x)); }

namespace fusedoptim {

// Storage dtype codes: the three of params, grads and states, and float64,
// which only a step counter may have (torch keeps `step` in float64 when
// the default dtype is float64).
enum DType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat64 = 3,
  // States only: 8-bit block-quantized moments, uint8 codes plus fp32
  // scales (Note [8-bit states] in quant8.h).
  kQuant8 = 4,
};

inline const char* dtype_name(int32_t code) {
  switch (code) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
    case kFloat64: return "float64";
    case kQuant8: return "8-bit";
    default: return "unknown";
  }
}

inline bool dtype_known(int32_t code) { return code == kFloat32 || code == kBFloat16 || code == kFloat16; }

inline size_t dtype_size(int32_t code) {
  return code == kFloat64 ? 8 : code == kFloat32 ? 4 : code == kQuant8 ? 1 : 2;
}

// How a step's fp32 result is stored (Note [precision options] in precision.h).
enum StoreMode : int {
  kStorePlain = 0,
  kStoreMaster = 1,
  kStoreStochastic = 2,
  kStoreKahan = 3,
};

// How weight decay enters Adam.
enum WeightDecayMode : int { kNoDecay = 0, kL2 = 1, kDecoupled = 2 };

// How SGD uses its momentum buffer.
enum MomentumMode : int { kNoMomentum = 0, kMomentum = 1, kNesterov = 2 };

}  // namespace fusedoptim
