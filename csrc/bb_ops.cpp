// Fused CPU kernels of bbfused.BB: the step, the paper's epoch end, and the safeguarded epoch end's two passes
// (measure, then commit or roll back), one pass over the flat buffers each.
//
// Registered as the PyTorch custom ops bbfused::cpp_step, cpp_preconditioned_step, cpp_epoch_end, cpp_epoch_measure
// and cpp_epoch_commit (CPU and Meta kernels), so torch.compile sees their schemas. The contract is
// bbfused/backends/base.py; the reference is the eager backend. Arithmetic is in float32 (float64 for float64
// parameters); epoch-end sums in float64.
//
// Vectorization: the step is a plain loop over __restrict__ pointers that GCC vectorizes at -O3 for the
// portable baseline ISA (confirmed with -fopt-info-vec for float32, float64 and bfloat16); it is memory bound,
// so wider vectors would not make it faster. float16 is the exception: c10's float -> half conversion branches,
// which SSE2 cannot turn into vector selects, so that step runs scalar (about 6x the bfloat16 time). The
// preconditioned step's square root vectorizes only under -fno-math-errno (cpp_backend.CXX_FLAGS). The epoch
// end, once per epoch, accumulates in fixed float64 lanes and costs about five steps.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace bbfused {
namespace {

// Step: below this many elements per thread, waking the thread pool costs more than it saves.
constexpr int64_t kStepGrain = int64_t{1} << 15;
// Epoch end: the sums are taken over fixed chunks of this many elements, whatever the thread count, and
// the per-chunk float64 partials are added in chunk order, so the result has the same bits on 1 or N threads.
constexpr int64_t kSumChunk = int64_t{1} << 15;
// Independent accumulators per chunk: a fixed summation pattern the compiler can map onto vector lanes.
constexpr int64_t kSumLanes = 8;

bool is_supported_param_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_flat(const at::Tensor& t, const char* name, int64_t numel, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device(),
              "; use the triton or eager backend for other devices");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a 1-D contiguous flat buffer, got shape ", t.sizes(), " strides ", t.strides());
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " has ", t.numel(), " elements, param has ", numel,
              "; pass slices of the same range of every flat buffer");
}

void check_scalar(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == dtype, op, ": ", name, " must be a one-element ", dtype,
              " tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}

// Checks of the CPU kernels (the Meta kernels only describe outputs): everything is verified before anything is
// written.
void check_second_moment_args(const std::optional<at::Tensor>& second_moment,
                              const std::optional<at::Tensor>& bias_correction, const at::Tensor& ema,
                              const at::Tensor& param, const char* op) {
  if (!second_moment.has_value()) return;
  TORCH_CHECK(second_moment->scalar_type() == ema.scalar_type(), op, ": second_moment must be ", ema.scalar_type(),
              " (the EMA's dtype) for ", param.scalar_type(), " parameters, got ", second_moment->scalar_type());
  check_flat(*second_moment, "second_moment", param.numel(), op);
  TORCH_CHECK(bias_correction.has_value(), op,
              ": a second_moment needs its bias_correction (a float64 0-dim CPU tensor, 1 - beta2**t)");
  TORCH_CHECK(bias_correction->dim() <= 1, op, ": bias_correction must be 0-dim or of shape [1], got shape ",
              bias_correction->sizes());
  check_scalar(*bias_correction, "bias_correction", at::kDouble, op);
}

void check_step_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& ema, const at::Tensor& lr,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& nonfinite, const std::optional<at::Tensor>& momentum_buffer,
                     double momentum, bool nesterov, const std::optional<at::Tensor>& second_moment,
                     const std::optional<at::Tensor>& bias_correction, const char* op) {
  TORCH_CHECK(is_supported_param_dtype(param.scalar_type()), op,
              ": param must be float32, float64, bfloat16 or float16, got ", param.scalar_type());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": grad is ", grad.scalar_type(), " but param is ",
              param.scalar_type(), "; the gradient buffer must have the parameter dtype");
  TORCH_CHECK(ema.scalar_type() == state_dtype(param.scalar_type()), op, ": ema must be ",
              state_dtype(param.scalar_type()), " for ", param.scalar_type(), " parameters, got ", ema.scalar_type());
  const int64_t n = param.numel();
  check_flat(param, "param", n, op);
  check_flat(grad, "grad", n, op);
  check_flat(ema, "ema", n, op);
  check_scalar(lr, "lr", at::kDouble, op);
  if (grad_scale.has_value()) check_scalar(*grad_scale, "grad_scale", at::kFloat, op);
  if (found_inf.has_value()) check_scalar(*found_inf, "found_inf", at::kFloat, op);
  if (nonfinite.has_value()) check_scalar(*nonfinite, "nonfinite", at::kLong, op);
  if (momentum_buffer.has_value()) {
    TORCH_CHECK(momentum_buffer->scalar_type() == ema.scalar_type(), op, ": momentum_buffer must be ",
                ema.scalar_type(), " (the EMA's dtype) for ", param.scalar_type(), " parameters, got ",
                momentum_buffer->scalar_type());
    check_flat(*momentum_buffer, "momentum_buffer", n, op);
  } else {
    TORCH_CHECK(momentum == 0.0 && !nesterov, op, ": momentum=", momentum, ", nesterov=", nesterov,
                " needs a momentum_buffer to keep the momentum in; without one pass momentum=0 and nesterov=False");
  }
  check_second_moment_args(second_moment, bias_correction, ema, param, op);
}

