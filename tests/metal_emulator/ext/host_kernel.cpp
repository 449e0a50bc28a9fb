// host_kernel.cpp -- the MLX side of the metal_emulator: a lazy mx::Primitive whose
// eval_cpu runs an emulated Metal kernel (a compiled kernel .so, see ../shim) on the
// buffers of its inputs and outputs. Being a real graph node, it composes with
// mx.compile, mx.custom_function, mx.grad etc. exactly like MLX's CustomKernel.
// Built on first use by _build.py with nanobind (NB_DOMAIN mlx, same ABI as mlx).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

#include "emu_abi.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

using LaunchFn = int (*)(emu_launch*);

// One signature buffer: which input (or output) it comes from and what of it.
enum Kind : int { IN_DATA = 0, IN_SHAPE = 1, IN_STRIDES = 2, IN_NDIM = 3, OUT_DATA = 4 };

struct Spec {
  uintptr_t fn = 0;
  std::string name;       // display name
  std::string func_name;  // MLX's custom_kernel_... name
  std::vector<std::pair<int, int>> plan;  // (kind, input/output index) per [[buffer(i)]]
  std::vector<std::string> buffer_names;
  std::vector<uint32_t> itemsizes;  // per [[buffer(i)]] (element type of the parameter)
  uint32_t grid[3], tg[3];
  uint32_t modes = 0;
  bool ensure_row_contiguous = true;
  std::optional<float> init_value;
  bool operator==(const Spec& o) const {
    return fn == o.fn && plan == o.plan && std::memcmp(grid, o.grid, sizeof grid) == 0 &&
           std::memcmp(tg, o.tg, sizeof tg) == 0 && modes == o.modes &&
           ensure_row_contiguous == o.ensure_row_contiguous && init_value == o.init_value;
  }
};

struct BufferRecord {
  std::string name;
  uint32_t itemsize, flags;
  uint64_t nbytes;
  std::vector<uint64_t> stats;
};
using Record = std::tuple<std::string, std::string, std::vector<uint32_t>, std::vector<uint32_t>, uint32_t, uint64_t,
                          uint64_t, uint64_t, double,
                          std::vector<std::tuple<std::string, uint32_t, uint32_t, uint64_t, std::vector<uint64_t>>>>;
std::mutex g_log_mutex;
std::vector<Record> g_log;
uint64_t g_log_limit = 100000;

template <class T>
void fill_as(void* p, size_t n, float v) {
  T t = static_cast<T>(v);
  T* q = static_cast<T*>(p);
  for (size_t i = 0; i < n; ++i) q[i] = t;
}

void fill_output(mx::array& out, const std::optional<float>& init) {
  void* p = out.data<char>();
  size_t n = out.size();
  if (!init) {  // MLX leaves outputs uninitialised; the emulator poisons them (NaN / all ones)
    std::memset(p, 0xff, out.nbytes());
    return;
  }
  float v = *init;
  switch (out.dtype()) {
    case mx::bool_: fill_as<bool>(p, n, v); break;
    case mx::uint8: fill_as<uint8_t>(p, n, v); break;
    case mx::uint16: fill_as<uint16_t>(p, n, v); break;
    case mx::uint32: fill_as<uint32_t>(p, n, v); break;
    case mx::uint64: fill_as<uint64_t>(p, n, v); break;
    case mx::int8: fill_as<int8_t>(p, n, v); break;
    case mx::int16: fill_as<int16_t>(p, n, v); break;
    case mx::int32: fill_as<int32_t>(p, n, v); break;
    case mx::int64: fill_as<int64_t>(p, n, v); break;
    case mx::float16: fill_as<mx::float16_t>(p, n, v); break;
    case mx::bfloat16: fill_as<mx::bfloat16_t>(p, n, v); break;
    case mx::float32: fill_as<float>(p, n, v); break;
    default: throw std::invalid_argument("[metal_emulator] init_value for an unsupported output dtype");
  }
}

