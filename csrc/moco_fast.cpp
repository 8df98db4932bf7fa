// The schema of every C++ kernel op in the `moco_fast` namespace. CPU implementations live in
// csrc/cpu/<op>.cpp, CUDA ones in csrc/cuda/<op>.cu; each registers itself with TORCH_LIBRARY_IMPL.
// These are the low-level kernels: the public, autograd-aware and compile-friendly ops
// (moco_fast::infonce, ...) are registered in Python (moco_fast/ops) and call these.
#include <torch/extension.h>

TORCH_LIBRARY(moco_fast, m) {
  // Each is the kernel of the custom op of its name without "_kernel" (moco_fast::infonce, ...).
  // One pass over the queue: returns (mean loss, dL/dq for an upstream gradient of 1, [acc1, acc5]).
  // loss and dL/dq are float32 (float64 when an input is float64); stats are float32. variant: the engine
  // (CUDA "v1" or "v2"; "" on the CPU), chosen by moco_fast/ops/variants.py.
  m.def("infonce_kernel(Tensor q, Tensor k, Tensor queue, float inv_temperature, bool allow_tf32, str variant) "
        "-> (Tensor, Tensor, Tensor)");
  // p_k <- m * p_k + (1 - m) * p_q for every pair; m from m_tensor when given, else from m.
  m.def("momentum_update_kernel_(Tensor(a!)[] params_k, Tensor[] params_q, Tensor? m_tensor, float m) -> ()");
  // queue[(ptr + i) % K] = keys[i] for i < B (the last K keys when B > K); ptr <- (ptr + B) % K.
  m.def("enqueue_kernel_(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys) -> ()");
  // The augmentation's per-pixel stages (CPU only; CUDA tensors take the Triton kernels): packed uint8 CHW
  // images cropped and resized (antialiased bilinear) to (N, 3, size, size) fp32 in [0, 1]; then
  // grayscale, ColorJitter in each sample's order, flip and normalisation written into out.
  // max_taps_y, max_taps_x: a bound on any crop's filter taps per axis (moco_fast.ops.augment.taps), checked.
  m.def("crop_resize_kernel(Tensor data, Tensor offsets, Tensor heights, Tensor widths, Tensor boxes, int size, "
        "int max_taps_y, int max_taps_x) -> Tensor");
  m.def("color_augment_kernel_(Tensor x, Tensor factors, Tensor order, Tensor jitter, Tensor gray, Tensor flip, "
        "float[] mean, float[] std, bool gray_first, Tensor(a!) out) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef MOCO_FAST_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