void check_epoch_end_args(const at::Tensor& param, const at::Tensor& ema, const at::Tensor& prev_params,
                          const at::Tensor& prev_ema, const char* op) {
  TORCH_CHECK(is_supported_param_dtype(param.scalar_type()), op,
              ": param must be float32, float64, bfloat16 or float16, got ", param.scalar_type());
  TORCH_CHECK(prev_params.scalar_type() == param.scalar_type(), op, ": prev_params is ", prev_params.scalar_type(),
              " but param is ", param.scalar_type(), "; the snapshot must have the parameter dtype");
  const at::ScalarType state = state_dtype(param.scalar_type());
  TORCH_CHECK(ema.scalar_type() == state && prev_ema.scalar_type() == state, op, ": ema and prev_ema must be ",
              state, " for ", param.scalar_type(), " parameters, got ", ema.scalar_type(), " and ",
              prev_ema.scalar_type());
  const int64_t n = param.numel();
  check_flat(param, "param", n, op);
  check_flat(ema, "ema", n, op);
  check_flat(prev_params, "prev_params", n, op);
  check_flat(prev_ema, "prev_ema", n, op);
}

// Finiteness on the bit patterns (exponent all ones): integer ops that GCC vectorizes, where a float comparison
// with NaN (trapping math) keeps the loop scalar.
template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using type = uint32_t;
  static constexpr int kMantissa = 23;
  static constexpr int kExponent = 8;
};
template <>
struct FloatBits<double> {
  using type = uint64_t;
  static constexpr int kMantissa = 52;
  static constexpr int kExponent = 11;
};

