// The 2-D multi-resolution hash-grid encoding (Muller et al. 2022; "DVT stage 1" in
// docs/method.md), shared by the CPU (grid_encoding.cpp) and CUDA (grid_encoding_cuda.cu)
// kernels. fastsrt/ops/grid_encoding/reference.py holds the torch reference with the same semantics:
//
//   level l has resolution R_l; a coordinate c in [0, 1] is scaled to s = c * R_l and falls in
//   cell i = clamp(floor(s), 0, R_l - 1) (s <= 0 or NaN -> 0), fraction f = s - i;
//   the cell's 4 vertices (i, j), (i+1, j), (i, j+1), (i+1, j+1) are looked up in the level's
//   table rows and mixed bilinearly. Vertex (x, y) -> row y * (R_l + 1) + x where the level's
//   (R_l + 1)^2 vertices fit its rows (dense), else (x ^ y * 2654435761) mod rows (uint32 hash).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FASTSRT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTSRT_HOST_DEVICE inline
#endif

namespace fastsrt {

constexpr int kMaxLevels = 32;

// Per-level constants, passed by value (to CUDA kernels as a kernel argument).
struct Levels {
  int count;
  int resolution[kMaxLevels];
  int64_t offset[kMaxLevels];  // first table row of the level
  int64_t rows[kMaxLevels];    // table rows of the level
};

template <typename scalar_t>
FASTSRT_HOST_DEVICE void locate(scalar_t coordinate, int resolution, int& cell, scalar_t& fraction) {
  const scalar_t scaled = coordinate * static_cast<scalar_t>(resolution);
  // truncation is floor for positive values; NaN fails "scaled > 0" and lands in cell 0
  cell = scaled > 0 ? (scaled < static_cast<scalar_t>(resolution) ? static_cast<int>(scaled) : resolution - 1) : 0;
  fraction = scaled - static_cast<scalar_t>(cell);
}

FASTSRT_HOST_DEVICE int64_t vertex_row(int x, int y, int resolution, int64_t rows) {
  const int64_t side = static_cast<int64_t>(resolution) + 1;
  if (side * side <= rows) return static_cast<int64_t>(y) * side + x;
  const uint32_t hash = static_cast<uint32_t>(x) ^ (static_cast<uint32_t>(y) * 2654435761u);
  return static_cast<int64_t>(hash % static_cast<uint32_t>(rows));
}

// The 4 table rows (level offset included) and bilinear weights of a point at one level, in the
// vertex order (i, j), (i+1, j), (i, j+1), (i+1, j+1).
template <typename scalar_t>
struct Cell {
  int64_t row[4];
  scalar_t weight[4];
  scalar_t fx, fy;

  FASTSRT_HOST_DEVICE Cell(scalar_t x, scalar_t y, const Levels& levels, int level) {
    const int resolution = levels.resolution[level];
    int cx, cy;
    locate(x, resolution, cx, fx);
    locate(y, resolution, cy, fy);
    for (int k = 0; k < 4; ++k) {
      const int dx = k & 1, dy = k >> 1;
      row[k] = levels.offset[level] + vertex_row(cx + dx, cy + dy, resolution, levels.rows[level]);
      weight[k] = (dx ? fx : 1 - fx) * (dy ? fy : 1 - fy);
    }
  }
};

// out[f] = the bilinear mix of the cell's 4 rows of `table` (rows of `features` values).
template <typename scalar_t>
FASTSRT_HOST_DEVICE void interpolate(const Cell<scalar_t>& cell, const scalar_t* table, int features, scalar_t* out) {
  for (int f = 0; f < features; ++f) {
    scalar_t value = 0;
    for (int k = 0; k < 4; ++k) value += cell.weight[k] * table[cell.row[k] * features + f];
    out[f] = value;
  }
}

// Adds sum_f grad[f] * d out[f] / d(x, y) of one level to (gx, gy); d fx / dx = resolution.
template <typename scalar_t>
FASTSRT_HOST_DEVICE void add_coordinate_gradient(const Cell<scalar_t>& cell, const scalar_t* table, const scalar_t* grad,
                                                 int features, int resolution, scalar_t& gx, scalar_t& gy) {
  scalar_t sx = 0, sy = 0;
  for (int f = 0; f < features; ++f) {
    const scalar_t v0 = table[cell.row[0] * features + f], v1 = table[cell.row[1] * features + f];
    const scalar_t v2 = table[cell.row[2] * features + f], v3 = table[cell.row[3] * features + f];
    sx += grad[f] * ((1 - cell.fy) * (v1 - v0) + cell.fy * (v3 - v2));
    sy += grad[f] * ((1 - cell.fx) * (v2 - v0) + cell.fx * (v3 - v1));
  }
  gx += sx * static_cast<scalar_t>(resolution);
  gy += sy * static_cast<scalar_t>(resolution);
}

}  // namespace fastsrt

#ifdef WITH_CUDA
#include <ATen/Tensor.h>
namespace fastsrt {
void forward_cuda(const at::Tensor& coords, const at::Tensor& table, const Levels& levels, at::Tensor& out);
void backward_table_cuda(const at::Tensor& grad_out, const at::Tensor& coords, const Levels& levels, at::Tensor& grad_table);
void backward_coords_cuda(const at::Tensor& grad_out, const at::Tensor& coords, const at::Tensor& table,
                          const Levels& levels, at::Tensor& grad_coords);
}  // namespace fastsrt
#endif
