// Torch-facing side of the balancing-transforms kernel (csrc/balance.cu): input checks, stream, scratch,
// and the op registration `torch.ops.balora.balance_transforms`.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_runtime.h>

#include "messages.h"

extern "C" {
void bk_balance_config(int P, int n, int num_sms, int* threads, int* grid, int* smem_bytes, int* mats_in_smem,
                       long long* scratch_doubles);
int bk_balance_launch(const float* grams, const double* eps_f, int P, int n, int R, int mode, float* tw, int* status, double* gaps,
                      double* scratch, int threads, int grid, int smem_bytes, int mats_in_smem,
                      cudaStream_t stream);
const char* bk_error_string(int err);
int bk_grouped_max_rank(int dtype);
int bk_grouped_partial_size(int r);
int bk_grouped_mma_rank_block(int r);
int bk_grouped_mma_wgmma();
int bk_grouped_gram_launch(const long long* tiles, int n_b, int n_a, int r, int R, int dtype, float* partials,
                           int partial_stride, const long long* ranges, int* counters, float* grams,
                           cudaStream_t stream);
int bk_grouped_rescale_launch(const long long* tiles, int n_b, int n_a, int r, int R, int dtype, const float* tw,
                              const int* status, int skip_bits, cudaStream_t stream);
}

