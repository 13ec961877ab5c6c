"""Every numeric tolerance of the suite, in one place, with the reason for each.

Checks are elementwise: ``|actual - expected| <= atol + rtol * |expected|``.
The measured numbers quoted below are the largest seen on the reference
machine (AVX2, 2 threads, torch 2.13.0 CPU) over all cases of the registry
(tests/cases.py) after 50 steps with lr 1e-2 (SGD momentum 0.9: effective
step up to 0.1 * |grad|), params of magnitude up to ~8. The suite prints the
values it measures at the end of every run ("fusedoptim parity errors").
"""

# ---------------------------------------------------------------- fp32 vs torch
# fusedoptim rounds as torch's for-loop rounds (Note [torch's rounding order]
# in csrc/common/update_math.h): SGD gives torch's bits, params and momentum
# buffers (exact below). Adam differs only where torch's CPU sqrt is off by an
# ulp (it equals torch's fused=True step there, bit for bit): a denominator
# one ulp apart moves the update by ~6e-8 relative, so a param by an ulp now
# and then, accumulated over 50 steps. Measured (AVX-512, torch 2.13.0): max
# abs error 4.8e-7 on params of magnitude ~4, exp_avg 1.2e-7 abs, exp_avg_sq
# and max_exp_avg_sq 2.4e-7 relative. Margins 2x to 4x; the second moments
# are relative only (they are ~1e-5 in size: an absolute term would hide a
# wrong value).
FP32_VS_TORCH = dict(rtol=1e-5, atol=1e-6)
FP32_STATE_VS_TORCH = {
    "exp_avg": dict(rtol=1e-5, atol=1e-7),
    "exp_avg_sq": dict(rtol=1e-6, atol=0.0),
    "max_exp_avg_sq": dict(rtol=1e-6, atol=0.0),
    # torch's bits: buf.mul_(momentum).add_(grad, alpha=1 - dampening).
    "momentum_buffer": dict(rtol=0.0, atol=0.0),
    # an exact count (float32 holds integers up to 2**24 exactly).
    "step": dict(rtol=0.0, atol=0.0),
}
# max_grad_norm against clip_grad_norm_ followed by torch's step: the clip
# coefficient comes from a norm summed exactly in double where torch sums
# fp32 per-tensor norms, so the two coefficients can be an ulp apart and
# every grad is scaled by its own; the states then differ by an ulp or two
# per step (measured: momentum buffers 4.8e-7 abs, 3.4e-5 rel on buffers of
# ~2.5). The same bounds as fp32 params, relative for the second moments.
FP32_CLIPPED_STATE_VS_TORCH = dict(FP32_STATE_VS_TORCH, exp_avg_sq=dict(rtol=1e-5, atol=0.0),
                                   max_exp_avg_sq=dict(rtol=1e-5, atol=0.0),
                                   momentum_buffer=dict(rtol=1e-5, atol=2e-6))

# ---------------------------------------------------------------- fp32 vs NumPy float64
# The float64 reference has no rounding error to speak of, so this is
# fp32's own accumulated rounding: torch's for-loop is as far from it as
# fusedoptim is (measured: fusedoptim needs atol 6.7e-7 at rtol 1e-5, torch
# 6.4e-7; max abs error 3.6e-6 for both). Same 3x margin.
FP32_VS_NUMPY = dict(rtol=1e-5, atol=2e-6)

# ---------------------------------------------------------------- longer / data-dependent runs
# A real nn.Module (Linear+ReLU) trained for 50 steps: the grads depend on the
# params, so the rounding differences feed back into later grads (and a
# ReLU input near 0 may flip). Measured max abs error 2.9e-7 (run summary:
# "module-train"); 1e-5 abs / 1e-4 rel leaves a wide margin without hiding a
# wrong formula (a wrong bias correction or decay shows up at 1e-3 and above).
# Also used for nn.Embedding(sparse=True) + head and closure-driven runs.
FP32_TRAINING_LOOP = dict(rtol=1e-4, atol=1e-5)

# ---------------------------------------------------------------- bf16 / fp16 vs an fp32 reference
# torch's own bf16/fp16 for-loop rounds every intermediate op to the storage
# dtype; fusedoptim computes in fp32 and rounds once per stored value, so its
# error against an fp32 run on the same (upcast) values must be no worse than
# torch's, within this factor (what a low-precision option promises). Measured ratios of
# max error: bf16 <= 1.28, fp16 <= 1.37 (SGD); RMS ratios <= 1.03. On fp16
# Adam fusedoptim's error is 10x to 100x smaller than torch's.
LOWP_MAX_RATIO = 2.0
# Added to the allowed error: half an ulp of the dtype at the largest
# reference value, i.e. the error of merely storing the fp32 reference in
# bf16/fp16, which no implementation can avoid.
LOWP_FLOOR_ULPS = 0.5
# torch's fp16 Adam with eps=1e-8 divides by zero (1e-8 and small second
# moments underflow to 0 in fp16 arithmetic) and produces inf, which would make
# the ratio check vacuous; fp16 Adam problems use this eps instead (a common
# fp16 setting), and a separate test checks that fusedoptim stays finite and
# accurate with the default eps.
FP16_ADAM_EPS = 1e-4
# fusedoptim fp16 Adam with the default eps=1e-8: max abs error against the
# fp32 reference (measured 9.4e-3, i.e. ~2 fp16 ulps at magnitude 4; torch: inf).
FP16_DEFAULT_EPS_MAX_ABS = 0.05

# One bf16 Adam step from the same (loaded) state: fusedoptim rounds once,
# torch's bf16 for-loop rounds every intermediate; within 2 bf16 ulps
# (2**-7 relative) plus 1e-2 absolute for values near 0.
LOWP_ONE_STEP_VS_TORCH = dict(rtol=2.0 ** -7, atol=1e-2)

# A closed-form fp32 result (first Adam step: p - lr * g / (|g| + eps)):
# a few fp32 roundings, so 1e-6 relative.
FP32_CLOSED_FORM = dict(rtol=1e-6, atol=0.0)

# The float64 NumPy reference against closed forms (tests of the reference
# itself): a handful of float64 roundings.
REF64_CLOSED_FORM = dict(rtol=1e-12, atol=0.0)

# Not a tolerance but a threshold: torch 2.13's fused=True on a transposed
# param with a grad of other strides is off by O(lr) (measured 0.5 to 2.3);
# anything above this counts as "torch pairs the wrong elements".
TORCH_FUSED_STRIDE_BUG_MIN_ERROR = 1e-2

# ---------------------------------------------------------------- exact comparisons
# Everything below is compared bit for bit, with no tolerance:
#  - every ISA variant against the scalar one, and 1 thread against 2 threads
#    (the math is one template instantiated per vector type, built with
#    -ffp-contract=off; the thread split never changes an element's math);
#  - fallback params against torch's for-loop (it *is* torch's code);
#  - state_dict round trips fusedoptim -> fusedoptim and torch.save/load;
#  - deepcopy / pickle copies against the original;
#  - mixed-dtype groups against the same params in single-dtype groups.

# ---------------------------------------------------------------- examples/train.py
# The example's validation losses, fusedoptim vs torch.optim, after up to 60
# data-dependent steps (gradient clipping, an LR schedule, optionally bf16
# autocast, whose rounding amplifies the fp32 ulp differences of the update).
# Measured: max relative difference 3.3e-5 (AdamW, bf16 autocast; fp32 AdamW
# 0, SGD 1.2e-7); 1e-3 keeps a 30x margin, while a wrong update rule moves
# these losses by 10% and more.
EXAMPLE_FINAL_LOSS_RTOL = 1e-3