template <typename T>
inline typename FloatBits<T>::type bits_of(T x) {
  typename FloatBits<T>::type b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

template <typename T>
inline T from_bits(typename FloatBits<T>::type b) {
  T x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// Which update direction the step takes: d itself, or d through heavy-ball momentum (plain or Nesterov).
enum class Momentum { kNone, kHeavyBall, kNesterov };

// How the step treats BB's gradient average g (bbfused.average_window): g ← g + β·(d − g); g untouched (neither read
// nor written); g ← θ − c·η·m from θ and m before the step (written, not read), where the window opens; or
// g ← (g − (θ − c·η·m))·s from θ and m after it, where the window closes: the mean of d over the window.
enum class EmaMode : int64_t { kUpdate = 0, kKeep = 1, kOpen = 2, kClose = 3 };

// Adam's denominator √(v / c) + ε, one rounding per operation: the preconditioned step divides by it and the measuring
// pass weighs Δθ² with it, and the two must agree bit for bit (eager's _denominator).
template <typename opmath_t>
__attribute__((always_inline)) inline opmath_t adam_denominator(opmath_t v, opmath_t bias_correction, opmath_t eps) {
  return std::sqrt(v / bias_correction) + eps;
}

// The step's scalars, each rounded once to the arithmetic dtype as the eager reference rounds them.
template <typename opmath_t>
struct StepScalars {
  opmath_t lr;
  opmath_t weight_decay;
  opmath_t beta;
  opmath_t scale;             // the GradScaler scale the gradient is divided by (kScaled)
  opmath_t momentum;          // μ (Nesterov)
  opmath_t complement;        // 1 − μ, taken in double before the rounding (any momentum)
  opmath_t beta2;             // β₂ (kPreconditioned)
  opmath_t beta2_complement;  // 1 − β₂, taken in double before the rounding
  opmath_t bias_correction;   // c = 1 − β₂ᵗ
  opmath_t eps;               // ε
  opmath_t point_step;        // c·η of the window's point θ − c·η·m: c and η each rounded, then multiplied (kOpen)
  opmath_t window_scale;      // 1 / (η·n) taken in double, then rounded (kClose)
};

// d = grad/scale + λ·θ;  θ ← θ − lr·d;  g ← g + β·(d − g), over [begin, end).
// Without a GradScaler (kScaled false) the division is compiled out: a vector division per element costs as
// much as the memory traffic on one core. kSkip (the default rate control): an element whose d is not finite
// keeps θ and g (one bad gradient value must not turn the weights into NaN); returns how many were skipped.
// kPreconditioned (Adam's scaling): v ← β₂·v + (1 − β₂)·(d·d) and u = d / (√(v / c) + ε), and the momentum and θ
// step along u where they would step along d; g still averages d, and a skipped element keeps v too.
// With momentum: m ← m + (1 − μ)·(u − m) and θ steps along m, or (Nesterov) along (1 − μ)·u + μ·m; a skipped
// element keeps m too. kEma (with momentum, no preconditioner): g is left alone, set to the window's point from θ and
// m before the step, or turned into the window's mean with the point from θ and m after it (those a skipped element
// kept). Each line is one rounding per operation, in eager's order; std::sqrt is correctly rounded, as eager's
// square root is.
template <typename scalar_t, typename opmath_t, bool kScaled, bool kSkip, Momentum kMomentum, bool kPreconditioned,
          EmaMode kEma>
__attribute__((always_inline)) inline int64_t step_range(scalar_t* __restrict__ param,
                                                         const scalar_t* __restrict__ grad,
                                                         opmath_t* __restrict__ ema,
                                                         opmath_t* __restrict__ momentum_buffer,
                                                         opmath_t* __restrict__ second_moment, int64_t begin,
                                                         int64_t end, const StepScalars<opmath_t> s) {
  using bits_t = typename FloatBits<opmath_t>::type;
  constexpr bool kHasMomentum = kMomentum != Momentum::kNone;
  constexpr bool kDirectionIsD = !kHasMomentum && !kPreconditioned;
  static_assert(kEma == EmaMode::kUpdate || (kHasMomentum && !kPreconditioned), "the window's point needs m of d");
  // The count has the lanes' integer width (it vectorizes with them), so it is taken over spans it cannot overflow.
  constexpr int64_t kCountSpan = int64_t{1} << 31;
  int64_t skipped = 0;
  for (int64_t start = begin; start < end; start += kCountSpan) {
    const int64_t stop = std::min(end, start + kCountSpan);
    bits_t count = 0;
    for (int64_t i = start; i < stop; ++i) {
      const opmath_t theta = static_cast<opmath_t>(param[i]);
      const opmath_t g = kScaled ? static_cast<opmath_t>(grad[i]) / s.scale : static_cast<opmath_t>(grad[i]);
      const opmath_t d = g + s.weight_decay * theta;
      opmath_t e = 0;
      if constexpr (kEma == EmaMode::kUpdate || kEma == EmaMode::kClose) e = ema[i];
      opmath_t v = 0;
      opmath_t new_v = 0;
      opmath_t u = d;
      if constexpr (kPreconditioned) {
        v = second_moment[i];
        new_v = s.beta2 * v + s.beta2_complement * (d * d);
        u = d / adam_denominator(new_v, s.bias_correction, s.eps);
      }
      opmath_t m = 0;
      opmath_t new_m = 0;
      opmath_t direction = u;
      if constexpr (kHasMomentum) {
        m = momentum_buffer[i];
        if constexpr (kEma == EmaMode::kOpen) ema[i] = theta - s.point_step * m;
        new_m = m + s.complement * (u - m);
        direction = kMomentum == Momentum::kNesterov ? s.complement * u + s.momentum * new_m : new_m;
      }
      if constexpr (kSkip) {
        // A non-finite d steps θ with a zero direction instead (θ − lr·0 keeps every bit of θ; zeroing is an AND
        // with the inverted "exponent all ones" mask, cheaper than selecting between two results) and keeps the
        // bits of g, m and v. With Adam's scaling a non-finite new v counts too (d non-finite, or d·d overflowing):
        // an infinite v would freeze the element for good.
        constexpr bits_t kExponentBits = ((bits_t{1} << FloatBits<opmath_t>::kExponent) - 1)
                                         << FloatBits<opmath_t>::kMantissa;
        const opmath_t checked = kPreconditioned ? new_v : d;
        const bits_t bad = -static_cast<bits_t>((bits_of(checked) & kExponentBits) == kExponentBits);
        const opmath_t kept_d = from_bits<opmath_t>(bits_of(d) & ~bad);
        const opmath_t kept_direction = kDirectionIsD ? kept_d : from_bits<opmath_t>(bits_of(direction) & ~bad);
        const opmath_t stepped = theta - s.lr * kept_direction;
        param[i] = static_cast<scalar_t>(stepped);
        if constexpr (kEma == EmaMode::kUpdate) {
          ema[i] = from_bits<opmath_t>((bits_of(e + s.beta * (kept_d - e)) & ~bad) | (bits_of(e) & bad));
        }
        if constexpr (kHasMomentum) {
          const opmath_t kept_m = from_bits<opmath_t>((bits_of(new_m) & ~bad) | (bits_of(m) & bad));
          momentum_buffer[i] = kept_m;
          if constexpr (kEma == EmaMode::kClose) ema[i] = (e - (stepped - s.point_step * kept_m)) * s.window_scale;
        }
        if constexpr (kPreconditioned) {
          second_moment[i] = from_bits<opmath_t>((bits_of(new_v) & ~bad) | (bits_of(v) & bad));
        }
        count -= bad;  // bad is all ones (-1) for a skipped element
      } else {
        const opmath_t stepped = theta - s.lr * direction;
        param[i] = static_cast<scalar_t>(stepped);
        if constexpr (kEma == EmaMode::kUpdate) ema[i] = e + s.beta * (d - e);
        if constexpr (kHasMomentum) momentum_buffer[i] = new_m;
        if constexpr (kEma == EmaMode::kClose) ema[i] = (e - (stepped - s.point_step * new_m)) * s.window_scale;
        if constexpr (kPreconditioned) second_moment[i] = new_v;
      }
    }
    skipped += static_cast<int64_t>(count);
  }
  return skipped;
}

// The same loop compiled for AVX2 (8 float lanes), chosen at run time where the CPU has it: the 16-bit loops are
// compute-bound on the x86-64 baseline's 4 lanes. No FMA: a fused multiply-add would change the rounding, and
// every backend must give the eager reference's bits.
#if defined(__x86_64__) && defined(__GNUC__)
#define BBFUSED_HAVE_AVX2_CLONE 1
template <typename scalar_t, typename opmath_t, bool kScaled, bool kSkip, Momentum kMomentum, bool kPreconditioned,
          EmaMode kEma>
__attribute__((target("avx2"))) int64_t step_range_avx2(scalar_t* __restrict__ param,
                                                        const scalar_t* __restrict__ grad,
                                                        opmath_t* __restrict__ ema,
                                                        opmath_t* __restrict__ momentum_buffer,
                                                        opmath_t* __restrict__ second_moment, int64_t begin,
                                                        int64_t end, const StepScalars<opmath_t> s) {
  return step_range<scalar_t, opmath_t, kScaled, kSkip, kMomentum, kPreconditioned, kEma>(
      param, grad, ema, momentum_buffer, second_moment, begin, end, s);
}
#endif

// BBFUSED_CPU_BASELINE=1 in the environment keeps the baseline loop (the tests compare both).
bool cpu_has_avx2() {
#ifdef BBFUSED_HAVE_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("BBFUSED_CPU_BASELINE") == nullptr;
  return has;
#else
  return false;
#endif
}

// Both step ops: cpp_step is this without a second moment, cpp_preconditioned_step with one.
void step_impl(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& ema, const at::Tensor& lr,
               double weight_decay, double beta, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& nonfinite,
               const std::optional<at::Tensor>& momentum_buffer, double momentum, bool nesterov,
               const std::optional<at::Tensor>& second_moment, const std::optional<at::Tensor>& bias_correction,
               double beta2, double eps, int64_t ema_mode, int64_t window_steps, double point_coefficient,
               const char* op) {
  check_step_args(param, grad, ema, lr, grad_scale, found_inf, nonfinite, momentum_buffer, momentum, nesterov,
                  second_moment, bias_correction, op);
  TORCH_CHECK(ema_mode >= 0 && ema_mode <= 3, op, ": ema_mode must be 0 (update g), 1 (keep g), 2 (open the ",
              "window) or 3 (close it), got ", ema_mode);
  const EmaMode ema_kind = static_cast<EmaMode>(ema_mode);
  TORCH_CHECK(ema_kind == EmaMode::kUpdate || (momentum_buffer.has_value() && !second_moment.has_value()), op,
              ": ema_mode ", ema_mode, " needs a momentum_buffer and no second_moment; pass ema_mode=0");
  TORCH_CHECK(ema_kind != EmaMode::kClose || window_steps >= 2, op,
              ": ema_mode 3 (close the window) needs window_steps >= 2, got ", window_steps);
  // c of the window's point θ − c·η·m, computed once in Python (average_window.point_coefficient) for every backend.
  TORCH_CHECK(ema_kind < EmaMode::kOpen || (std::isfinite(point_coefficient) && point_coefficient >= 0.0), op,
              ": ema_mode ", ema_mode, " needs the window's point_coefficient c >= 0, got ", point_coefficient);
  const double lr_value = *lr.const_data_ptr<double>();
  // GradScaler's inf check: the flag is on the CPU, so reading it costs no device sync. A skipped step where the
  // window opens or closes still sets g, from θ and m as they stay.
  if (found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f) {
    if (ema_kind == EmaMode::kOpen || ema_kind == EmaMode::kClose) {
      const at::Tensor point_step = lr.to(ema.scalar_type()).mul(point_coefficient);
      const at::Tensor point = param.to(ema.scalar_type()).sub(point_step.mul(*momentum_buffer));
      if (ema_kind == EmaMode::kOpen) {
        ema.copy_(point);
      } else {
        const at::Tensor scale = lr.mul(static_cast<double>(window_steps)).reciprocal().to(ema.scalar_type());
        ema.copy_(ema.sub(point).mul(scale));
      }
    }
    return;
  }
  const bool preconditioned = second_moment.has_value();
  const double bias_correction_value = preconditioned ? *bias_correction->const_data_ptr<double>() : 1.0;
  const int64_t n = param.numel();
  const Momentum mode = !momentum_buffer.has_value() ? Momentum::kNone
                        : nesterov                   ? Momentum::kNesterov
                                                     : Momentum::kHeavyBall;
  std::atomic<int64_t> skipped{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "bbfused::cpp_step", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* param_data = param.data_ptr<scalar_t>();
    const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
    opmath_t* ema_data = ema.data_ptr<opmath_t>();
    opmath_t* momentum_data = momentum_buffer.has_value() ? momentum_buffer->data_ptr<opmath_t>() : nullptr;
    opmath_t* second_moment_data = preconditioned ? second_moment->data_ptr<opmath_t>() : nullptr;
    // Scalars rounded to the arithmetic dtype, as the eager reference does; 1 − μ and 1 − β₂ first in double, as
    // eager's Python floats.
    const StepScalars<opmath_t> scalars{
        static_cast<opmath_t>(lr_value),
        static_cast<opmath_t>(weight_decay),
        static_cast<opmath_t>(beta),
        grad_scale.has_value() ? static_cast<opmath_t>(*grad_scale->const_data_ptr<float>()) : opmath_t{1},
        static_cast<opmath_t>(momentum),
        static_cast<opmath_t>(1.0 - momentum),
        static_cast<opmath_t>(beta2),
        static_cast<opmath_t>(1.0 - beta2),
        static_cast<opmath_t>(bias_correction_value),
        static_cast<opmath_t>(eps),
        static_cast<opmath_t>(lr_value) * static_cast<opmath_t>(point_coefficient),
        static_cast<opmath_t>(window_steps >= 2 ? 1.0 / (lr_value * static_cast<double>(window_steps)) : 0.0),
    };
    // Elementwise: how the range is split over threads does not change a bit.
    at::parallel_for(0, n, kStepGrain, [&](int64_t begin, int64_t end) {
      int64_t count = 0;
      const auto run = [&](auto scaled, auto skip, auto with_preconditioner, auto with_momentum, auto with_ema) {
        constexpr bool kScaled = decltype(scaled)::value;
        constexpr bool kSkip = decltype(skip)::value;
        constexpr bool kPreconditioned = decltype(with_preconditioner)::value;
        constexpr Momentum kMomentum = decltype(with_momentum)::value;
        constexpr EmaMode kEma = decltype(with_ema)::value;
#ifdef BBFUSED_HAVE_AVX2_CLONE
        if (cpu_has_avx2()) {
          count = step_range_avx2<scalar_t, opmath_t, kScaled, kSkip, kMomentum, kPreconditioned, kEma>(
              param_data, grad_data, ema_data, momentum_data, second_moment_data, begin, end, scalars);
          return;
        }
#endif
        count = step_range<scalar_t, opmath_t, kScaled, kSkip, kMomentum, kPreconditioned, kEma>(
            param_data, grad_data, ema_data, momentum_data, second_moment_data, begin, end, scalars);
      };
      // The runtime choices as compile-time constants: each combination is a loop of its own. g's other modes exist
      // only with momentum and without the preconditioner (checked above), so only those loops are compiled.
      const auto with_ema = [&](auto scaled, auto skip, auto with_preconditioner, auto with_momentum) {
        using Mode = EmaMode;
        if constexpr (decltype(with_momentum)::value != Momentum::kNone && !decltype(with_preconditioner)::value) {
          if (ema_kind == Mode::kKeep) {
            return run(scaled, skip, with_preconditioner, with_momentum, std::integral_constant<Mode, Mode::kKeep>{});
          }
          if (ema_kind == Mode::kOpen) {
            return run(scaled, skip, with_preconditioner, with_momentum, std::integral_constant<Mode, Mode::kOpen>{});
          }
          if (ema_kind == Mode::kClose) {
            return run(scaled, skip, with_preconditioner, with_momentum, std::integral_constant<Mode, Mode::kClose>{});
          }
        }
        return run(scaled, skip, with_preconditioner, with_momentum, std::integral_constant<Mode, Mode::kUpdate>{});
      };
      const auto with_momentum = [&](auto scaled, auto skip, auto with_preconditioner) {
        switch (mode) {
          case Momentum::kNone:
            return with_ema(scaled, skip, with_preconditioner, std::integral_constant<Momentum, Momentum::kNone>{});
          case Momentum::kHeavyBall:
            return with_ema(scaled, skip, with_preconditioner,
                            std::integral_constant<Momentum, Momentum::kHeavyBall>{});
          case Momentum::kNesterov:
            return with_ema(scaled, skip, with_preconditioner,
                            std::integral_constant<Momentum, Momentum::kNesterov>{});
        }
      };
      const auto with_preconditioner = [&](auto scaled, auto skip) {
        preconditioned ? with_momentum(scaled, skip, std::true_type{})
                       : with_momentum(scaled, skip, std::false_type{});
      };
      if (grad_scale.has_value()) {
        nonfinite.has_value() ? with_preconditioner(std::true_type{}, std::true_type{})
                              : with_preconditioner(std::true_type{}, std::false_type{});
      } else {
        nonfinite.has_value() ? with_preconditioner(std::false_type{}, std::true_type{})
                              : with_preconditioner(std::false_type{}, std::false_type{});
      }
      if (count) skipped += count;
    });
  });
  if (nonfinite.has_value() && skipped.load()) *nonfinite->data_ptr<int64_t>() += skipped.load();
}

void step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& ema, const at::Tensor& lr,
              double weight_decay, double beta, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& nonfinite,
              const std::optional<at::Tensor>& momentum_buffer, double momentum, bool nesterov, int64_t ema_mode,
              int64_t window_steps, double point_coefficient) {
  step_impl(param, grad, ema, lr, weight_decay, beta, grad_scale, found_inf, nonfinite, momentum_buffer, momentum,
            nesterov, std::nullopt, std::nullopt, 0.0, 0.0, ema_mode, window_steps, point_coefficient,
            "bbfused::cpp_step");
}

void preconditioned_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& ema,
                             const at::Tensor& lr, double weight_decay, double beta,
                             const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& nonfinite,
                             const std::optional<at::Tensor>& momentum_buffer, double momentum, bool nesterov,
                             const at::Tensor& second_moment, const at::Tensor& bias_correction, double beta2,
                             double eps) {
  step_impl(param, grad, ema, lr, weight_decay, beta, grad_scale, found_inf, nonfinite, momentum_buffer, momentum,
            nesterov, second_moment, bias_correction, beta2, eps, 0, 0, 0.0, "bbfused::cpp_preconditioned_step");
}

void step_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& ema, const at::Tensor& lr,
               double weight_decay, double beta, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& nonfinite,
               const std::optional<at::Tensor>& momentum_buffer, double momentum, bool nesterov, int64_t ema_mode,
               int64_t window_steps, double point_coefficient) {}

void preconditioned_step_meta(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& ema,
                              const at::Tensor& lr, double weight_decay, double beta,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              const std::optional<at::Tensor>& nonfinite,
                              const std::optional<at::Tensor>& momentum_buffer, double momentum, bool nesterov,
                              const at::Tensor& second_moment, const at::Tensor& bias_correction, double beta2,
                              double eps) {}

// One chunk of the epoch end: its float64 partials [Σ Δθ², Σ Δθ·Δg] into sums[0..1]; in the same pass
// prev_params ← θ, prev_ema ← g, g ← 0.
template <typename scalar_t, typename opmath_t>
void epoch_end_chunk(const scalar_t* __restrict__ param, opmath_t* __restrict__ ema,
                     scalar_t* __restrict__ prev_params, opmath_t* __restrict__ prev_ema, int64_t begin,
                     int64_t end, double* sums) {
  double sq_norm[kSumLanes] = {};
  double dot[kSumLanes] = {};
  const auto visit = [&](int64_t j, int64_t lane) {
    const double delta_theta = static_cast<double>(param[j]) - static_cast<double>(prev_params[j]);
    const double delta_ema = static_cast<double>(ema[j]) - static_cast<double>(prev_ema[j]);
    sq_norm[lane] += delta_theta * delta_theta;
    dot[lane] += delta_theta * delta_ema;
    prev_params[j] = param[j];
    prev_ema[j] = ema[j];
    ema[j] = 0;
  };
  int64_t i = begin;
  for (; i + kSumLanes <= end; i += kSumLanes) {
    for (int64_t lane = 0; lane < kSumLanes; ++lane) visit(i + lane, lane);
  }
  for (int64_t lane = 0; i < end; ++i, ++lane) visit(i, lane);
  sums[0] = 0;
  sums[1] = 0;
  for (int64_t lane = 0; lane < kSumLanes; ++lane) {
    sums[0] += sq_norm[lane];
    sums[1] += dot[lane];
  }
}