namespace {

// grams fp32 [P, 2, R, R], eps_f fp64 [P] (each pair's factor rounding unit, reference.factor_eps)
// -> tw fp32 [P, 2, R, R] (T, T^-1), status int32 [P], gaps fp64 [P, 2].
void balance_transforms(const at::Tensor& grams, const at::Tensor& eps_f, int64_t r, int64_t mode,
                        const at::Tensor& tw, const at::Tensor& status, const at::Tensor& gaps) {
  const char* op = "balora::balance_transforms";
  TORCH_CHECK(grams.is_cuda() && eps_f.is_cuda() && tw.is_cuda() && status.is_cuda() && gaps.is_cuda(), bk::msg(op,
              ": all tensors must be CUDA tensors"));
  TORCH_CHECK(grams.device() == eps_f.device() && grams.device() == tw.device() &&
                  grams.device() == status.device() && grams.device() == gaps.device(), bk::msg(op, ": all tensors must be on one device"));
  TORCH_CHECK(grams.dim() == 4 && grams.size(1) == 2 && grams.size(2) == grams.size(3), bk::msg(op,
              ": grams must be [P, 2, R, R], got ", grams.sizes()));
  const int64_t P = grams.size(0), R = grams.size(2);
  TORCH_CHECK(r >= 1 && r <= 128 && r <= R, bk::msg(op, ": rank r=", r, " must be in [1, min(128, R=", R, ")]"));
  TORCH_CHECK(mode == 0 || mode == 1, bk::msg(op, ": mode must be 0 (nearest) or 1 (svd), got ", mode));
  TORCH_CHECK(grams.scalar_type() == at::kFloat && grams.is_contiguous(), bk::msg(op,
              ": grams must be contiguous float32, got ", grams.scalar_type()));
  TORCH_CHECK(eps_f.scalar_type() == at::kDouble && eps_f.is_contiguous() && eps_f.dim() == 1 &&
                  eps_f.size(0) == P, bk::msg(op, ": eps_f must be contiguous float64 [", P, "], got ", eps_f.scalar_type(), " ", eps_f.sizes()));
  TORCH_CHECK(tw.scalar_type() == at::kFloat && tw.is_contiguous() && tw.sizes() == grams.sizes(), bk::msg(op,
              ": tw must be contiguous float32 of grams' shape ", grams.sizes(), ", got ", tw.sizes()));
  TORCH_CHECK(status.scalar_type() == at::kInt && status.is_contiguous() && status.dim() == 1 &&
                  status.size(0) == P, bk::msg(op, ": status must be contiguous int32 [", P, "], got ", status.sizes()));
  TORCH_CHECK(gaps.scalar_type() == at::kDouble && gaps.is_contiguous() && gaps.dim() == 2 &&
                  gaps.size(0) == P && gaps.size(1) == 2, bk::msg(op, ": gaps must be contiguous float64 [", P, ", 2], got ", gaps.sizes()));
  if (P == 0) return;
  c10::cuda::CUDAGuard guard(grams.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int threads = 0, grid = 0, smem = 0, in_smem = 0;
  long long scratch_n = 0;
  bk_balance_config((int)P, (int)r, sms, &threads, &grid, &smem, &in_smem, &scratch_n);
  at::Tensor scratch = at::empty({scratch_n}, grams.options().dtype(at::kDouble));
  const int err = bk_balance_launch(grams.data_ptr<float>(), eps_f.data_ptr<double>(), (int)P, (int)r, (int)R, (int)mode,
                                    tw.data_ptr<float>(), status.data_ptr<int>(), gaps.data_ptr<double>(),
                                    scratch.data_ptr<double>(), threads, grid, smem, in_smem,
                                    at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, bk::msg(op, ": launch failed for P=", P, " r=", r, ": ", bk_error_string(err)));
}

// Checks shared by the grouped Gram and rescale (csrc/grouped.cu): the tile table and the rank / dtype codes.
// The table's addresses, slots and pairs are the plan's (balora_kernels/ops/grouped_projection.py), not checked
// here (that would need a host synchronisation).
void check_tiles(const char* op, const at::Tensor& tiles, int64_t n_b, int64_t n_a, int64_t r, int64_t dtype) {
  TORCH_CHECK(tiles.is_cuda() && tiles.scalar_type() == at::kLong && tiles.is_contiguous() && tiles.dim() == 2 &&
                  tiles.size(1) == 6, bk::msg(op, ": tiles must be a contiguous int64 CUDA tensor [n, 6], got ",
                  tiles.scalar_type(), " ", tiles.sizes()));
  TORCH_CHECK(n_b >= 0 && n_a >= 0 && n_b + n_a == tiles.size(0), bk::msg(op, ": n_b=", n_b, " + n_a=", n_a,
              " must be the table's ", tiles.size(0), " tiles"));
  TORCH_CHECK(dtype >= 0 && dtype <= 2, bk::msg(op, ": dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got ",
              dtype));
  TORCH_CHECK(r >= 1 && r <= bk_grouped_max_rank((int)dtype), bk::msg(op, ": rank r=", r, " must be in [1, ",
              bk_grouped_max_rank((int)dtype), "] for ", dtype == 0 ? "float32" : "16-bit", " factors"));
}

// The padded size R of grams / tw must hold the kernels' rank block (r itself up to 16; 32 or 64 above).
void check_block(const char* op, const char* what, int64_t r, int64_t R) {
  const int64_t need = r > 16 ? bk_grouped_mma_rank_block((int)r) : r;
  TORCH_CHECK(R >= need, bk::msg(op, ": ", what, " must be [P, 2, R, R] with R >= ", need, " for r=", r, ", got R=", R));
}

// tiles int64 [n_b + n_a, 6] (B tiles first), partials fp32 [S, R, R] (workspace: each tile's packed partial in
// its slot), ranges int64 [2P, 2] (first slot, count of each Gram), counters int32 [2P] (zero; left zero)
// -> grams fp32 [P, 2, R, R].
void grouped_gram(const at::Tensor& tiles, int64_t n_b, int64_t n_a, int64_t r, int64_t dtype,
                  const at::Tensor& partials, const at::Tensor& ranges, const at::Tensor& counters,
                  const at::Tensor& grams) {
  const char* op = "balora::grouped_gram";
  check_tiles(op, tiles, n_b, n_a, r, dtype);
  TORCH_CHECK(grams.is_cuda() && grams.scalar_type() == at::kFloat && grams.is_contiguous() && grams.dim() == 4 &&
                  grams.size(1) == 2 && grams.size(2) == grams.size(3) && grams.size(2) >= r, bk::msg(op,
              ": grams must be contiguous float32 [P, 2, R, R] with R >= r=", r, ", got ", grams.scalar_type(), " ",
              grams.sizes()));
  const int64_t P = grams.size(0), R = grams.size(2);
  check_block(op, "grams", r, R);
  TORCH_CHECK(partials.is_cuda() && partials.scalar_type() == at::kFloat && partials.is_contiguous() &&
                  partials.dim() == 3 && partials.size(1) * partials.size(2) >= bk_grouped_partial_size((int)r),
              bk::msg(op, ": partials must be contiguous float32 [S, R, R] holding ", bk_grouped_partial_size((int)r),
                      " floats per slot, got ", partials.scalar_type(), " ", partials.sizes()));
  TORCH_CHECK(ranges.is_cuda() && ranges.scalar_type() == at::kLong && ranges.is_contiguous() &&
                  ranges.sizes() == at::IntArrayRef({2 * P, 2}), bk::msg(op, ": ranges must be contiguous int64 [",
                  2 * P, ", 2], got ", ranges.scalar_type(), " ", ranges.sizes()));
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.is_contiguous() &&
                  counters.dim() == 1 && counters.size(0) == 2 * P, bk::msg(op, ": counters must be contiguous int32 [",
                  2 * P, "], got ", counters.scalar_type(), " ", counters.sizes()));
  for (const at::Tensor* t : {&partials, &ranges, &counters, &grams})
    TORCH_CHECK(t->device() == tiles.device(), bk::msg(op, ": all tensors must be on one device"));
  if (n_b + n_a == 0) return;
  c10::cuda::CUDAGuard guard(tiles.device());
  const int err = bk_grouped_gram_launch(reinterpret_cast<const long long*>(tiles.data_ptr<int64_t>()),
                                         (int)n_b, (int)n_a, (int)r, (int)R, (int)dtype, partials.data_ptr<float>(),
                                         (int)(partials.size(1) * partials.size(2)),
                                         reinterpret_cast<const long long*>(ranges.data_ptr<int64_t>()),
                                         counters.data_ptr<int>(), grams.data_ptr<float>(),
                                         at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, bk::msg(op, ": launch failed for ", n_b + n_a, " tiles, r=", r, ": ", bk_error_string(err)));
}

// tiles as above, tw fp32 [P, 2, R, R] (T, T^-1), status int32 [P]: pairs with any of skip_bits are not touched.
// Rescales the factors the table addresses in place. Those factors are not arguments, so the schema cannot mark
// them mutated: an internal, eager-only op (TritonProjectionPlan calls it under no_grad; not for torch.compile
// graphs, where it would look side-effect free).
void grouped_rescale(const at::Tensor& tiles, int64_t n_b, int64_t n_a, int64_t r, int64_t dtype, const at::Tensor& tw,
                     const at::Tensor& status, int64_t skip_bits) {
  const char* op = "balora::grouped_rescale";
  check_tiles(op, tiles, n_b, n_a, r, dtype);
  TORCH_CHECK(tw.is_cuda() && tw.scalar_type() == at::kFloat && tw.is_contiguous() && tw.dim() == 4 &&
                  tw.size(1) == 2 && tw.size(2) == tw.size(3) && tw.size(2) >= r, bk::msg(op,
              ": tw must be contiguous float32 [P, 2, R, R] with R >= r=", r, ", got ", tw.scalar_type(), " ",
              tw.sizes()));
  check_block(op, "tw", r, tw.size(2));
  TORCH_CHECK(status.is_cuda() && status.scalar_type() == at::kInt && status.is_contiguous() && status.dim() == 1 &&
                  status.size(0) == tw.size(0), bk::msg(op, ": status must be contiguous int32 [", tw.size(0), "], got ",
                  status.scalar_type(), " ", status.sizes()));
  TORCH_CHECK(tw.device() == tiles.device() && status.device() == tiles.device(), bk::msg(op,
              ": all tensors must be on one device"));
  if (n_b + n_a == 0) return;
  c10::cuda::CUDAGuard guard(tiles.device());
  const int err = bk_grouped_rescale_launch(reinterpret_cast<const long long*>(tiles.data_ptr<int64_t>()), (int)n_b,
                                            (int)n_a, (int)r, (int)tw.size(2), (int)dtype, tw.data_ptr<float>(),
                                            status.data_ptr<int>(), (int)skip_bits, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, bk::msg(op, ": launch failed for ", n_b + n_a, " tiles, r=", r, ": ", bk_error_string(err)));
}

// Whether float32 ranks 33 to 64 take csrc/grouped_mma.cu's wgmma kernels on GPU `device` (an sm_90a image in this
// build, loaded there: a compute capability 9.0 GPU) rather than its mma.sync ones (ranks 17 to 32 always do).
bool grouped_mma_wgmma(int64_t device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return bk_grouped_mma_wgmma() != 0;
}

}  // namespace

TORCH_LIBRARY(balora, m) {
  m.def("balance_transforms(Tensor grams, Tensor eps_f, int r, int mode, Tensor(a!) tw, Tensor(b!) status, Tensor(c!) gaps) -> ()");
  m.def("grouped_gram(Tensor tiles, int n_b, int n_a, int r, int dtype, Tensor(a!) partials, Tensor ranges, "
        "Tensor(b!) counters, Tensor(c!) grams) -> ()");
  m.def("grouped_rescale(Tensor tiles, int n_b, int n_a, int r, int dtype, Tensor tw, Tensor status, int skip_bits) -> ()");
  m.def("grouped_mma_wgmma(int device) -> bool", &grouped_mma_wgmma);   // (no tensors: one kernel for every key)
}

TORCH_LIBRARY_IMPL(balora, CUDA, m) {
  m.impl("balance_transforms", &balance_transforms);
  m.impl("grouped_gram", &grouped_gram);
  m.impl("grouped_rescale", &grouped_rescale);
}

// Importable as a Python module too (setup.py builds balora_kernels._C); the ops register on load.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "balora_kernels CUDA extension (torch.ops.balora)"; }
