// XLA FFI handlers that run oneDNN's convolution and matmul primitives.
//
// Used by mnist_jax/onednn.py on XLA:CPU for the training step's operations
// whose XLA:CPU kernels are slow (conv2's kernel gradient, the fc3 GEMMs).
// Activations are NHWC, kernels HWIO, matrices row-major, all float32 or all
// bfloat16 (the result too; oneDNN accumulates in float32, on AMX or
// AVX512-BF16 where the CPU has them); the handlers compute exactly the
// functions mnist_jax/ops.py defines.
//
// oneDNN primitives are created once per shape (creation costs milliseconds)
// and cached; executing one primitive from several threads is thread-safe,
// and every call makes its own stream.

#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A cached primitive and the memory descriptors its arguments must have.
struct Entry {
  dnnl::primitive primitive;
  memory::desc result_md;   // what the primitive writes
  memory::desc user_md;     // what the caller's result buffer holds
  bool reorder = false;     // result_md != user_md
  dnnl::reorder to_user;
  memory::desc scratch_md;
  // Weights the primitive wants in another layout than the caller's (HWIO),
  // reordered on every call (kernels are small).
  bool weights_reorder = false;
  memory::desc weights_md;
  dnnl::reorder from_user;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;

template <typename Make>
std::shared_ptr<Entry> Cached(const std::string& key, Make make) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto entry = std::make_shared<Entry>(make());
  cache.emplace(key, entry);
  return entry;
}

// The oneDNN data type of a buffer type the handlers accept.
bool DnnlType(ffi::DataType type, dt* out) {
  switch (type) {
    case ffi::DataType::F32:
      *out = dt::f32;
      return true;
    case ffi::DataType::BF16:
      *out = dt::bf16;
      return true;
    default:
      return false;
  }
}

// The common data type of the buffers, or an error naming `op`.
ffi::Error CommonType(const char* op,
                      std::initializer_list<ffi::DataType> types, dt* out) {
  ffi::DataType first = *types.begin();
  for (ffi::DataType t : types) {
    if (t != first || !DnnlType(t, out)) {
      return ffi::Error::InvalidArgument(
          std::string(op) + ": all buffers float32 or all bfloat16");
    }
  }
  return ffi::Error::Success();
}

std::string Key(const char* op, dt type,
                std::initializer_list<int64_t> values) {
  std::ostringstream out;
  out << op << ':' << static_cast<int>(type);
  for (int64_t v : values) out << ':' << v;
  return out.str();
}