at::Tensor epoch_end_cpu(const at::Tensor& param, const at::Tensor& ema, const at::Tensor& prev_params,
                         const at::Tensor& prev_ema) {
  check_epoch_end_args(param, ema, prev_params, prev_ema, "bbfused::cpp_epoch_end");
  const int64_t n = param.numel();
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> partials(2 * chunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "bbfused::cpp_epoch_end", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* param_data = param.const_data_ptr<scalar_t>();
    opmath_t* ema_data = ema.data_ptr<opmath_t>();
    scalar_t* prev_params_data = prev_params.data_ptr<scalar_t>();
    opmath_t* prev_ema_data = prev_ema.data_ptr<opmath_t>();
    // Threads split the chunk indices; each chunk's bounds depend only on its index.
    at::parallel_for(0, chunks, /*grain_size=*/1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        epoch_end_chunk<scalar_t, opmath_t>(param_data, ema_data, prev_params_data, prev_ema_data,
                                            chunk * kSumChunk, std::min(n, (chunk + 1) * kSumChunk),
                                            &partials[2 * chunk]);
      }
    });
  });
  double sq_norm = 0;
  double dot = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    sq_norm += partials[2 * chunk];
    dot += partials[2 * chunk + 1];
  }
  at::Tensor sums = at::empty({2}, param.options().dtype(at::kDouble));
  sums.data_ptr<double>()[0] = sq_norm;
  sums.data_ptr<double>()[1] = dot;
  return sums;
}

