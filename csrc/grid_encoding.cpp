// Grid encoding, CPU kernels (OpenMP) and the Python bindings; CUDA tensors go to
// grid_encoding_cuda.cu when the extension was built with it (WITH_CUDA).
//
//   forward(coords (B, N, 2), table (B, E, F), levels (L, 3) int64, out (B, N, L*F))
//   backward(grad_out (B, N, L*F), coords, table, levels, grad_table or None, grad_coords or None)
//
// levels rows are (resolution, first row, rows). Outputs are written in place: `out` and
// `grad_coords` are overwritten entirely, `grad_table` is accumulated into (pass zeros).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <optional>

#include "grid_encoding.h"

namespace fastsrt {
namespace {

Levels levels_from(const at::Tensor& levels, int64_t table_rows) {
  TORCH_CHECK(levels.device().is_cpu() && levels.scalar_type() == at::kLong && levels.dim() == 2 && levels.size(1) == 3,
              "levels must be a CPU int64 tensor (L, 3), got ", levels.sizes(), " ", levels.scalar_type());
  TORCH_CHECK(levels.size(0) >= 1 && levels.size(0) <= kMaxLevels, "levels: 1 to ", kMaxLevels, " levels, got ", levels.size(0));
  const auto rows = levels.contiguous();
  const int64_t* data = rows.data_ptr<int64_t>();
  Levels result{};
  result.count = static_cast<int>(levels.size(0));
  int64_t expected_offset = 0;
  for (int l = 0; l < result.count; ++l) {
    result.resolution[l] = static_cast<int>(data[3 * l]);
    result.offset[l] = data[3 * l + 1];
    result.rows[l] = data[3 * l + 2];
    TORCH_CHECK(result.resolution[l] >= 1 && result.offset[l] == expected_offset && result.rows[l] >= 1 &&
                    result.rows[l] <= (int64_t{1} << 31),
                "levels: bad level ", l, " (resolution ", result.resolution[l], ", offset ", result.offset[l], ", rows ",
                result.rows[l], ")");
    expected_offset += result.rows[l];
  }
  TORCH_CHECK(expected_offset == table_rows, "table has ", table_rows, " rows but the levels need ", expected_offset);
  return result;
}

void check_inputs(const at::Tensor& coords, const at::Tensor& table) {
  TORCH_CHECK(coords.dim() == 3 && coords.size(2) == 2, "coords must be (B, N, 2), got ", coords.sizes());
  TORCH_CHECK(table.dim() == 3 && table.size(0) == coords.size(0), "table must be (B, E, F) with B = ", coords.size(0),
              ", got ", table.sizes());
  TORCH_CHECK(coords.scalar_type() == table.scalar_type() &&
                  (coords.scalar_type() == at::kFloat || coords.scalar_type() == at::kDouble),
              "coords and table must both be float32 or both float64, got ", coords.scalar_type(), " and ",
              table.scalar_type());
  TORCH_CHECK(coords.device() == table.device(), "coords on ", coords.device(), " but table on ", table.device());
  TORCH_CHECK(coords.is_contiguous() && table.is_contiguous(), "coords and table must be contiguous");
}

void check_like(const at::Tensor& tensor, const at::Tensor& like, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(tensor.sizes() == shape, name, " must have shape ", shape, ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == like.scalar_type() && tensor.device() == like.device() && tensor.is_contiguous(),
              name, " must be a contiguous ", like.scalar_type(), " tensor on ", like.device());
}

template <typename scalar_t>
void forward_cpu(const scalar_t* coords, const scalar_t* table, scalar_t* out, int64_t batch, int64_t points,
                 int64_t rows, int features, const Levels& levels) {
  const int64_t width = static_cast<int64_t>(levels.count) * features;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < batch * points; ++i) {
    const scalar_t* image_table = table + (i / points) * rows * features;
    for (int l = 0; l < levels.count; ++l) {
      const Cell<scalar_t> cell(coords[2 * i], coords[2 * i + 1], levels, l);
      interpolate(cell, image_table, features, out + i * width + l * features);
    }
  }
}

// One task per (image, level): the levels own disjoint table rows, so no two threads write the
// same row and the sums are deterministic.
template <typename scalar_t>
void backward_table_cpu(const scalar_t* grad_out, const scalar_t* coords, scalar_t* grad_table, int64_t batch,
                        int64_t points, int64_t rows, int features, const Levels& levels) {
  const int64_t width = static_cast<int64_t>(levels.count) * features;
#pragma omp parallel for schedule(dynamic) num_threads(at::get_num_threads())
  for (int64_t task = 0; task < batch * levels.count; ++task) {
    const int64_t b = task / levels.count;
    const int l = static_cast<int>(task % levels.count);
    scalar_t* image_grad = grad_table + b * rows * features;
    for (int64_t i = b * points; i < (b + 1) * points; ++i) {
      const Cell<scalar_t> cell(coords[2 * i], coords[2 * i + 1], levels, l);
      const scalar_t* grad = grad_out + i * width + l * features;
      for (int k = 0; k < 4; ++k) {
        scalar_t* target = image_grad + cell.row[k] * features;
        for (int f = 0; f < features; ++f) target[f] += cell.weight[k] * grad[f];
      }
    }
  }
}

template <typename scalar_t>
void backward_coords_cpu(const scalar_t* grad_out, const scalar_t* coords, const scalar_t* table,
                         scalar_t* grad_coords, int64_t batch, int64_t points, int64_t rows, int features,
                         const Levels& levels) {
  const int64_t width = static_cast<int64_t>(levels.count) * features;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < batch * points; ++i) {
    const scalar_t* image_table = table + (i / points) * rows * features;
    scalar_t gx = 0, gy = 0;
    for (int l = 0; l < levels.count; ++l) {
      const Cell<scalar_t> cell(coords[2 * i], coords[2 * i + 1], levels, l);
      add_coordinate_gradient(cell, image_table, grad_out + i * width + l * features, features,
                              levels.resolution[l], gx, gy);
    }
    grad_coords[2 * i] = gx;
    grad_coords[2 * i + 1] = gy;
  }
}

