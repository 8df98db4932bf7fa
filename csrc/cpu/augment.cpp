// The per-pixel stages of the MoCo augmentation on the CPU, the same math as kernels/augment.py (and the
// spec, moco_fast/reference.py: crop_resize_ref, color_augment_ref), one sample per task of
// at::parallel_for. They let a CPU machine augment whole batches of in-memory images as tensors instead of
// one PIL image at a time in worker processes that compete with the training step for the cores.
//   crop_resize: ATen's antialiased bilinear (PIL's triangle filter), separable: each crop row filtered
//     along x into a small buffer, then along y; weights normalised by their sum, x before y as ATen.
//   color_augment: per sample the contrast mean (the grayscale mean of the image just before contrast in
//     that sample's order), then per pixel grayscale / ColorJitter in the sample's order / flip /
//     normalise, stored through out's strides in out's dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace {

// One axis of the filter: output o reads taps [xmin[o], xmin[o] + xsize[o]) with weights w[o * taps + j].
struct Axis {
  std::vector<int64_t> xmin, xsize;
  std::vector<float> w;
  int64_t taps = 0;
};

// The filter taps along an axis whose crop is `crop` long, resized to `size`: ceil(2 * support) + 1 with
// support = max(crop / size, 1), never more than the crop (moco_fast.ops.augment.taps bounds it).
int64_t taps_of(int64_t crop, int64_t size) {
  const float scale = static_cast<float>(crop) / static_cast<float>(size);
  return std::min<int64_t>(static_cast<int64_t>(std::ceil(2.f * (scale >= 1.f ? scale : 1.f))) + 1, crop);
}

Axis axis_weights(int64_t crop, int64_t size) {
  const float scale = static_cast<float>(crop) / static_cast<float>(size);
  const float support = scale >= 1.f ? scale : 1.f, invscale = scale >= 1.f ? 1.f / scale : 1.f;
  Axis a;
  a.taps = taps_of(crop, size);
  a.xmin.resize(size), a.xsize.resize(size), a.w.assign(size * a.taps, 0.f);
  for (int64_t o = 0; o < size; ++o) {
    const float center = scale * (static_cast<float>(o) + 0.5f);
    const int64_t xmin = std::max<int64_t>(static_cast<int64_t>(std::floor(center - support + 0.5f)), 0);
    const int64_t xsize = std::min<int64_t>(std::min<int64_t>(
        static_cast<int64_t>(std::floor(center + support + 0.5f)), crop) - xmin, a.taps);
    float total = 0.f;
    for (int64_t j = 0; j < xsize; ++j) {
      const float w = std::max(1.f - std::fabs(static_cast<float>(j + xmin) - center + 0.5f) * invscale, 0.f);
      a.w[o * a.taps + j] = w;
      total += w;
    }
    for (int64_t j = 0; j < xsize; ++j) a.w[o * a.taps + j] /= total;
    a.xmin[o] = xmin, a.xsize[o] = xsize;
  }
  return a;
}

void crop_resize_one(const uint8_t* img, int64_t width, int64_t plane, int64_t top, int64_t left,
                     int64_t crop_h, int64_t crop_w, int64_t size, float* out) {
  const Axis ax = axis_weights(crop_w, size), ay = axis_weights(crop_h, size);
  std::vector<float> rows(3 * crop_h * size);  // [c][crop row][output column]
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t y = 0; y < crop_h; ++y) {
      const uint8_t* src = img + c * plane + (top + y) * width + left;
      float* dst = rows.data() + (c * crop_h + y) * size;
      for (int64_t ox = 0; ox < size; ++ox) {
        const float* w = ax.w.data() + ox * ax.taps;
        const uint8_t* s = src + ax.xmin[ox];
        float acc = 0.f;
        for (int64_t j = 0; j < ax.xsize[ox]; ++j) acc += w[j] * static_cast<float>(s[j]);
        dst[ox] = acc;
      }
    }
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t oy = 0; oy < size; ++oy) {
      const float* w = ay.w.data() + oy * ay.taps;
      float* dst = out + (c * size + oy) * size;
      for (int64_t ox = 0; ox < size; ++ox) {
        const float* src = rows.data() + (c * crop_h + ay.xmin[oy]) * size + ox;
        float acc = 0.f;
        for (int64_t j = 0; j < ay.xsize[oy]; ++j) acc += w[j] * src[j * size];
        dst[ox] = acc / 255.f;
      }
    }
}

