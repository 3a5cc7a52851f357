// The kernels one ISA variant exports (through its KernelTable, table.cpp).
// Per-ISA code: include only from csrc/cpu/kernels/*.cpp.
#pragma once

#include "cpu/kernels/common.h"

FG_ISA_BEGIN

void geglu_fwd(const GegluArgs& a);
void geglu_bwd(const GegluArgs& a);
void sampling_step(const SamplingArgs& a);
void group_norm_fwd(const GroupNormArgs& a);
void group_norm_bwd(const GroupNormArgs& a);
void vae_postprocess_fwd(const VaePostprocessArgs& a);
void vae_postprocess_bwd(const VaePostprocessArgs& a);
void conv2d_winograd_input(const ConvWinogradArgs& a);
void conv2d_winograd_output(const ConvWinogradArgs& a);
void conv2d_epilogue(const ConvEpilogueArgs& a);
void bias_act(const BiasActArgs& a);
namespace cpu_attn {
void attention_fwd(const AttentionArgs& a);
void attention_bwd(const AttentionArgs& a);
}  // namespace cpu_attn

FG_ISA_END
