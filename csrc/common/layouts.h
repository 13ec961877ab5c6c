// The (param dtype, state dtype, store mode) layouts that are compiled, in
// one list, and the switch that turns a layout's runtime codes into template
// arguments, in the spirit of flash-attention's static_switch.h. The CPU
// kernels (cpu/kernels.cpp), the CUDA pickers (cuda/launch.h) and the
// argument checks (layout_supported) all read this list.
#pragma once

#include <cstdint>

#include "convert.h"
#include "macros.h"

namespace fusedoptim {

// The dtype code of a storage type.
template <class X>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr int32_t value = kFloat32; };
template <>
struct DTypeOf<bf16_t> { static constexpr int32_t value = kBFloat16; };
template <>
struct DTypeOf<f16_t> { static constexpr int32_t value = kFloat16; };
// 8-bit block-quantized states: uint8 codes plus fp32 scales (quant8.h).
struct q8_t {};
template <>
struct DTypeOf<q8_t> { static constexpr int32_t value = kQuant8; };

// One layout: params and grads of storage type S, optimizer states of T,
// the fp32 result stored as kStore says (Note [precision options]).
template <class S, class T, int kStore_>
struct LayoutTag {
  using Param = S;
  using State = T;
  static constexpr int kStore = kStore_;
  static bool is(int32_t dtype, int32_t state_dtype, int store) {
    return dtype == DTypeOf<S>::value && state_dtype == DTypeOf<T>::value && store == kStore;
  }
};

template <class... L>
struct LayoutList {};

// Every compiled layout, and the option of the Python API that selects it.
using Layouts = LayoutList<
    LayoutTag<float, float, kStorePlain>,         // torch
    LayoutTag<bf16_t, bf16_t, kStorePlain>,       // torch
    LayoutTag<f16_t, f16_t, kStorePlain>,         // torch
    LayoutTag<float, bf16_t, kStorePlain>,        // state_dtype=torch.bfloat16
    LayoutTag<bf16_t, float, kStoreMaster>,       // master_weights=True
    LayoutTag<f16_t, float, kStoreMaster>,        // master_weights=True
    LayoutTag<bf16_t, bf16_t, kStoreStochastic>,  // stochastic_rounding=True
    LayoutTag<bf16_t, bf16_t, kStoreKahan>,       // kahan_summation=True
    LayoutTag<f16_t, f16_t, kStoreKahan>>;        // kahan_summation=True

// The layouts with 8-bit states (state_bits=8), CPU and CUDA kernels: each
// param layout above with its moments quantized (Note [8-bit states]).
using Quant8Layouts = LayoutList<
    LayoutTag<float, q8_t, kStorePlain>,
    LayoutTag<bf16_t, q8_t, kStorePlain>,
    LayoutTag<f16_t, q8_t, kStorePlain>,
    LayoutTag<bf16_t, q8_t, kStoreMaster>,
    LayoutTag<f16_t, q8_t, kStoreMaster>,
    LayoutTag<bf16_t, q8_t, kStoreStochastic>,
    LayoutTag<bf16_t, q8_t, kStoreKahan>,
    LayoutTag<f16_t, q8_t, kStoreKahan>>;

template <class R, class F, class... L>
R layout_switch_in(LayoutList<L...>, int32_t dtype, int32_t state_dtype, int store, F& f) {
  R out{};
  (void)((L::is(dtype, state_dtype, store) ? (out = f(L{}), true) : false) || ...);
  return out;
}

// f(LayoutTag<S, T, kStore>{}) for the layout with these codes, R{} (a null
// kernel, false) when it is not compiled. f instantiates its body for every
// layout of the list.
template <class R, class F>
R layout_switch(int32_t dtype, int32_t state_dtype, int store, F&& f) {
  return layout_switch_in<R>(Layouts{}, dtype, state_dtype, store, f);
}

// As layout_switch, over Quant8Layouts.
template <class R, class F>
R quant8_layout_switch(int32_t dtype, int32_t state_dtype, int store, F&& f) {
  return layout_switch_in<R>(Quant8Layouts{}, dtype, state_dtype, store, f);
}

// Whether the CPU kernels take this layout (the CUDA kernels: layout_switch's list).
inline bool layout_supported(int32_t dtype, int32_t state_dtype, int store) {
  return layout_switch<bool>(dtype, state_dtype, store, [](auto) { return true; }) ||
         quant8_layout_switch<bool>(dtype, state_dtype, store, [](auto) { return true; });
}

}  // namespace fusedoptim