// Runs `entry` with the given inputs; the result goes to `result` (through a
// reorder when the primitive prefers another layout).
ffi::Error Execute(const Entry& entry,
                   std::initializer_list<std::pair<int, memory>> inputs,
                   int result_arg, void* result) {
  try {
    dnnl::stream stream(Engine());
    std::unordered_map<int, memory> args(inputs.begin(), inputs.end());
    memory user(entry.user_md, Engine(), result);
    memory out = entry.reorder ? memory(entry.result_md, Engine()) : user;
    args[result_arg] = out;
    memory scratch(entry.scratch_md, Engine());
    args[DNNL_ARG_SCRATCHPAD] = scratch;
    entry.primitive.execute(stream, args);
    if (entry.reorder) entry.to_user.execute(stream, out, user);
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

dnnl::primitive_attr ScratchpadAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Kernel gradient of a stride-1 NHWC x HWIO convolution:
//   dk[i, j, c, o] = sum_{n, h, w} xpad[n, h + i, w + j, c] * g[n, h, w, o].
ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer g,
                               ffi::Result<ffi::AnyBuffer> dk, int64_t pad_t,
                               int64_t pad_b, int64_t pad_l, int64_t pad_r) {
  auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4) {
    return ffi::Error::InvalidArgument("conv_bwd_weights: rank-4 buffers");
  }
  dt d;
  if (auto err = CommonType("conv_bwd_weights", {x.element_type(),
                            g.element_type(), dk->element_type()}, &d);
      err.failure()) {
    return err;
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3];
  const int64_t oh = gd[1], ow = gd[2], o = gd[3], kh = kd[0], kw = kd[1];
  std::shared_ptr<Entry> entry;
  try {
    entry = Cached(
        Key("bwd_w", d, {n, h, w, c, oh, ow, o, kh, kw, pad_t, pad_b, pad_l,
                         pad_r}),
        [&] {
          memory::desc src({n, c, h, w}, d, tag::nhwc);
          memory::desc dst({n, o, oh, ow}, d, tag::nhwc);
          memory::desc weights_any({o, c, kh, kw}, d, tag::any);
          memory::dims strides{1, 1}, pad_l_{pad_t, pad_l},
              pad_r_{pad_b, pad_r};
          auto fwd = dnnl::convolution_forward::primitive_desc(
              Engine(), dnnl::prop_kind::forward_training,
              dnnl::algorithm::convolution_direct, src, weights_any, dst,
              strides, pad_l_, pad_r_);
          auto pd = dnnl::convolution_backward_weights::primitive_desc(
              Engine(), dnnl::algorithm::convolution_direct, src, weights_any,
              dst, strides, pad_l_, pad_r_, fwd, ScratchpadAttr());
          Entry e;
          e.primitive = dnnl::convolution_backward_weights(pd);
          e.result_md = pd.diff_weights_desc();
          e.user_md = memory::desc({o, c, kh, kw}, d, tag::hwio);
          e.reorder = e.result_md != e.user_md;
          if (e.reorder) {
            e.to_user = dnnl::reorder(memory(e.result_md, Engine()),
                                      memory(e.user_md, Engine()));
          }
          e.scratch_md = pd.scratchpad_desc();
          return e;
        });
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN conv_bwd_weights: ") + e.what());
  }
  memory::desc src({n, c, h, w}, d, tag::nhwc);
  memory::desc dst({n, o, oh, ow}, d, tag::nhwc);
  return Execute(*entry,
                 {{DNNL_ARG_SRC, memory(src, Engine(), x.untyped_data())},
                  {DNNL_ARG_DIFF_DST, memory(dst, Engine(), g.untyped_data())}},
                 DNNL_ARG_DIFF_WEIGHTS, dk->untyped_data());
}

