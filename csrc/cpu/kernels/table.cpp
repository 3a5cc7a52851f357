// The KernelTable of one ISA variant (this file, like every file in
// csrc/cpu/kernels/, is compiled once per variant; see common.h).
#include "cpu/kernels/kernels.h"

#define FG_STR2(x) #x
#define FG_STR(x) FG_STR2(x)

FG_ISA_BEGIN

const KernelTable kTable = {
    FG_STR(FASTGEN_CPU_CAPABILITY),
    &geglu_fwd,
    &geglu_bwd,
    &sampling_step,
    &group_norm_fwd,
    &group_norm_bwd,
    &cpu_attn::attention_fwd,
    &cpu_attn::attention_bwd,
    &vae_postprocess_fwd,
    &vae_postprocess_bwd,
    &conv2d_winograd_input,
    &conv2d_winograd_output,
    &conv2d_epilogue,
    &bias_act,
};

FG_ISA_END