at::Tensor epoch_end_meta(const at::Tensor& param, const at::Tensor& ema, const at::Tensor& prev_params,
                          const at::Tensor& prev_ema) {
  return at::empty({2}, param.options().dtype(at::kDouble));
}


// The safeguarded epoch end's first pass (bbfused/control.py decides between the two ends of its second pass):
// one chunk's partials [Σ Δθ², Σ Δθ·Δg, Σ θ², Σ g²] into sums[0..3]; in the same pass prev_ema ← g, g ← 0.
// prev_params stays: it is what a rollback restores. The BB sums are float64 as in the paper's pass; the two
// norms, which only meet a fourfold growth threshold and a finiteness test, are summed in the arithmetic dtype
// per chunk (float64 across chunks): four float64 sums made the pass compute-bound.
// kMetric (a preconditioned step): the first sum is Σ Δθ²·D, D = √(v / c) + ε computed in the arithmetic dtype
// as the step computes its denominator, so that BB's estimate is taken in the metric the step moved in.
template <typename scalar_t, typename opmath_t, bool kMetric>
void epoch_measure_chunk(const scalar_t* __restrict__ param, opmath_t* __restrict__ ema,
                         const scalar_t* __restrict__ prev_params, opmath_t* __restrict__ prev_ema,
                         const opmath_t* __restrict__ second_moment, opmath_t bias_correction, opmath_t eps,
                         int64_t begin, int64_t end, double* sums) {
  double sq_norm[kSumLanes] = {};
  double dot[kSumLanes] = {};
  opmath_t param_sq[kSumLanes] = {};
  opmath_t ema_sq[kSumLanes] = {};
  const auto visit = [&](int64_t j, int64_t lane) {
    const opmath_t theta = static_cast<opmath_t>(param[j]);
    const opmath_t g = ema[j];
    const double delta_theta = static_cast<double>(param[j]) - static_cast<double>(prev_params[j]);
    const double delta_ema = static_cast<double>(g) - static_cast<double>(prev_ema[j]);
    if constexpr (kMetric) {
      const opmath_t metric = adam_denominator(second_moment[j], bias_correction, eps);
      sq_norm[lane] += (delta_theta * delta_theta) * static_cast<double>(metric);
    } else {
      sq_norm[lane] += delta_theta * delta_theta;
    }
    dot[lane] += delta_theta * delta_ema;
    param_sq[lane] += theta * theta;
    ema_sq[lane] += g * g;
    prev_ema[j] = g;
    ema[j] = 0;
  };
  int64_t i = begin;
  for (; i + kSumLanes <= end; i += kSumLanes) {
    for (int64_t lane = 0; lane < kSumLanes; ++lane) visit(i + lane, lane);
  }
  for (int64_t lane = 0; i < end; ++i, ++lane) visit(i, lane);
  for (int k = 0; k < 4; ++k) sums[k] = 0;
  for (int64_t lane = 0; lane < kSumLanes; ++lane) {
    sums[0] += sq_norm[lane];
    sums[1] += dot[lane];
    sums[2] += static_cast<double>(param_sq[lane]);
    sums[3] += static_cast<double>(ema_sq[lane]);
  }
}

