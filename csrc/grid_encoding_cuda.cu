// Grid encoding, CUDA kernels (built only where torch has CUDA; see grid_encoding.h for the
// semantics and grid_encoding.cpp for the checks done before these run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "grid_encoding.h"

namespace fastsrt {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work) { return (work + kThreads - 1) / kThreads; }

// One thread per (point, level): reads the point's 4 vertex rows, writes F outputs.
template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ coords, const scalar_t* __restrict__ table,
                               scalar_t* __restrict__ out, int64_t work, int64_t points, int64_t rows, int features,
                               Levels levels) {
  const int64_t task = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (task >= work) return;
  const int64_t i = task / levels.count;
  const int l = static_cast<int>(task % levels.count);
  const Cell<scalar_t> cell(coords[2 * i], coords[2 * i + 1], levels, l);
  interpolate(cell, table + (i / points) * rows * features, features, out + task * features);
}

// One thread per (point, level), scattering into the table gradient with atomics.
template <typename scalar_t>
__global__ void backward_table_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ coords,
                                      scalar_t* __restrict__ grad_table, int64_t work, int64_t points, int64_t rows,
                                      int features, Levels levels) {
  const int64_t task = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (task >= work) return;
  const int64_t i = task / levels.count;
  const int l = static_cast<int>(task % levels.count);
  const Cell<scalar_t> cell(coords[2 * i], coords[2 * i + 1], levels, l);
  const scalar_t* grad = grad_out + task * features;
  scalar_t* image_grad = grad_table + (i / points) * rows * features;
  for (int k = 0; k < 4; ++k) {
    for (int f = 0; f < features; ++f) atomicAdd(image_grad + cell.row[k] * features + f, cell.weight[k] * grad[f]);
  }
}

// One thread per point, summing over levels: each coordinate gradient is written once.
template <typename scalar_t>
__global__ void backward_coords_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ coords,
                                       const scalar_t* __restrict__ table, scalar_t* __restrict__ grad_coords,
                                       int64_t work, int64_t points, int64_t rows, int features, Levels levels) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= work) return;
  const scalar_t* image_table = table + (i / points) * rows * features;
  scalar_t gx = 0, gy = 0;
  for (int l = 0; l < levels.count; ++l) {
    const Cell<scalar_t> cell(coords[2 * i], coords[2 * i + 1], levels, l);
    add_coordinate_gradient(cell, image_table, grad_out + (i * levels.count + l) * features, features,
                            levels.resolution[l], gx, gy);
  }
  grad_coords[2 * i] = gx;
  grad_coords[2 * i + 1] = gy;
}

}  // namespace

void forward_cuda(const at::Tensor& coords, const at::Tensor& table, const Levels& levels, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t work = coords.size(0) * coords.size(1) * levels.count;
  if (work == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "grid_encoding_forward_cuda", [&] {
    forward_kernel<scalar_t><<<static_cast<unsigned int>(blocks_for(work)), kThreads, 0, stream>>>(
        coords.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), work, coords.size(1),
        table.size(1), static_cast<int>(table.size(2)), levels);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward_table_cuda(const at::Tensor& grad_out, const at::Tensor& coords, const Levels& levels,
                         at::Tensor& grad_table) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t work = coords.size(0) * coords.size(1) * levels.count;
  if (work == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "grid_encoding_backward_table_cuda", [&] {
    backward_table_kernel<scalar_t><<<static_cast<unsigned int>(blocks_for(work)), kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), coords.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>(), work,
        coords.size(1), grad_table.size(1), static_cast<int>(grad_table.size(2)), levels);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward_coords_cuda(const at::Tensor& grad_out, const at::Tensor& coords, const at::Tensor& table,
                          const Levels& levels, at::Tensor& grad_coords) {
  const c10::cuda::CUDAGuard guard(coords.device());
  const int64_t work = coords.size(0) * coords.size(1);
  if (work == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(coords.scalar_type(), "grid_encoding_backward_coords_cuda", [&] {
    backward_coords_kernel<scalar_t><<<static_cast<unsigned int>(blocks_for(work)), kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), coords.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
        grad_coords.data_ptr<scalar_t>(), work, coords.size(1), table.size(1), static_cast<int>(table.size(2)), levels);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastsrt
