// Patch embedding: a conv2d whose stride equals its kernel (no padding, no overlap), as SigLIP's
// Conv2d(3 → 1152, kernel 14, stride 14, "valid").
//
// Layout: pixels (B, C, H, W), weight (O, C, P, P), bias (O) optional → out (B, N, O) with
// Nh = H / P, Nw = W / P (floor, like conv2d: trailing rows/columns are ignored), N = Nh·Nw and
// patch token t = row·Nw + col — the conv output (B, O, Nh, Nw) flattened row-major over the
// spatial dims and transposed, exactly HF's `patch_embeds.flatten(2).transpose(1, 2)`.
//
// Implementation: patches are gathered into a (B·N, C·P·P) matrix (each pixel appears at most
// once, since stride = kernel), multiplied by weightᵀ in fp32 (double for f64) and rounded once.
// Backward: gW = goutᵀ·patches, gb = Σ gout, gpatches = gout·W scattered back (uncovered
// pixels get 0). pixels, weight and bias must share one dtype (HF casts pixels to the conv
// weight's dtype first). The pixel gradient is optional (images never need one in training).
//
// On CUDA only the patch gather/scatter is a kernel of this op (kernels/patch_embed.cuh); the
// products are ops::matmul / linear on the device, in the pixels' dtype (bf16 tensor cores with
// fp32 accumulation, one rounding per product). The bias is added by linear, so in bf16 the
// result is rounded once more than the CPU's fp32 path when linear adds it separately.
#pragma once


#include "tq/ops/matmul.hpp"

namespace tq {

namespace ops {

// CUDA entry points, filled in by <tq/cuda.hpp> (kernels/patch_embed.cuh); empty in a CPU-only
// program. Patches are (B·N, C·P·P) in the pixels' dtype, column (c, i, j) = c·P² + i·P + j.
struct PatchEmbedCudaKernels {
  Tensor (*to_patches)(const Tensor& pixels, int64_t P) = nullptr;
  // pixels (B, C, H, W) from patches; pixels no patch covers are 0.
  Tensor (*from_patches)(const Tensor& patches, const Shape& pixel_shape, int64_t P) = nullptr;
};
inline PatchEmbedCudaKernels& cuda_patch_embed_kernels() {
  static PatchEmbedCudaKernels k;
  return k;
}

namespace detail {

struct PatchGeom {
  int64_t B, C, H, W, O, P, Nh, Nw;
  int64_t N() const { return Nh * Nw; }
  int64_t K() const { return C * P * P; }
};

inline PatchGeom check_patch_args(const char* op, const Tensor& pixels, const Tensor& weight, const Tensor& bias) {
  require_same_device(op, pixels, weight, bias);
  require_float(op, pixels, weight, bias);
  TQ_CHECK(pixels.dim() == 4, op, ": pixels must be (B, C, H, W), got ", describe(pixels));
  TQ_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.size(2) > 0, op,
           ": weight must be (O, C, P, P), got ", describe(weight));
  TQ_CHECK(weight.size(1) == pixels.size(1), op, ": weight ", describe(weight), " expects ", weight.size(1),
           " channels, pixels ", describe(pixels), " have ", pixels.size(1));
  TQ_CHECK(pixels.dtype() == weight.dtype() && (!bias.defined() || bias.dtype() == weight.dtype()), op,
           ": dtype mismatch: pixels ", describe(pixels), ", weight ", describe(weight), ", bias ", describe(bias));
  TQ_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == weight.size(0)), op, ": bias ", describe(bias),
           " does not match weight ", describe(weight));
  const int64_t P = weight.size(2);
  TQ_CHECK(pixels.size(2) >= P && pixels.size(3) >= P, op, ": image ", describe(pixels), " is smaller than the patch ",
           P, "x", P);
  return {pixels.size(0), pixels.size(1), pixels.size(2), pixels.size(3), weight.size(0), P, pixels.size(2) / P,
          pixels.size(3) / P};
}

// Moves between pixels (B, C, H, W) and patches (B·N, C·P·P), column (c, i, j) = c·P² + i·P + j.
template <class C>
void patches_copy(const PatchGeom& g, C* pixels, C* patches, bool to_patches) {
  parallel_for(g.B * g.N(), 4, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / g.N(), row = (r % g.N()) / g.Nw, col = r % g.Nw;
      C* pr = patches + r * g.K();
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t i = 0; i < g.P; ++i) {
          C* px = pixels + ((b * g.C + c) * g.H + row * g.P + i) * g.W + col * g.P;
          C* pp = pr + (c * g.P + i) * g.P;
          for (int64_t j = 0; j < g.P; ++j) {
            if (to_patches) pp[j] = px[j];
            else px[j] = pp[j];
          }
        }
    }
  });
}

inline Tensor to_patches(const PatchGeom& g, const Tensor& pixels, DType ct) {
  Tensor pc = dense(pixels, ct);
  Tensor patches = Tensor::empty({g.B * g.N(), g.K()}, ct);
  TQ_DISPATCH_FLOAT(ct, C, patches_copy<C>(g, pc.data<C>(), patches.data<C>(), true));
  return patches;
}

}  // namespace detail

// out (B, N, O) = patch embedding of pixels (B, C, H, W) by weight (O, C, P, P) and bias (O).
inline Tensor patch_embed(const Tensor& pixels, const Tensor& weight, const Tensor& bias = Tensor()) {
  const auto g = detail::check_patch_args("patch_embed", pixels, weight, bias);
  if (pixels.device().is_cuda()) {
    Tensor patches = call_cuda(cuda_patch_embed_kernels().to_patches, "patch_embed", pixels, g.P);  // (B·N, K)
    Tensor w = weight.detach().contiguous().view({g.O, g.K()});                                     // (O, K)
    Tensor out = ::tq::linear(patches, w, bias.defined() ? bias.detach() : Tensor());               // (B·N, O)
    return out.view({g.B, g.N(), g.O});
  }
  require_cpu("patch_embed", pixels, weight, bias);
  const DType ct = compute_dtype(pixels.dtype());
  Tensor patches = detail::to_patches(g, pixels, ct);                    // (B·N, K)
  Tensor w = dense(weight, ct).view({g.O, g.K()});                       // (O, K)
  Tensor out = ops::matmul(patches, w, false, true);                     // (B·N, O) in ct
  if (bias.defined()) out = ops::binary(BinaryOp::add, out, dense(bias, ct));
  return out.view({g.B, g.N(), g.O}).to(pixels.dtype());
}

struct PatchEmbedGrads {
  Tensor pixels, weight, bias;
};

// need_pixels = false leaves the pixel gradient undefined (and skips its product).
inline PatchEmbedGrads patch_embed_backward(const Tensor& grad_out, const Tensor& pixels, const Tensor& weight,
                                            const Tensor& bias = Tensor(), bool need_pixels = true) {
  const auto g = detail::check_patch_args("patch_embed backward", pixels, weight, bias);
  TQ_CHECK(grad_out.shape() == (Shape{g.B, g.N(), g.O}), "patch_embed backward: gradient ", describe(grad_out),
           " does not match the output (", g.B, ", ", g.N(), ", ", g.O, ")");
  require_same_device("patch_embed backward", pixels, grad_out);
  if (pixels.device().is_cuda()) {
    const char* op = "patch_embed backward";
    Tensor go = grad_out.detach().to(pixels.dtype()).contiguous().view({g.B * g.N(), g.O});   // (B·N, O)
    Tensor patches = call_cuda(cuda_patch_embed_kernels().to_patches, op, pixels, g.P);     // (B·N, K)
    PatchEmbedGrads out;
    out.weight = ops::matmul(go, patches, true, false).view(weight.shape());                // (O, K)
    if (bias.defined()) out.bias = ops::reduce(ReduceKind::sum, go, {0}, false, op);
    if (need_pixels) {
      Tensor w = weight.detach().contiguous().view({g.O, g.K()});                         // (O, K)
      Tensor gp = ops::matmul(go, w, false, false);                                       // (B·N, K)
      out.pixels = call_cuda(cuda_patch_embed_kernels().from_patches, op, gp, pixels.shape(), g.P);
    }
    return out;
  }
  require_cpu("patch_embed backward", grad_out, pixels, weight, bias);
  const DType ct = compute_dtype(pixels.dtype());
  Tensor go = dense(grad_out, ct).view({g.B * g.N(), g.O});           // (B·N, O)
  Tensor patches = detail::to_patches(g, pixels, ct);                  // (B·N, K)
  Tensor w = dense(weight, ct).view({g.O, g.K()});                     // (O, K)
  PatchEmbedGrads out;
  out.weight = ops::matmul(go, patches, true, false).view(weight.shape()).to(weight.dtype());  // (O, K)
  if (bias.defined()) out.bias = ops::reduce(ReduceKind::sum, go, {0}, false, "patch_embed backward").to(bias.dtype());
  if (!need_pixels) return out;
  Tensor gp = ops::matmul(go, w, false, false);                        // (B·N, K)
  Tensor gpix = Tensor::zeros(pixels.shape(), ct);
  TQ_DISPATCH_FLOAT(ct, C, detail::patches_copy<C>(g, gpix.data<C>(), gp.data<C>(), false));
  out.pixels = gpix.to(pixels.dtype());
  return out;
}

}  // namespace ops

// ---- differentiable wrapper ----

inline Tensor patch_embed(const Tensor& pixels, const Tensor& weight, const Tensor& bias = Tensor()) {
  Tensor out = ops::patch_embed(pixels, weight, bias);
  Tensor pd = pixels.detach(), wd = weight.detach(), bd = bias.defined() ? bias.detach() : Tensor();
  const bool need_pixels = pixels.requires_grad();
  return record("patch_embed", out, {pixels, weight, bias}, [=](const Tensor& g) {
    ops::PatchEmbedGrads gr = ops::patch_embed_backward(g, pd, wd, bd, need_pixels);
    return std::vector<Tensor>{gr.pixels, gr.weight, gr.bias};
  });
}

}  // namespace tq