at::Tensor epoch_measure_cpu(const at::Tensor& param, const at::Tensor& ema, const at::Tensor& prev_params,
                             const at::Tensor& prev_ema, const std::optional<at::Tensor>& second_moment,
                             const std::optional<at::Tensor>& bias_correction, double eps) {
  constexpr const char* op = "bbfused::cpp_epoch_measure";
  check_epoch_end_args(param, ema, prev_params, prev_ema, op);
  check_second_moment_args(second_moment, bias_correction, ema, param, op);
  const bool metric = second_moment.has_value();
  const double bias_correction_value = metric ? *bias_correction->const_data_ptr<double>() : 1.0;
  const int64_t n = param.numel();
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> partials(4 * chunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "bbfused::cpp_epoch_measure", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* param_data = param.const_data_ptr<scalar_t>();
    opmath_t* ema_data = ema.data_ptr<opmath_t>();
    const scalar_t* prev_params_data = prev_params.const_data_ptr<scalar_t>();
    opmath_t* prev_ema_data = prev_ema.data_ptr<opmath_t>();
    const opmath_t* second_moment_data = metric ? second_moment->const_data_ptr<opmath_t>() : nullptr;
    // Rounded once to the arithmetic dtype, as the step rounds them.
    const auto correction = static_cast<opmath_t>(bias_correction_value);
    const auto epsilon = static_cast<opmath_t>(eps);
    at::parallel_for(0, chunks, /*grain_size=*/1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t begin = chunk * kSumChunk;
        const int64_t end = std::min(n, (chunk + 1) * kSumChunk);
        if (metric) {
          epoch_measure_chunk<scalar_t, opmath_t, true>(param_data, ema_data, prev_params_data, prev_ema_data,
                                                        second_moment_data, correction, epsilon, begin, end,
                                                        &partials[4 * chunk]);
        } else {
          epoch_measure_chunk<scalar_t, opmath_t, false>(param_data, ema_data, prev_params_data, prev_ema_data,
                                                         nullptr, correction, epsilon, begin, end,
                                                         &partials[4 * chunk]);
        }
      }
    });
  });
  double totals[4] = {};
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int k = 0; k < 4; ++k) totals[k] += partials[4 * chunk + k];
  }
  at::Tensor sums = at::empty({4}, param.options().dtype(at::kDouble));
  std::copy(totals, totals + 4, sums.data_ptr<double>());
  return sums;
}