at::Tensor crop_resize_cpu(const at::Tensor& data, const at::Tensor& offsets, const at::Tensor& heights,
                           const at::Tensor& widths, const at::Tensor& boxes, int64_t size, int64_t max_taps_y,
                           int64_t max_taps_x) {
  TORCH_CHECK(data.dim() == 1 && data.scalar_type() == at::kByte && data.is_contiguous(),
              "crop_resize_kernel: data must be contiguous 1-D uint8");
  const int64_t n = boxes.size(0);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && offsets.numel() == n && heights.numel() == n &&
              widths.numel() == n, "crop_resize_kernel: offsets, heights, widths (N,) and boxes (N, 4)");
  const auto o = offsets.to(at::kLong).contiguous(), h = heights.to(at::kLong).contiguous();
  const auto w = widths.to(at::kLong).contiguous(), b = boxes.to(at::kLong).contiguous();
  const int64_t *po = o.data_ptr<int64_t>(), *ph = h.data_ptr<int64_t>(), *pw = w.data_ptr<int64_t>();
  const int64_t* pb = b.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {  // the public op checks this too; a kernel never reads out of bounds
    const int64_t* box = pb + 4 * i;
    TORCH_CHECK(box[0] >= 0 && box[1] >= 0 && box[2] >= 1 && box[3] >= 1 && box[0] + box[2] <= ph[i] &&
                box[1] + box[3] <= pw[i] && po[i] >= 0 && po[i] + 3 * ph[i] * pw[i] <= data.numel(),
                "crop_resize_kernel: box ", i, " lies outside its image");
    // the bound the Triton kernel's loops are sized by: a wrong one would truncate its filter there, so
    // the C++ kernel (which sizes each crop's filter itself) refuses it too, and the two agree on inputs
    TORCH_CHECK(taps_of(box[2], size) <= max_taps_y && taps_of(box[3], size) <= max_taps_x,
                "crop_resize_kernel: box ", i, " needs ", taps_of(box[2], size), " x ", taps_of(box[3], size),
                " filter taps; max_taps_y, max_taps_x = ", max_taps_y, ", ", max_taps_x, " are too small");
  }
  at::Tensor out = at::empty({n, 3, size, size}, data.options().dtype(at::kFloat));
  const uint8_t* src = data.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t* box = pb + 4 * i;
      crop_resize_one(src + po[i], pw[i], ph[i] * pw[i], box[0], box[1], box[2], box[3], size,
                      dst + i * 3 * size * size);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------ color_augment
inline float clamp01(float v) { return std::min(std::max(v, 0.f), 1.f); }
inline float gray_of(float r, float g, float b) { return 0.2989f * r + 0.587f * g + 0.114f * b; }
inline float blend(float x, float other, float f) { return clamp01(f * x + (1.f - f) * other); }

void hue(float& r, float& g, float& b, float shift) {  // torchvision's _rgb2hsv, shift, _hsv2rgb
  const float maxc = std::max(r, std::max(g, b)), minc = std::min(r, std::min(g, b));
  const bool eqc = maxc == minc;
  const float cr = maxc - minc, s = cr / (eqc ? 1.f : maxc), cr_div = eqc ? 1.f : cr;
  const float rc = (maxc - r) / cr_div, gc = (maxc - g) / cr_div, bc = (maxc - b) / cr_div;
  float h = maxc == r ? bc - gc : maxc == g ? 2.f + rc - bc : 4.f + gc - rc;
  h = h / 6.f + 1.f;
  h = h - std::floor(h);
  h = h + shift;
  h = h - std::floor(h);  // floor-mod by 1
  const float i6 = std::floor(h * 6.f), f = h * 6.f - i6;
  const int i = static_cast<int>(i6) % 6;
  const float v = maxc, p = clamp01(v * (1.f - s)), q = clamp01(v * (1.f - s * f)),
              t = clamp01(v * (1.f - s * (1.f - f)));
  r = (i == 0 || i == 5) ? v : i == 1 ? q : i == 4 ? t : p;
  g = (i == 1 || i == 2) ? v : i == 0 ? t : i == 3 ? q : p;
  b = (i == 3 || i == 4) ? v : i == 2 ? t : i == 5 ? q : p;
}

struct Sample {
  std::array<int64_t, 4> order;
  std::array<float, 4> f;
  bool jitter, gray, gray_first;
};

