// The projection's device tile table (balora_kernels/ops/grouped_projection.py builds it), as the CUDA Gram and
// rescale kernels read it (csrc/grouped.cu, csrc/grouped_mma.cu):
//
//   tiles int64 [n_b + n_a, kFields]: (factor address, row stride of A, k_start, k_len, Gram slot, pair); B tiles
//   (rows [k_start, k_start + k_len) of B [out, r], row stride r) first, then A tiles (columns of A [r, in]).
#pragma once

constexpr int kFields = 6;            // the tile table's row (balora_kernels/ops/grouped_projection.py TILE_FIELDS)

struct Tile {
  char* base;
  long long stride, k0;
  int k_len;
  long long slot;
  int pair;
};

__device__ __forceinline__ Tile load_tile(const long long* tiles, int t) {
  const long long* f = tiles + (long long)t * kFields;
  return Tile{reinterpret_cast<char*>(f[0]), f[1], f[2], (int)f[3], f[4], (int)f[5]};
}