// Forward (y = x (*) k) and input gradient (dx from g) of a stride-1
// NHWC x HWIO convolution; `backward_data` picks which. Buffers: x or g
// first, the kernel second.
ffi::Error Conv(ffi::AnyBuffer in, ffi::AnyBuffer kernel,
                ffi::Result<ffi::AnyBuffer> out, int64_t pad_t, int64_t pad_b,
                int64_t pad_l, int64_t pad_r, bool backward_data) {
  auto id = in.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  if (id.size() != 4 || kd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("conv: rank-4 buffers");
  }
  dt d;
  if (auto err = CommonType("conv", {in.element_type(), kernel.element_type(),
                                     out->element_type()}, &d);
      err.failure()) {
    return err;
  }
  const int64_t kh = kd[0], kw = kd[1], c = kd[2], o = kd[3];
  // src: x [n, h, w, c]; dst: y [n, oh, ow, o].
  const auto& xd = backward_data ? od : id;
  const auto& yd = backward_data ? id : od;
  const int64_t n = xd[0], h = xd[1], w = xd[2], oh = yd[1], ow = yd[2];
  memory::desc src({n, c, h, w}, d, tag::nhwc);
  memory::desc dst({n, o, oh, ow}, d, tag::nhwc);
  memory::desc user_w({o, c, kh, kw}, d, tag::hwio);
  std::shared_ptr<Entry> entry;
  try {
    entry = Cached(
        Key(backward_data ? "bwd_d" : "fwd", d,
            {n, h, w, c, oh, ow, o, kh, kw, pad_t, pad_b, pad_l, pad_r}),
        [&] {
          memory::dims strides{1, 1}, pad_l_{pad_t, pad_l},
              pad_r_{pad_b, pad_r};
          memory::desc any_w({o, c, kh, kw}, d, tag::any);
          auto fwd = dnnl::convolution_forward::primitive_desc(
              Engine(), dnnl::prop_kind::forward_training,
              dnnl::algorithm::convolution_direct, src, any_w, dst, strides,
              pad_l_, pad_r_, backward_data ? dnnl::primitive_attr()
                                            : ScratchpadAttr());
          Entry e;
          if (backward_data) {
            auto pd = dnnl::convolution_backward_data::primitive_desc(
                Engine(), dnnl::algorithm::convolution_direct, src, any_w,
                dst, strides, pad_l_, pad_r_, fwd, ScratchpadAttr());
            e.primitive = dnnl::convolution_backward_data(pd);
            e.scratch_md = pd.scratchpad_desc();
            e.result_md = e.user_md = src;
            e.weights_md = pd.weights_desc();
          } else {
            e.primitive = dnnl::convolution_forward(fwd);
            e.scratch_md = fwd.scratchpad_desc();
            e.result_md = e.user_md = dst;
            e.weights_md = fwd.weights_desc();
          }
          e.weights_reorder = e.weights_md != user_w;
          if (e.weights_reorder) {
            e.from_user = dnnl::reorder(memory(user_w, Engine()),
                                        memory(e.weights_md, Engine()));
          }
          return e;
        });
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN conv: ") + e.what());
  }
  memory w_mem(user_w, Engine(), kernel.untyped_data());
  if (entry->weights_reorder) {
    try {
      memory reordered(entry->weights_md, Engine());
      dnnl::stream stream(Engine());
      entry->from_user.execute(stream, w_mem, reordered);
      stream.wait();
      w_mem = reordered;
    } catch (const dnnl::error& e) {
      return ffi::Error(ffi::ErrorCode::kInternal,
                        std::string("oneDNN reorder: ") + e.what());
    }
  }
  if (backward_data) {
    return Execute(*entry,
                   {{DNNL_ARG_DIFF_DST, memory(dst, Engine(), in.untyped_data())},
                    {DNNL_ARG_WEIGHTS, w_mem}},
                   DNNL_ARG_DIFF_SRC, out->untyped_data());
  }
  return Execute(*entry,
                 {{DNNL_ARG_SRC, memory(src, Engine(), in.untyped_data())},
                  {DNNL_ARG_WEIGHTS, w_mem}},
                 DNNL_ARG_DST, out->untyped_data());
}