void forward(const at::Tensor& coords, const at::Tensor& table, const at::Tensor& levels_tensor, at::Tensor out) {
  check_inputs(coords, table);
  const Levels levels = levels_from(levels_tensor, table.size(1));
  const int64_t batch = coords.size(0), points = coords.size(1), rows = table.size(1);
  const int features = static_cast<int>(table.size(2));
  check_like(out, coords, {batch, points, levels.count * features}, "out");
  if (coords.is_cuda()) {
#ifdef WITH_CUDA
    return forward_cuda(coords, table, levels, out);
#else
    TORCH_CHECK(false, "this build of the grid-encoding extension has no CUDA support");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "grid_encoding_forward", [&] {
    forward_cpu(coords.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), batch, points, rows,
                features, levels);
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& coords, const at::Tensor& table,
              const at::Tensor& levels_tensor, std::optional<at::Tensor> grad_table,
              std::optional<at::Tensor> grad_coords) {
  check_inputs(coords, table);
  const Levels levels = levels_from(levels_tensor, table.size(1));
  const int64_t batch = coords.size(0), points = coords.size(1), rows = table.size(1);
  const int features = static_cast<int>(table.size(2));
  check_like(grad_out, coords, {batch, points, levels.count * features}, "grad_out");
  if (grad_table) check_like(*grad_table, table, table.sizes(), "grad_table");
  if (grad_coords) check_like(*grad_coords, coords, coords.sizes(), "grad_coords");
  if (coords.is_cuda()) {
#ifdef WITH_CUDA
    if (grad_table) backward_table_cuda(grad_out, coords, levels, *grad_table);
    if (grad_coords) backward_coords_cuda(grad_out, coords, table, levels, *grad_coords);
    return;
#else
    TORCH_CHECK(false, "this build of the grid-encoding extension has no CUDA support");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "grid_encoding_backward", [&] {
    if (grad_table)
      backward_table_cpu(grad_out.data_ptr<scalar_t>(), coords.data_ptr<scalar_t>(), grad_table->data_ptr<scalar_t>(),
                         batch, points, rows, features, levels);
    if (grad_coords)
      backward_coords_cpu(grad_out.data_ptr<scalar_t>(), coords.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
                          grad_coords->data_ptr<scalar_t>(), batch, points, rows, features, levels);
  });
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastsrt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsrt's 2-D multi-resolution hash-grid encoding (CPU/OpenMP, CUDA where built)";
  m.def("forward", &fastsrt::forward, "encode coords into out", py::arg("coords"), py::arg("table"), py::arg("levels"),
        py::arg("out"));
  m.def("backward", &fastsrt::backward, "accumulate grad_table, overwrite grad_coords", py::arg("grad_out"),
        py::arg("coords"), py::arg("table"), py::arg("levels"), py::arg("grad_table"), py::arg("grad_coords"));
  m.def("has_cuda", &fastsrt::has_cuda, "whether CUDA kernels were compiled in");
}