at::Tensor epoch_measure_meta(const at::Tensor& param, const at::Tensor& ema, const at::Tensor& prev_params,
                              const at::Tensor& prev_ema, const std::optional<at::Tensor>& second_moment,
                              const std::optional<at::Tensor>& bias_correction, double eps) {
  return at::empty({4}, param.options().dtype(at::kDouble));
}

// The second pass, a copy one way or the other: kept epoch: prev_params ← θ; rolled back: θ ← prev_params.
// The flag is a CPU tensor: reading it costs no sync.
void epoch_commit_cpu(const at::Tensor& param, const at::Tensor& prev_params, const at::Tensor& rolled_back) {
  constexpr const char* op = "bbfused::cpp_epoch_commit";
  TORCH_CHECK(is_supported_param_dtype(param.scalar_type()), op,
              ": param must be float32, float64, bfloat16 or float16, got ", param.scalar_type());
  TORCH_CHECK(prev_params.scalar_type() == param.scalar_type(), op, ": prev_params is ", prev_params.scalar_type(),
              " but param is ", param.scalar_type(), "; the snapshot must have the parameter dtype");
  const int64_t n = param.numel();
  check_flat(param, "param", n, op);
  check_flat(prev_params, "prev_params", n, op);
  TORCH_CHECK(rolled_back.numel() == 1 && rolled_back.scalar_type() == at::kBool && rolled_back.device().is_cpu(),
              op, ": rolled_back must be a one-element bool CPU tensor, got ", rolled_back.scalar_type(), " of shape ",
              rolled_back.sizes(), " on ", rolled_back.device());
  const bool restore = *rolled_back.const_data_ptr<bool>();
  const int64_t bytes = param.element_size();
  char* target = static_cast<char*>(restore ? param.data_ptr() : prev_params.data_ptr());
  const char* source = static_cast<const char*>(restore ? prev_params.const_data_ptr() : param.const_data_ptr());
  at::parallel_for(0, n, kStepGrain, [&](int64_t begin, int64_t end) {
    std::copy(source + begin * bytes, source + end * bytes, target + begin * bytes);
  });
}

void epoch_commit_meta(const at::Tensor& param, const at::Tensor& prev_params, const at::Tensor& rolled_back) {}

}  // namespace

// A fragment, not TORCH_LIBRARY: other backends may define ops in the bbfused namespace too, and only one
// TORCH_LIBRARY block may own a namespace.
TORCH_LIBRARY_FRAGMENT(bbfused, m) {
  m.def(
      "cpp_step(Tensor(a!) param, Tensor grad, Tensor(b!) ema, Tensor lr, float weight_decay, float beta, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor(c!)? nonfinite=None, Tensor(d!)? momentum_buffer=None, "
      "float momentum=0.0, bool nesterov=False, int ema_mode=0, int window_steps=0, "
      "float point_coefficient=0.0) -> ()");
  // An op of its own, not optional arguments of cpp_step: a schema lists every tensor its op may write, and the
  // second moment is written, so cpp_step's schema would claim a write its callers never make.
  m.def(
      "cpp_preconditioned_step(Tensor(a!) param, Tensor grad, Tensor(b!) ema, Tensor lr, float weight_decay, "
      "float beta, Tensor? grad_scale, Tensor? found_inf, Tensor(c!)? nonfinite, Tensor(d!)? momentum_buffer, "
      "float momentum, bool nesterov, Tensor(e!) second_moment, Tensor bias_correction, float beta2, float eps) -> ()");
  m.def("cpp_epoch_end(Tensor param, Tensor(a!) ema, Tensor(b!) prev_params, Tensor(c!) prev_ema) -> Tensor");
  m.def(
      "cpp_epoch_measure(Tensor param, Tensor(a!) ema, Tensor prev_params, Tensor(b!) prev_ema, "
      "Tensor? second_moment=None, Tensor? bias_correction=None, float eps=0.0) -> Tensor");
  m.def("cpp_epoch_commit(Tensor(a!) param, Tensor(b!) prev_params, Tensor rolled_back) -> ()");
}

TORCH_LIBRARY_IMPL(bbfused, CPU, m) {
  m.impl("cpp_step", &step_cpu);
  m.impl("cpp_preconditioned_step", &preconditioned_step_cpu);
  m.impl("cpp_epoch_end", &epoch_end_cpu);
  m.impl("cpp_epoch_measure", &epoch_measure_cpu);
  m.impl("cpp_epoch_commit", &epoch_commit_cpu);
}

// Shapes only, for torch.compile's fake tensors.
TORCH_LIBRARY_IMPL(bbfused, Meta, m) {
  m.impl("cpp_step", &step_meta);
  m.impl("cpp_preconditioned_step", &preconditioned_step_meta);
  m.impl("cpp_epoch_end", &epoch_end_meta);
  m.impl("cpp_epoch_measure", &epoch_measure_meta);
  m.impl("cpp_epoch_commit", &epoch_commit_meta);
}

}  // namespace bbfused