// c[M, N] = op(a) @ op(b), op transposing when asked; row-major buffers
// (a is [M, K], or [K, M] when transposed; b is [K, N] or [N, K]).
ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b,
                  ffi::Result<ffi::AnyBuffer> c, bool transpose_a,
                  bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) {
    return ffi::Error::InvalidArgument("matmul: rank-2 buffers");
  }
  dt d;
  if (auto err = CommonType("matmul", {a.element_type(), b.element_type(),
                                       c->element_type()}, &d);
      err.failure()) {
    return err;
  }
  const int64_t m = transpose_a ? ad[1] : ad[0];
  const int64_t k = transpose_a ? ad[0] : ad[1];
  const int64_t n = transpose_b ? bd[0] : bd[1];
  memory::desc a_md({m, k}, d, transpose_a ? tag::ba : tag::ab);
  memory::desc b_md({k, n}, d, transpose_b ? tag::ba : tag::ab);
  memory::desc c_md({m, n}, d, tag::ab);
  std::shared_ptr<Entry> entry;
  try {
    entry = Cached(Key("matmul", d, {m, k, n, transpose_a, transpose_b}), [&] {
      auto pd = dnnl::matmul::primitive_desc(Engine(), a_md, b_md, c_md,
                                             ScratchpadAttr());
      Entry e;
      e.primitive = dnnl::matmul(pd);
      e.result_md = e.user_md = c_md;
      e.scratch_md = pd.scratchpad_desc();
      return e;
    });
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN matmul: ") + e.what());
  }
  return Execute(*entry,
                 {{DNNL_ARG_SRC, memory(a_md, Engine(), a.untyped_data())},
                  {DNNL_ARG_WEIGHTS, memory(b_md, Engine(), b.untyped_data())}},
                 DNNL_ARG_DST, c->untyped_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MnistOnednnConvBackwardWeights,
                              ConvBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad_t")
                                  .Attr<int64_t>("pad_b")
                                  .Attr<int64_t>("pad_l")
                                  .Attr<int64_t>("pad_r"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MnistOnednnConv, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad_t")
                                  .Attr<int64_t>("pad_b")
                                  .Attr<int64_t>("pad_l")
                                  .Attr<int64_t>("pad_r")
                                  .Attr<bool>("backward_data"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MnistOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

// Which implementation oneDNN picked for a shape (for benchmarks and tests):
// `bf16` picks bfloat16 buffers over float32; writes a NUL-terminated
// string into `out` and returns its length.
extern "C" int64_t MnistOnednnImplInfo(int64_t kind, const int64_t* dims,
                                       int64_t bf16, char* out, int64_t size) {
  std::string info;
  const dt d = bf16 ? dt::bf16 : d;
  try {
    if (kind != 1) {  // conv (0 bwd_w, 2 fwd, 3 fwd + bwd_d): n h w c oh ow o
                      // kh kw pt pb pl pr
      memory::desc src({dims[0], dims[3], dims[1], dims[2]}, d,
                       tag::nhwc);
      memory::desc dst({dims[0], dims[6], dims[4], dims[5]}, d,
                       tag::nhwc);
      memory::desc wa({dims[6], dims[3], dims[7], dims[8]}, d, tag::any);
      memory::dims s{1, 1}, pl{dims[9], dims[11]}, pr{dims[10], dims[12]};
      auto fwd = dnnl::convolution_forward::primitive_desc(
          Engine(), dnnl::prop_kind::forward_training,
          dnnl::algorithm::convolution_direct, src, wa, dst, s, pl, pr);
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, src, wa, dst, s, pl,
          pr, fwd);
      info = pd.impl_info_str();
      if (kind == 2) info = fwd.impl_info_str();
      if (kind == 3) {
        memory::desc wu({dims[6], dims[3], dims[7], dims[8]}, d,
                        tag::any);
        auto fwd_u = dnnl::convolution_forward::primitive_desc(
            Engine(), dnnl::prop_kind::forward_training,
            dnnl::algorithm::convolution_direct, src, wu, dst, s, pl, pr);
        info = std::string("fwd ") + fwd_u.impl_info_str() +
               ", bwd_d " +
               dnnl::convolution_backward_data::primitive_desc(
                   Engine(), dnnl::algorithm::convolution_direct, src, wu,
                   dst, s, pl, pr, fwd_u)
                   .impl_info_str();
      }
    } else {  // matmul: m k n ta tb
      memory::desc a({dims[0], dims[1]}, d, dims[3] ? tag::ba : tag::ab);
      memory::desc b({dims[1], dims[2]}, d, dims[4] ? tag::ba : tag::ab);
      memory::desc c({dims[0], dims[2]}, d, tag::ab);
      info = dnnl::matmul::primitive_desc(Engine(), a, b, c).impl_info_str();
    }
  } catch (const dnnl::error& e) {
    info = std::string("error: ") + e.what();
  }
  if (size > 0) {
    auto len = std::min<int64_t>(size - 1, info.size());
    info.copy(out, len);
    out[len] = '\0';
  }
  return info.size();
}