class EmulatedMetalKernel : public mx::Primitive {
 public:
  EmulatedMetalKernel(mx::Stream s, Spec spec) : mx::Primitive(s), spec_(std::move(spec)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    mx::synchronize(stream());  // the CPU back-end computes the inputs asynchronously
    for (auto& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
      fill_output(out, spec_.init_value);
    }
    std::vector<std::vector<int32_t>> shapes;
    std::vector<std::vector<int64_t>> strides;
    std::vector<int32_t> ndims;
    shapes.reserve(spec_.plan.size());
    strides.reserve(spec_.plan.size());
    ndims.reserve(spec_.plan.size());
    std::vector<emu_buffer> bufs(spec_.plan.size());
    for (size_t i = 0; i < spec_.plan.size(); ++i) {
      auto [kind, idx] = spec_.plan[i];
      emu_buffer& b = bufs[i];
      std::memset(&b, 0, sizeof b);
      b.name = spec_.buffer_names[i].c_str();
      b.itemsize = spec_.itemsizes[i];
      if (kind == OUT_DATA) {
        auto& out = outputs.at(idx);
        b.ptr = out.data<char>();
        b.nbytes = out.nbytes();
        b.flags = EMU_BUF_OUTPUT;
        continue;
      }
      const auto& in = inputs.at(idx);
      if (kind == IN_DATA) {
        if (spec_.ensure_row_contiguous && !in.flags().row_contiguous)
          throw std::runtime_error("[metal_emulator] internal error: input `" + spec_.buffer_names[i] +
                                   "` is not row contiguous");
        b.ptr = const_cast<char*>(in.data<char>());
        b.nbytes = uint64_t(in.data_size()) * in.itemsize();
        b.flags = EMU_BUF_INPUT;
      } else if (kind == IN_SHAPE) {
        shapes.emplace_back(in.shape().begin(), in.shape().end());
        b.ptr = shapes.back().data();
        b.nbytes = shapes.back().size() * sizeof(int32_t);
        b.flags = EMU_BUF_INPUT | EMU_BUF_AUX;
      } else if (kind == IN_STRIDES) {
        strides.emplace_back(in.strides().begin(), in.strides().end());
        b.ptr = strides.back().data();
        b.nbytes = strides.back().size() * sizeof(int64_t);
        b.flags = EMU_BUF_INPUT | EMU_BUF_AUX;
      } else {
        ndims.push_back(int32_t(in.ndim()));
        b.ptr = &ndims.back();
        b.nbytes = sizeof(int32_t);
        b.flags = EMU_BUF_INPUT | EMU_BUF_AUX;
      }
    }
    char err[8192];
    err[0] = 0;
    emu_launch L;
    std::memset(&L, 0, sizeof L);
    L.abi = EMU_ABI_VERSION;
    L.nbuf = uint32_t(bufs.size());
    L.bufs = bufs.data();
    for (int d = 0; d < 3; ++d) {
      L.grid[d] = spec_.grid[d];
      L.tg[d] = spec_.tg[d];
    }
    L.modes = spec_.modes;
    L.max_threads = 1024;
    L.err = err;
    L.errlen = sizeof err;
    auto t0 = std::chrono::steady_clock::now();
    int rc = reinterpret_cast<LaunchFn>(spec_.fn)(&L);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    {
      std::vector<std::tuple<std::string, uint32_t, uint32_t, uint64_t, std::vector<uint64_t>>> brs;
      for (auto& b : bufs)
        brs.emplace_back(b.name, b.itemsize, b.flags, b.nbytes, std::vector<uint64_t>(b.stats, b.stats + EMU_NSTATS));
      std::lock_guard<std::mutex> lock(g_log_mutex);
      if (g_log.size() < g_log_limit)
        g_log.emplace_back(spec_.name, spec_.func_name, std::vector<uint32_t>(spec_.grid, spec_.grid + 3),
                           std::vector<uint32_t>(spec_.tg, spec_.tg + 3), spec_.modes, L.groups_run, L.threads_run,
                           L.switches, secs, std::move(brs));
    }
    if (rc == 2) throw std::invalid_argument(err);
    if (rc != 0) throw std::runtime_error(err);
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[metal_emulator] emulated kernels run on the CPU stream only");
  }
  const char* name() const override { return "EmulatedMetalKernel"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const EmulatedMetalKernel*>(&other);
    return o && o->spec_ == spec_;
  }

 private:
  Spec spec_;
};

std::vector<mx::array> launch(std::vector<mx::array> inputs, std::vector<std::vector<int>> output_shapes,
                              std::vector<mx::Dtype> output_dtypes, uintptr_t fn, std::string name,
                              std::string func_name, std::vector<std::pair<int, int>> plan,
                              std::vector<std::string> buffer_names, std::vector<uint32_t> itemsizes,
                              std::tuple<uint32_t, uint32_t, uint32_t> grid,
                              std::tuple<uint32_t, uint32_t, uint32_t> tg, uint32_t modes,
                              bool ensure_row_contiguous, std::optional<float> init_value,
                              std::optional<mx::Stream> stream) {
  if (plan.size() != buffer_names.size() || plan.size() != itemsizes.size())
    throw std::invalid_argument("[metal_emulator] inconsistent buffer plan");
  Spec spec;
  spec.fn = fn;
  spec.name = std::move(name);
  spec.func_name = std::move(func_name);
  spec.plan = std::move(plan);
  spec.buffer_names = std::move(buffer_names);
  spec.itemsizes = std::move(itemsizes);
  std::tie(spec.grid[0], spec.grid[1], spec.grid[2]) = grid;
  std::tie(spec.tg[0], spec.tg[1], spec.tg[2]) = tg;
  spec.modes = modes;
  spec.ensure_row_contiguous = ensure_row_contiguous;
  spec.init_value = init_value;
  auto s = stream ? *stream : mx::default_stream(mx::Device::cpu);
  if (s.device != mx::Device::cpu) throw std::invalid_argument("[metal_emulator] needs a CPU stream");
  if (ensure_row_contiguous)
    for (auto& in : inputs) in = mx::contiguous(in, false, s);
  std::vector<mx::Shape> shapes;
  for (auto& sh : output_shapes) shapes.emplace_back(sh.begin(), sh.end());
  return mx::array::make_arrays(std::move(shapes), std::move(output_dtypes),
                                std::make_shared<EmulatedMetalKernel>(s, std::move(spec)), std::move(inputs));
}

std::vector<Record> drain_launches() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<Record> out;
  out.swap(g_log);
  return out;
}

}  // namespace

NB_MODULE(_emu_ext, m) {
  m.def("launch", &launch, nb::arg("inputs"), nb::arg("output_shapes"), nb::arg("output_dtypes"), nb::arg("fn"),
        nb::arg("name"), nb::arg("func_name"), nb::arg("plan"), nb::arg("buffer_names"), nb::arg("itemsizes"),
        nb::arg("grid"), nb::arg("threadgroup"), nb::arg("modes"), nb::arg("ensure_row_contiguous"),
        nb::arg("init_value").none(), nb::arg("stream").none());
  m.def("drain_launches", &drain_launches);
  m.attr("abi_version") = EMU_ABI_VERSION;
}