// (gray if gray_first), the jitter ops in order, (gray if not gray_first); stop_at_contrast: only the ops
// before contrast, the image whose mean contrast blends with.
void chain(float& r, float& g, float& b, const Sample& s, float mean, bool stop_at_contrast) {
  if (s.gray_first && s.gray) r = g = b = gray_of(r, g, b);
  if (s.jitter)
    for (int pos = 0; pos < 4; ++pos) {
      const int64_t op = s.order[pos];
      if (stop_at_contrast && op == 1) break;
      const float f = s.f[op];
      if (op == 0) {
        r = clamp01(f * r), g = clamp01(f * g), b = clamp01(f * b);
      } else if (op == 3) {
        hue(r, g, b, f);
      } else {
        const float other = op == 1 ? mean : gray_of(r, g, b);
        r = blend(r, other, f), g = blend(g, other, f), b = blend(b, other, f);
      }
    }
  if (!s.gray_first && !stop_at_contrast && s.gray) r = g = b = gray_of(r, g, b);
}

template <typename T>
void color_one(const float* x, int64_t H, int64_t W, const Sample& s, bool flip, const float* mean,
               const float* std, T* out, int64_t s_c, int64_t s_h, int64_t s_w) {
  const int64_t HW = H * W;
  float contrast_mean = 0.f;
  if (s.jitter && std::find(s.order.begin(), s.order.end(), 1) != s.order.end()) {
    double total = 0.0;  // the mean ignores the flip
    for (int64_t p = 0; p < HW; ++p) {
      float r = x[p], g = x[HW + p], b = x[2 * HW + p];
      chain(r, g, b, s, 0.f, true);
      total += gray_of(r, g, b);
    }
    contrast_mean = static_cast<float>(total / static_cast<double>(HW));
  }
  for (int64_t y = 0; y < H; ++y)
    for (int64_t c = 0; c < W; ++c) {
      const int64_t p = y * W + (flip ? W - 1 - c : c);
      float r = x[p], g = x[HW + p], b = x[2 * HW + p];
      chain(r, g, b, s, contrast_mean, false);
      T* d = out + y * s_h + c * s_w;
      d[0] = static_cast<T>((r - mean[0]) / std[0]);
      d[s_c] = static_cast<T>((g - mean[1]) / std[1]);
      d[2 * s_c] = static_cast<T>((b - mean[2]) / std[2]);
    }
}

void color_augment_cpu(const at::Tensor& x, const at::Tensor& factors, const at::Tensor& order,
                       const at::Tensor& jitter, const at::Tensor& gray, const at::Tensor& flip,
                       at::ArrayRef<double> mean, at::ArrayRef<double> std, bool gray_first, at::Tensor out) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "color_augment_kernel_: x must be contiguous fp32 (N, 3, H, W)");
  TORCH_CHECK(out.sizes() == x.sizes(), "color_augment_kernel_: out must have x's shape");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "color_augment_kernel_: mean and std take 3 values");
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const auto fa = factors.to(at::kFloat).contiguous(), od = order.to(at::kLong).contiguous();
  const auto ji = jitter.to(at::kBool).contiguous(), gr = gray.to(at::kBool).contiguous();
  const auto fl = flip.to(at::kBool).contiguous();
  if (N > 0)
    TORCH_CHECK(od.min().item<int64_t>() >= 0 && od.max().item<int64_t>() <= 3,
                "color_augment_kernel_: order must hold op codes 0..3");
  const float m[3] = {float(mean[0]), float(mean[1]), float(mean[2])}, d[3] = {float(std[0]), float(std[1]), float(std[2])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "color_augment_kernel_", [&] {
    const float* px = x.data_ptr<float>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        Sample s;
        for (int j = 0; j < 4; ++j) s.order[j] = od.data_ptr<int64_t>()[4 * n + j], s.f[j] = fa.data_ptr<float>()[4 * n + j];
        s.jitter = ji.data_ptr<bool>()[n], s.gray = gr.data_ptr<bool>()[n], s.gray_first = gray_first;
        color_one<scalar_t>(px + n * 3 * H * W, H, W, s, fl.data_ptr<bool>()[n], m, d, po + n * out.stride(0),
                            out.stride(1), out.stride(2), out.stride(3));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(moco_fast, CPU, m) {
  m.impl("crop_resize_kernel", &crop_resize_cpu);
  m.impl("color_augment_kernel_", &color_augment_cpu);
}
