// What the forward and backward drivers of the CPU attention share: the
// problem (sizes, inputs, scale), the key-block rule and per-thread scratch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <new>
#include <type_traits>

#include "cpu/kernels/attention_simd.h"
#include "cpu/kernels/common.h"

FG_ISA_BEGIN
namespace cpu_attn {

// q is (BH, Nq, D), k and v are (BH, Nk, D), all of dtype T.
template <typename T>
struct Problem {
  int64_t BH, Nq, Nk, D;
  int64_t Dp;  // D rounded up to the GEMMs' row granule
  int nthreads;
  const T *qp, *kp, *vp;
  float scale;
  float c;  // scale * log2(e): scores in base-2 units
  // Rows of D values serve as GEMM operands as stored (no padded copy): fp32
  // with D a multiple of the granule.
  bool rows_as_stored;

  const Parallel par;

  explicit Problem(const AttentionArgs& a)
      : BH(a.BH), Nq(a.Nq), Nk(a.Nk), D(a.D), Dp(round_up(D, G)),
        nthreads(std::max(1, a.par.num_threads)), qp(static_cast<const T*>(a.q)),
        kp(static_cast<const T*>(a.k)), vp(static_cast<const T*>(a.v)), scale(a.scale),
        c(a.scale * kLog2e),
        rows_as_stored(std::is_same_v<T, float> && Dp == D), par(a.par) {}
};

// Blocks of about `target` keys, balanced so that the last one is no sliver;
// even on the bf16 dot-product path, whose GEMMs reduce over pairs of keys.
inline int64_t key_block_size(int64_t Nk, int64_t target, bool pairs) {
  const int64_t bk = cdiv(Nk, cdiv(Nk, target));
  return pairs ? round_up(bk, 2) : bk;
}

// 64-byte aligned fp32 scratch. Built from a list of pieces it points each
// piece's pointer at consecutive parts of one allocation, so that a tile's
// layout is written once, beside its pointers. Words (uint32_t) hold bf16
// pairs and take the room of one float each.
class Scratch {
 public:
  struct Piece {
    Piece(float*& at, int64_t n) : f(&at), n(n) {}
    Piece(uint32_t*& at, int64_t n) : w(&at), n(n) {}
    float** f = nullptr;
    uint32_t** w = nullptr;
    int64_t n;
  };

  explicit Scratch(int64_t n)
      : p(static_cast<float*>(::operator new[](static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float),
                                               std::align_val_t(64)))) {}
  explicit Scratch(std::initializer_list<Piece> pieces) : Scratch(total(pieces)) {
    float* at = p;
    for (const Piece& piece : pieces) {
      if (piece.f) *piece.f = at;
      if (piece.w) *piece.w = reinterpret_cast<uint32_t*>(at);
      at += piece.n;
    }
  }
  ~Scratch() { ::operator delete[](p, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  float* const p;

 private:
  static int64_t total(std::initializer_list<Piece> pieces) {
    int64_t n = 0;
    for (const Piece& piece : pieces) n += piece.n;
    return n;
  }
};

}  // namespace cpu_attn
FG_ISA_END
