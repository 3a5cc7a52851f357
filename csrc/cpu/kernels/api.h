// The boundary between the CPU entry points (compiled once, for the baseline
// ISA) and the CPU kernels (compiled once per ISA variant). See
// csrc/cpu/dispatch.h for how a variant is chosen.
//
// This header is included on both sides, so it holds only plain structs of
// raw pointers and sizes: no ATen / c10 / std containers. The kernels get
// everything they need through these structs, including the thread pool
// (Parallel: a type-erased at::parallel_for set up by the baseline code).
#pragma once

#include <cstdint>

namespace fastgen {
namespace cpu {

// Element types, as the kernels see them (the entry points map at::ScalarType).
enum class Dtype : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// body(ctx, begin, end) over [begin, end) in chunks of at least `grain`, on
// torch's intra-op thread pool (at::parallel_for in csrc/cpu/dispatch.cpp).
using ParallelBody = void (*)(void* ctx, int64_t begin, int64_t end);
struct Parallel {
  void (*run)(int64_t begin, int64_t end, int64_t grain, void* ctx, ParallelBody body);
  int num_threads;  // at::get_num_threads() at the call
};

// ------------------------------------------------------------------ geglu
// x (M, 2H) contiguous, out / dout (M, H), dx (M, 2H); one dtype.
struct GegluArgs {
  Dtype dtype;
  bool approximate_tanh;
  int64_t M, H;
  const void* x;
  const void* dout;  // backward only
  void* out;         // forward: out; backward: dx
  Parallel par;
};

// --------------------------------------------------------------- sampling
// All tensors dense in sample's memory order (see csrc/sampling_args.h).
struct SamplingArgs {
  int64_t N, S;
  int64_t coeff_stride;  // 7 (a row per sample) or 0 (one row)
  const float* coeffs;
  bool cfg, clip, return_x0;
  float guidance, clip_value;
  const void* sample;
  Dtype sample_dtype;
  const void* model_output;  // 2N samples with cfg ([uncond; cond])
  Dtype model_output_dtype;
  const void* extra[3];  // extra1, extra2, noise; nullptr when absent
  Dtype extra_dtype[3];
  void* out;  // sample's dtype
  void* x0;   // sample's dtype; nullptr unless return_x0
  Parallel par;
};

// ------------------------------------------------------------- group_norm
// x viewed as (N, C, S) (channels-first) or (N, S, C) (channels_last).
struct GroupNormArgs {
  Dtype dtype;
  int64_t N, C, S, G;
  bool channels_last;  // or S == 1, where both layouts coincide
  bool silu;
  double eps;
  const void* x;
  const void* residual;  // forward, optional (nullptr)
  const void* dy;        // backward
  const float* weight;
  const float* bias;
  void* y;        // forward: y; backward: dx
  float* mean;    // (N, G): written by the forward, read by the backward
  float* rstd;
  double* sum_dz;       // backward: (N, C) scratch, written by the kernel
  double* sum_dz_xhat;  // backward: (N, C)
  Parallel par;
};

// -------------------------------------------------------------- attention
// q (BH, Nq, D), k and v (BH, Nk, D), contiguous, one dtype.
struct AttentionArgs {
  Dtype dtype;
  int64_t BH, Nq, Nk, D;
  float scale;
  const void *q, *k, *v;
  const void *dout, *o;  // backward
  const float* lse_in;   // backward
  void* o_out;           // forward
  float* lse_out;        // forward
  void *dq, *dk, *dv;    // backward
  Parallel par;
};

// -------------------------------------------------------- vae_postprocess
// x viewed as (N, C, P) (channels-first, P = H * W) or (N, P, C)
// (channels-last). Forward: out = clamp(x * 0.5 + 0.5, 0, 1), in x's dtype and
// memory order, or as uint8 round_half_even(255 * that) in (N, P, C) order.
// Backward: dx = 0.5 * dy where 0 <= x * 0.5 + 0.5 <= 1, else 0; dy and dx in
// x's memory order.
struct VaePostprocessArgs {
  Dtype dtype;
  int64_t N, C, P;
  bool to_uint8;
  bool transpose;  // forward uint8 only: x is (N, C, P) with C > 1 and P > 1
  const void* x;
  const void* dy;  // backward only
  void* out;       // forward: y or the uint8 image; backward: dx
  Parallel par;
};

// ----------------------------------------------------------------- conv2d
// Winograd F(m x m, 3 x 3) for a 3x3 stride-1 convolution, m = 2 or 4 (tile
// side A = m + 2). x, residual and out are (N, C|K, H, W) channels-first or
// channels-last (one flag for all three). The tiles of output rows
// [row_begin, row_end) of the flattened (N, TH) tile-row index, TW tiles a
// row, form one chunk of T = (row_end - row_begin) * TW tiles:
//   input:  V (A*A, T, C) fp32, the transformed input tiles;
//   output: out = (A^T M A + bias + residual) * scale from M (A*A, T, K) fp32,
//           the Winograd-domain products V[e] @ U[e] the entry point computed.
struct ConvWinogradArgs {
  Dtype dtype;
  int m;
  int64_t N, C, H, W, K, Ho, Wo;
  int64_t pad_t, pad_l;
  int64_t TH, TW;
  bool channels_last;
  const void* x;
  const float* bias;     // (K,) or nullptr
  const void* residual;  // out's dtype and layout, or nullptr
  float scale;
  void* out;
  int64_t row_begin, row_end;
  float* V;
  const float* M;
  Parallel par;
};

// In place or converting: out = (y + bias[k] + residual) * scale, with y fp32
// and out / residual of `dtype`, all (N, K, P) (channels-first) or (N, P, K).
// y and out may alias when dtype is fp32.
struct ConvEpilogueArgs {
  Dtype dtype;
  int64_t N, K, P;
  bool channels_last;
  const float* y;
  const float* bias;     // (K,) or nullptr
  const void* residual;  // or nullptr
  float scale;
  void* out;
  Parallel par;
};

// ---------------------------------------------------------------- bias_act
// x, dy, out dense in one memory order; the element at offset o takes bias
// b[(o / inner) % C] (csrc/bias_act_args.h). order 0: y = clamp(act(x + b) *
// gain); order 1 / 2: dx = dy * gain * act^(order)(x + b), 0 where clamped,
// and the bias gradient (dx summed per bias index, before dx is rounded).
struct BiasActArgs {
  Dtype dtype;
  int act;    // BiasActKind
  int order;  // 0 forward, 1 or 2 gradient
  int64_t numel, C, inner;
  const float* b;  // (C,) or nullptr
  float alpha, gain, clamp;  // clamp < 0: none
  const void* x;
  const void* dy;  // gradient only
  void* out;
  // Gradient with a bias: `parts` rows of C fp32 zeros, each part of the
  // tensor's blocks adds its bias-gradient sums into its own row.
  float* db_parts;
  int64_t parts;
  Parallel par;
};

// One ISA variant's kernels. Every entry may assume its ISA is present.
struct KernelTable {
  const char* name;
  void (*geglu_fwd)(const GegluArgs&);
  void (*geglu_bwd)(const GegluArgs&);
  void (*sampling_step)(const SamplingArgs&);
  void (*group_norm_fwd)(const GroupNormArgs&);
  void (*group_norm_bwd)(const GroupNormArgs&);
  void (*attention_fwd)(const AttentionArgs&);
  void (*attention_bwd)(const AttentionArgs&);
  void (*vae_postprocess_fwd)(const VaePostprocessArgs&);
  void (*vae_postprocess_bwd)(const VaePostprocessArgs&);
  void (*conv2d_winograd_input)(const ConvWinogradArgs&);
  void (*conv2d_winograd_output)(const ConvWinogradArgs&);
  void (*conv2d_epilogue)(const ConvEpilogueArgs&);
  void (*bias_act)(const BiasActArgs&);
};

// The variants, lowest first. Each one that was built defines its table in
// namespace fastgen::cpu::<name> (csrc/cpu/kernels/table.cpp compiled with
// -DFASTGEN_CPU_CAPABILITY=<name>); setup.py passes -DFASTGEN_CPU_HAVE_<NAME>
// to the baseline code for each built variant.
namespace portable { extern const KernelTable kTable; }
namespace avx2 { extern const KernelTable kTable; }
namespace avx512 { extern const KernelTable kTable; }
namespace avx512_bf16 { extern const KernelTable kTable; }

}  // namespace cpu
}  // namespace fastgen
