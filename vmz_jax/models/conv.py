"""3-D convolutions on NTHWC video tensors, each shape mapped to the fastest primitive per backend.

Every function here computes the same thing as `reference_conv3d`, the plain `lax` 3-D convolution;
tests check values and gradients. The fast forms exist because XLA's CPU backend runs 3-D and grouped
convolutions far below its 2-D convolution and dot speed (see docs/benchmarks.md):

* 1x1x1        -> a strided slice and one dot over channels;
* 1xkxk        -> a 2-D convolution over the N*T frames, or, on small frames, patches and one dot;
* kx1x1        -> a 2-D convolution over (T, H*W), or, for 1-2 output frames, one dot per tap;
* depthwise    -> k^3 shifted multiply-adds that XLA fuses into one loop;
* dense kxkxk  -> few input channels (stems): time folded into channels, one 2-D convolution;
                  otherwise one 2-D convolution per temporal tap, summed.

`ConvImpl` is the one switch: "reference" always uses the plain convolution, "fast" the forms above,
"auto" picks per *form* from the default backend's row of `AUTO_IMPL` at trace time, and
"auto:<platform>" from that platform's row (what `make_forward` writes, so that a function traced on one
machine for another carries the target's choice).

bfloat16: every product of the fast forms is a dot (or XLA convolution) whose inputs are bfloat16 and
whose accumulator is float32 (`preferred_element_type`), and the fast forms return that float32
accumulator: the caller's epilogue (BatchNorm shift, residual, ReLU) reads it and rounds once. XLA's
CPU dot runs bfloat16 inputs on the CPU's bfloat16 instructions (AVX512-BF16, AMX) only when it
accumulates in float32; its convolutions convert bfloat16 to float32 and run at float32 speed. A CPU
without bfloat16 instructions (`cpu_has_bfloat16`) computes bfloat16 convolutions in float32, and the
layers built on them compute all of a bfloat16 model in float32 (`compute_dtype`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from functools import cache, partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Triple = tuple[int, int, int]
ConvImpl = Literal["auto", "reference", "fast"]
#: A per-pixel function of a convolution's result (BatchNorm shift, ReLU, cast): `conv3d(epilogue=)`.
Epilogue = Callable[[jax.Array], jax.Array]

#: The kinds of convolution `conv3d` tells apart; each has its own "fast" form (grouped: none yet).
FORMS: tuple[str, ...] = ("pointwise", "spatial", "temporal", "depthwise", "grouped", "dense")
#: Kernels a form may also take, by name (`AUTO_IMPL` values or `impl=`): "pallas" is
#: `vmz_jax.models.conv_pallas` (imported on first use); other forms given a kernel name take "reference".
KERNEL_IMPLS: dict[str, tuple[str, ...]] = {"depthwise": ("pallas",)}

_ALL_FAST = dict.fromkeys(FORMS, "fast")
_ALL_REFERENCE = dict.fromkeys(FORMS, "reference")
# CUDA: cuDNN runs dense 3-D convolutions well, but XLA lowers the backward pass of a grouped
# convolution (feature_group_count > 1) as slowly as a dense one (jax-ml/jax#13800), so every CSN
# depthwise 3x3x3 takes the shifted multiply-add form, which XLA's GPU backend fuses into one
# memory-bound loop (docs/benchmarks.md, "GPU path"). `vmz-jax bench --suite accelerator` A/Bs each
# form per shape and says which row to change.
_CUDA = {**_ALL_REFERENCE, "depthwise": "fast"}

#: What "auto" means, per platform and per form ("reference" or "fast"). "gpu" (JAX's backend name)
#: and "cuda" (its platform name) share one row. Read when a function is traced: a change reaches
#: functions traced after it (`jax.clear_caches()` drops those traced before).
AUTO_IMPL: dict[str, dict[str, str]] = {"cpu": _ALL_FAST, "gpu": _CUDA, "cuda": _CUDA,
                                        "rocm": dict(_ALL_REFERENCE), "tpu": dict(_ALL_REFERENCE)}

_DIMS_3D = ("NDHWC", "DHWIO", "NDHWC")
_DIMS_2D = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str, form: str) -> str:
    """The concrete implementation ("reference", "fast" or a kernel of `KERNEL_IMPLS`) that `impl` means
    for convolutions of `form`: "auto" reads the default backend's row of `AUTO_IMPL`, "auto:<platform>"
    that platform's; a kernel the form does not have means "reference"."""
    if impl in ("reference", "fast"):
        return impl
    if any(impl in kernels for kernels in KERNEL_IMPLS.values()):
        return impl if impl in KERNEL_IMPLS.get(form, ()) else "reference"
    if impl == "auto":
        platform = jax.default_backend()
    elif impl.startswith("auto:"):
        platform = impl[len("auto:"):]
    else:
        raise ValueError(f"unknown conv implementation {impl!r}: use 'auto', 'reference' or 'fast'")
    if form not in FORMS:
        raise ValueError(f"unknown convolution form {form!r}: one of {', '.join(FORMS)}")
    return resolve_impl(AUTO_IMPL.get(platform, _ALL_REFERENCE)[form], form)


def conv_form(in_channels: int, kernel_shape: tuple[int, ...], padding: Triple, groups: int = 1) -> str:
    """Which of `FORMS` a convolution of a (kT, kH, kW, Cin/groups, Cout) kernel is."""
    kt, kh, kw, group_in, cout = kernel_shape
    if groups > 1:
        return "depthwise" if groups == in_channels == cout and group_in == 1 else "grouped"
    if (kt, kh, kw) == (1, 1, 1) and padding == (0, 0, 0):
        return "pointwise"
    if kt == 1 and padding[0] == 0:
        return "spatial"
    if kh == kw == 1 and padding[1] == padding[2] == 0:
        return "temporal"
    return "dense"


#: /proc/cpuinfo flags of the instructions that XLA's CPU dot uses for bfloat16 x bfloat16 -> float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """This host's CPU flags, read once from /proc/cpuinfo; empty where that file is missing
    (non-Linux hosts)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bfloat16() -> bool:
    """Whether this host's CPU multiplies bfloat16 natively (AMX or AVX512-BF16)."""
    return any(flag in BF16_CPU_FLAGS for flag in cpu_flags())


def cpu_kind() -> str:
    """"amx" (Intel Sapphire Rapids and later), "avx512_bf16" (Cooper Lake, AMD Zen 4 and later) or
    "other": the classes of CPU whose measured best choices differ (docs/benchmarks.md)."""
    flags = cpu_flags()
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "other"


#: Which library XLA's CPU backend runs its convolutions with (the forms above that stay `lax`
#: convolutions: stems, large-frame spatial and temporal layers, everything in float32), per
#: `cpu_kind`: "ynnpack" (XLA's default since jaxlib 0.10) or "eigen". Measured on a 2-core
#: Sapphire Rapids Xeon, forward at 2x8x112x112, interleaved in one process, Eigen against YNNPACK:
#: float32 R3D-18 1.49x, MC3-18 1.41x, R(2+1)D-34 1.18x, R(2+1)D-18 1.21x, C3D 1.13x, ir-CSN-152 1.12x;
#: bfloat16 ir-CSN-152 1.22x (its one `lax` convolution, the stem, runs at 211 against 133 GFLOP/s),
#: R(2+1)D-34 0.97x; training steps float32 R(2+1)D-18 1.09x, R3D-18 1.07-1.34x, ir-CSN-152 1.00x
#: in either dtype. CPUs not measured keep XLA's default. Read when a function is compiled.
CPU_CONVOLUTIONS: dict[str, str] = {"amx": "eigen", "avx512_bf16": "ynnpack", "other": "ynnpack"}

# XLA's default YNNPACK fusion types (jaxlib 0.10) less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION:
# convolutions fall through to Eigen, dots (bfloat16 on AMX: ~1,400 GFLOP/s) stay with YNNPACK.
_EIGEN_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@cache
def _xla_takes(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's CPU compiler knows `options` (older ones have no YNNPACK flags)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
            jax.ShapeDtypeStruct((1,), jnp.float32)).compile()
    except Exception:  # an unknown option or value: XLA's INVALID_ARGUMENT, as JaxRuntimeError
        return False
    return True


def _float64_possible() -> bool:
    return bool(jax.config.jax_enable_x64)


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """XLA compile options for functions built from these forms, on `platform` (default: JAX's
    default backend): on a CPU whose `CPU_CONVOLUTIONS` entry is "eigen", the option that leaves
    convolutions to Eigen, unless float64 is enabled (`jax_enable_x64`); otherwise none.
    `make_forward`'s functions and `vmz_jax.train.train_step` are compiled with them; pass them to a
    `jax.jit` of your own (`compiler_options=`) for the same kernels."""
    platform = platform or jax.default_backend()
    if platform != "cpu" or jax.default_backend() != "cpu":
        return {}
    if _float64_possible():
        # Eigen's float64 convolutions ran ~20x slower than YNNPACK's (3x3 64->128 on 8x56x56: 802
        # against 39 ms, AMX Xeon; a C3D float64 training step went past 15 minutes)
        return {}
    library = CPU_CONVOLUTIONS.get(cpu_kind(), "ynnpack")
    if library not in ("eigen", "ynnpack"):
        raise ValueError(f"CPU_CONVOLUTIONS[{cpu_kind()!r}] is {library!r}: use 'eigen' or 'ynnpack'")
    if library == "eigen" and _xla_takes(tuple(_EIGEN_CONVOLUTIONS.items())):
        return dict(_EIGEN_CONVOLUTIONS)
    return {}


def accumulator_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype products of `dtype` inputs are summed in: float32 for bfloat16/float16, else their own."""
    return jnp.promote_types(dtype, jnp.float32)


def _target_platform(impl: str) -> str:
    return impl[len("auto:"):] if impl.startswith("auto:") else jax.default_backend()


_FOR_THIS_HOST = contextvars.ContextVar("vmz_jax_for_this_host", default=True)


@contextlib.contextmanager
def traced_for_any_cpu() -> Iterator[None]:
    """Trace, within, for CPUs in general rather than this host's: bfloat16 stays bfloat16 whatever
    instructions this CPU has. An exported artifact runs on other machines. Only new traces see it: a
    function jitted and called before, outside, keeps its cached trace."""
    token = _FOR_THIS_HOST.set(False)
    try:
        yield
    finally:
        _FOR_THIS_HOST.reset(token)


def _low_precision_as_float32(dtype: jnp.dtype, impl: str) -> bool:
    return (accumulator_dtype(dtype) != dtype and _target_platform(impl) == "cpu"
            and _FOR_THIS_HOST.get() and not cpu_has_bfloat16())


def compute_dtype(dtype: jnp.dtype, impl: str = "auto") -> jnp.dtype:
    """The dtype a layer of compute dtype `dtype` computes in, traced for `impl`'s platform.

    `dtype` itself, except bfloat16 or float16 on a CPU without bfloat16 instructions, which computes in
    float32: there every product runs in float32 anyway, and rounding activations to 16 bits between
    layers only adds conversions (on an AVX2 CPU, bfloat16 activations made the forward of ir_csn_152
    1.05x and of ip_csn_152 1.12x slower than float32's, and ir_csn_152's training step 1.05x).
    Results are then the float32 model's, bit for bit.
    Not within `traced_for_any_cpu`."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if _low_precision_as_float32(dtype, impl) else dtype


def out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def reference_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple,
                     groups: int = 1) -> jax.Array:
    """Plain `lax` 3-D convolution with explicit symmetric padding (never 'SAME')."""
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=[(p, p) for p in padding],
        dimension_numbers=_DIMS_3D, feature_group_count=groups)


def conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple, groups: int = 1,
           impl: str = "auto", epilogue: Epilogue | None = None) -> jax.Array:
    """Convolve `x` (N, T, H, W, Cin) with `w` (kT, kH, kW, Cin/groups, Cout).

    Low-precision inputs: the fast forms return their float32 accumulator (see the module docstring),
    the plain convolution x's dtype; on a CPU without bfloat16 instructions both compute in float32.
    `epilogue`, a per-pixel function of the result (a BatchNorm shift, ReLU and the cast to the
    activations' dtype), is applied to it: by the forms that loop over frames inside the loop, so
    that what the loop stacks is the epilogue's output (see `spatial_conv3d`), by the others after.
    """
    form = conv_form(x.shape[-1], w.shape, tuple(padding), groups)  # type: ignore[arg-type]
    if _low_precision_as_float32(x.dtype, impl):
        x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    chosen = resolve_impl(impl, form)
    if chosen == "pallas":
        from vmz_jax.models.conv_pallas import depthwise_conv3d_pallas

        y = depthwise_conv3d_pallas(x, w, stride, padding)
    elif chosen == "reference" or form == "grouped":
        y = reference_conv3d(x, w, stride, padding, groups)
    elif form == "pointwise":
        y = pointwise_conv3d(x, w, stride)
    elif form == "spatial":
        return spatial_conv3d(x, w, stride, padding, epilogue)
    else:
        y = _FAST_FORMS[form](x, w, stride, padding)
    return y if epilogue is None else epilogue(y)


def _subsample(x: jax.Array, st: int, sh: int, sw: int) -> jax.Array:
    if (st, sh, sw) == (1, 1, 1):
        return x
    return x[:, ::st, ::sh, ::sw, :]


def pointwise_conv3d(x: jax.Array, w: jax.Array, stride: Triple) -> jax.Array:
    return channel_dot(_subsample(x, *stride), w)


@jax.custom_vjp
def channel_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) times the kernel `w` (..., O) flattened to (K, O), summed in `accumulator_dtype`.

    The product of 1x1x1 convolutions (w: (1, 1, 1, C, O)), of patches (w: (kH, kW, C, O), tap-major
    like `spatial_patches`) and of single temporal taps (w: (C, O)). The result is the accumulator
    (float32 for bfloat16 inputs): both gradients are bfloat16 dots accumulated in float32 too,
    rounded to the inputs' dtype, where autodiff would have multiplied a float32 cotangent into
    bfloat16 operands at float32 speed.

    The reverse-mode rule also exists for what it saves: its residuals are the inputs themselves,
    and a residual that is an input of a `lax.scan` body (the stacked blocks' kernels) is passed
    through by JAX instead of being stacked. Autodiff of the dot saved the reshaped (C, O) kernel, a
    new value, so the forward scan wrote a copy of every scanned block's kernels into
    zero-initialized stacks (ir-CSN-152's step: 4% of its time).
    """
    return jnp.einsum("...k,ko->...o", x, w.reshape(-1, w.shape[-1]),
                      preferred_element_type=accumulator_dtype(x.dtype))


def _channel_dot_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return channel_dot(x, w), (x, w)


def _channel_dot_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    acc = accumulator_dtype(x.dtype)
    g = g.astype(x.dtype)
    matrix = w.reshape(-1, w.shape[-1])
    gx = jnp.einsum("...o,ko->...k", g, matrix, preferred_element_type=acc)
    # pixels flattened first: XLA's CPU dot ran the same contraction over (n, t, h, w) as four
    # contracted dimensions 1.1-1.6x slower (ir-CSN's 1x1x1 shapes)
    gw = jnp.einsum("pk,po->ko", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                    preferred_element_type=acc)
    return gx.astype(x.dtype), gw.astype(w.dtype).reshape(w.shape)


channel_dot.defvjp(_channel_dot_fwd, _channel_dot_bwd)


def _conv2d_lax(x: jax.Array, w: jax.Array, stride: tuple[int, int], padding: tuple[int, int]
                ) -> jax.Array:
    """XLA's 2-D convolution, returning its accumulator (float32 for bfloat16 inputs: XLA's CPU
    convolution converts them to float32 anyway, so this saves the rounding pass back)."""
    return lax.conv_general_dilated(x, w, window_strides=stride,
                                    padding=[(p, p) for p in padding], dimension_numbers=_DIMS_2D,
                                    preferred_element_type=accumulator_dtype(x.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, stride: tuple[int, int], padding: tuple[int, int]
           ) -> jax.Array:
    """NHWC x HWIO 2-D convolution with symmetric padding, with a reverse-mode rule built for CPUs.

    Forward is XLA's 2-D convolution. Its automatic transposes are not usable on XLA's CPU backend:
    the weight gradient becomes a convolution with the batch as the contracted feature dimension,
    which ran a 3x3 64->144 layer at 16x28x28 in 5.3 s against 0.1 s forward. The rule below
    computes the weight gradient as one dot of im2col patches with the cotangent (batch x pixels
    contracted, the shape XLA's dot kernels are made for), and the input gradient as a
    forward convolution with the flipped, transposed kernel (stride 1) or as one dot into patch
    space folded back by strided padding (strided convolutions, whose transpose XLA runs as a slow
    dilated convolution). Both gradients accumulate in float32 for bfloat16 inputs, and the
    forward returns its accumulator (`_conv2d_lax`).
    """
    return _conv2d_lax(x, w, stride, padding)


def _conv2d_fwd(x: jax.Array, w: jax.Array, stride: tuple[int, int], padding: tuple[int, int]
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv2d_lax(x, w, stride, padding), (x, w)


def _conv2d_bwd(stride: tuple[int, int], padding: tuple[int, int],
                res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    kh, kw, c, o = w.shape
    (sh, sw), (ph, pw) = stride, padding
    n, h, wd, _ = x.shape
    ho, wo = g.shape[1:3]
    g = g.astype(x.dtype)
    gw = _conv2d_weight_gradient(x, g, (kh, kw), stride, padding).reshape(w.shape)
    if (sh, sw) == (1, 1):
        flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
        gx = _conv2d_lax(g, flipped, (1, 1), (kh - 1 - ph, kw - 1 - pw))  # (H, W) again
    else:
        cols = jnp.einsum("po,ko->pk", g.reshape(-1, o), w.reshape(-1, o),
                          preferred_element_type=accumulator_dtype(x.dtype)
                          ).reshape(n, ho, wo, kh * kw, c)
        hp, wp = h + 2 * ph, wd + 2 * pw
        zero = jnp.zeros((), cols.dtype)
        gxp = None
        for i, (b, d) in enumerate((b, d) for b in range(kh) for d in range(kw)):
            term = lax.pad(cols[:, :, :, i], zero, [
                (0, 0, 0), (b, hp - b - sh * (ho - 1) - 1, sh - 1),
                (d, wp - d - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)])
            gxp = term if gxp is None else gxp + term
        assert gxp is not None
        gx = gxp[:, ph:ph + h, pw:pw + wd]
    return gx.astype(x.dtype), gw.astype(w.dtype)


# The most bytes of im2col patches the weight gradient builds at once (see `_conv2d_weight_gradient`).
PATCH_BYTES = 256 << 20


def _conv2d_weight_gradient(x: jax.Array, g: jax.Array, kernel: tuple[int, int],
                            stride: tuple[int, int], padding: tuple[int, int]) -> jax.Array:
    """(kH*kW*C, O): the input's im2col patches contracted with the cotangent over every pixel.

    One dot over full patches (every pixel of the batch contracted at once, the shape XLA's dot
    kernels run fastest), in blocks of images when the patches of the whole batch would exceed
    `PATCH_BYTES`; the blocks' products are summed in a loop. Building the patches costs a copy of kH*kW
    inputs, which is cheap once freed memory is reused rather than faulted in afresh
    (`vmz_jax.runtime.reuse_host_memory`): a 3x3 64->144 layer at 16x56x56 ran at 96 GFLOP/s this way
    against 67 for one dot per kernel row. Kernels one wide (the temporal (kT, 1) ones) take one dot
    per tap over its window instead: 61 against 40 GFLOP/s for layer1's 3x1 144->64 at 16x3136.
    Low-precision inputs accumulate in float32 (XLA's CPU dot does so anyway; explicit for the
    backends that would not).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, ho, wo, o = g.shape
    c = x.shape[-1]
    acc_dtype = accumulator_dtype(x.dtype)

    def contract(pixels: jax.Array, cotangent: jax.Array) -> jax.Array:
        return jnp.einsum("pk,po->ko", pixels.reshape(-1, pixels.shape[-1]), cotangent.reshape(-1, o),
                          preferred_element_type=acc_dtype)

    if kw == 1:
        xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        return jnp.concatenate([contract(_time_window(xp, b, ho, sh)[:, :, ::sw], g) for b in range(kh)])

    def block_gradient(xb: jax.Array, gb: jax.Array) -> jax.Array:
        return contract(spatial_patches(xb[:, None], kh, kw, sh, sw, ph, pw), gb)

    per_image = ho * wo * kh * kw * c * x.dtype.itemsize
    size = max((d for d in range(1, n + 1) if n % d == 0 and d * per_image <= PATCH_BYTES), default=1)
    if size == n:
        return block_gradient(x, g)

    def add_block(total: jax.Array, block: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return total + block_gradient(*block), None

    blocks = n // size
    split = (x.reshape(blocks, size, *x.shape[1:]), g.reshape(blocks, size, *g.shape[1:]))
    total, _ = lax.scan(add_block, jnp.zeros((kh * kw * c, o), acc_dtype), split)
    return total


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


# Frames with at most this many output pixels use patches + one dot instead of XLA's 2-D convolution
# (measured faster on CPU for layer3/layer4 shapes of R(2+1)D, slower on the large early frames).
SMALL_FRAME = 14 * 14
# bfloat16 only: frames with at most this many output pixels take float32-accumulating bfloat16 dots
# (one per kernel row, one per temporal tap) instead of XLA's convolution, which computes bfloat16 at
# float32 speed. Measured by CPU time on R(2+1)D-34's layer2 (28x28): 1x3x3 128->288 145 against
# 96 GFLOP/s, 3x1x1 288->128 129 against 89; on 56x56 frames the dots lost (70 and 44 against 92).
BF16_DOT_FRAME = 28 * 28
# bfloat16 temporal convolutions take one dot per tap on frames up to this many pixels, per `cpu_kind`
# (others: `BF16_DOT_FRAME`). AMX Xeon, 3x1x1 144->64 at 2x8x56x56 with its epilogue: 19.3 ms against
# 23.3 for Eigen's convolution and 20.8 for YNNPACK's; R(2+1)D-34's bfloat16 forward 0.334 against
# 0.348 s. On the AVX512-BF16 EPYC the taps lost at 56x56 (44 against 92 GFLOP per CPU-second).
BF16_TEMPORAL_DOT_FRAME = {"amx": 56 * 56}


def _low_precision(x: jax.Array) -> bool:
    return accumulator_dtype(x.dtype) != x.dtype


def _time_taps(t: int, k: int, s: int, p: int) -> list[int]:
    """The temporal taps whose strided window reads at least one real (unpadded) frame."""
    t_out = out_size(t, k, s, p)
    return [a for a in range(k) if any(p <= a + s * j < p + t for j in range(t_out))]


def _time_window(xp: jax.Array, start: int, count: int, s: int) -> jax.Array:
    return lax.slice_in_dim(xp, start, start + s * (count - 1) + 1, s, axis=1)


def moved_as_bits(move: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """`move(x)` for a `move` that only moves data (zero padding, slices, concatenation), with
    bfloat16 moved as its bits (uint16). XLA's CPU backend has no bfloat16 concatenate: it converted
    every piece of a bfloat16 patch matrix to float32, concatenated in float32 and converted back
    (R(2+1)D-34's row patches, the stems' time-folded input, the weight gradients' patches). The
    gradient is `move`'s own transpose, in x's dtype."""
    if x.dtype != jnp.bfloat16:
        return move(x)
    shape, dtype = x.shape, x.dtype

    @jax.custom_vjp
    def moved(x: jax.Array) -> jax.Array:
        return lax.bitcast_convert_type(move(lax.bitcast_convert_type(x, jnp.uint16)), jnp.bfloat16)

    def backward(_: None, g: jax.Array) -> tuple[jax.Array]:
        _, transpose = jax.vjp(move, jnp.zeros(shape, dtype))  # linear: any point will do
        return transpose(g)

    moved.defvjp(lambda x: (moved(x), None), backward)
    return moved(x)


def spatial_patches(x: jax.Array, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int
                    ) -> jax.Array:
    """(N, T, Ho, Wo, kH*kW*C) patches, tap-major, matching a (kH, kW, C, O) kernel reshape."""
    n, t, h, wd, c = x.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)

    def move(x: jax.Array) -> jax.Array:
        xp = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)))
        return jnp.concatenate([
            lax.slice(xp, (0, 0, b, d, 0), (n, t, b + sh * (ho - 1) + 1, d + sw * (wo - 1) + 1, c),
                      (1, 1, sh, sw, 1))
            for b in range(kh) for d in range(kw)], axis=-1)

    return moved_as_bits(move, x)


def row_patches(x: jax.Array, kw: int, sw: int, ph: int, pw: int) -> jax.Array:
    """(N, T, H + 2pH, Wo, kW*C): the kW taps of each kernel row side by side, matching a (kW, C, O)
    kernel row reshaped; rows of the padded input, so kernel row b reads rows b, b + sH, ..."""
    wo = out_size(x.shape[3], kw, sw, pw)

    def move(x: jax.Array) -> jax.Array:
        xp = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)))
        return jnp.concatenate([lax.slice_in_dim(xp, d, d + sw * (wo - 1) + 1, sw, axis=3)
                                for d in range(kw)], axis=-1)

    return moved_as_bits(move, x)


def _dots_by_rows(x: jax.Array, w: jax.Array, stride: tuple[int, int], padding: tuple[int, int]
                  ) -> jax.Array:
    """(N, T, H, W, C) x (kH, kW, C, O): one `channel_dot` per kernel row over `row_patches`, summed."""
    kh, kw = w.shape[:2]
    ho = out_size(x.shape[2], kh, stride[0], padding[0])
    rows = row_patches(x, kw, stride[1], *padding)
    terms = [channel_dot(lax.slice_in_dim(rows, b, b + stride[0] * (ho - 1) + 1, stride[0], axis=2), w[b])
             for b in range(kh)]
    return sum(terms[1:], terms[0])


# Frames per iteration of the bfloat16 frame loops (`frames_by_rows`), per `cpu_kind` (others: 1).
# 1x3x3 64->144 at 16x56x56, bfloat16 with its epilogue, AMX Xeon: 32.4 ms one frame at a time, 24.6
# two, 28.6 four, 33.2 eight, 38.7 the whole batch at once (an iteration of XLA's CPU loop costs
# ~0.4 ms; more frames, less cache). `python benchmarks/bf16_frame_loop.py` measures it.
FRAMES_PER_STEP = {"amx": 2}


def _tuned_kind() -> str:
    """The `cpu_kind` whose measured thresholds a trace takes: this host's, or "other" within
    `traced_for_any_cpu` (an export runs elsewhere; every choice computes the same function)."""
    return cpu_kind() if _FOR_THIS_HOST.get() else "other"


def frames_by_rows(x: jax.Array, w: jax.Array, stride: tuple[int, int], padding: tuple[int, int],
                   epilogue: Epilogue | None = None) -> jax.Array:
    """(N, H, W, C) frames x (kH, kW, C, O): `_dots_by_rows` over a few frames at a time
    (`FRAMES_PER_STEP`; `lax.map`), so that their row patches are still in cache when the dots read
    them, with `epilogue` applied inside the loop: the loop then stacks the epilogue's (bfloat16)
    output instead of the float32 accumulator that a pass after the loop would read again (the layer
    above, two frames a step: 29.1 -> 24.6 ms)."""
    n = x.shape[0]
    step = FRAMES_PER_STEP.get(_tuned_kind(), 1)
    step = step if n % step == 0 else 1

    def frames(f: jax.Array) -> jax.Array:
        y = _dots_by_rows(f[:, None], w, stride, padding)[:, 0]
        return y if epilogue is None else epilogue(y)

    out = lax.map(frames, x.reshape(n // step, step, *x.shape[1:]))
    return out.reshape(n, *out.shape[2:])


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_by_rows(x: jax.Array, w: jax.Array, stride: tuple[int, int], padding: tuple[int, int]
                   ) -> jax.Array:
    """`conv2d` for bfloat16 on large frames: `frames_by_rows`, with `conv2d`'s reverse-mode rule.
    CPU time, 1x3x3 64->144 at 16x56x56: the whole batch at once 70 GFLOP per CPU-second, frame by
    frame 115-121, XLA's convolution 80-95 (float32 or bfloat16). Differentiating through the frame
    loop instead was slower than float32 (55 against 59 forward + backward)."""
    return frames_by_rows(x, w, stride, padding)


conv2d_by_rows.defvjp(lambda x, w, stride, padding: (conv2d_by_rows(x, w, stride, padding), (x, w)),
                      _conv2d_bwd)


def spatial_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple,
                   epilogue: Epilogue | None = None) -> jax.Array:
    """A 1 x kH x kW convolution: a 2-D convolution over all N*T frames, patches + dot if small.

    bfloat16 with at least 64 input channels: one float32-accumulating dot per kernel row over
    `row_patches` (a third of full patches' copying); on frames above `BF16_DOT_FRAME`, a few frames
    at a time (`frames_by_rows`), with `epilogue` inside the loop where there is one (inference: no
    reverse-mode rule of its own, autodiff through the loop), else with `conv2d`'s rule
    (`conv2d_by_rows`)."""
    then = (lambda y: y) if epilogue is None else epilogue
    x = _subsample(x, stride[0], 1, 1)
    n, t, h, wd, c = x.shape
    kh, kw = w.shape[1:3]
    ho, wo = out_size(h, kh, stride[1], padding[1]), out_size(wd, kw, stride[2], padding[2])
    if ho * wo <= SMALL_FRAME and c >= 64:
        patches = spatial_patches(x, kh, kw, stride[1], stride[2], padding[1], padding[2])
        return then(channel_dot(patches, w[0]))
    if _low_precision(x) and c >= 64:
        if ho * wo <= BF16_DOT_FRAME:
            return then(_dots_by_rows(x, w[0], stride[1:], padding[1:]))
        frames = x.reshape(n * t, h, wd, c)
        if epilogue is None:
            y = conv2d_by_rows(frames, w[0], stride[1:], padding[1:])
        else:
            y = frames_by_rows(frames, w[0], stride[1:], padding[1:], epilogue)
        return y.reshape(n, t, *y.shape[1:])
    y = conv2d(x.reshape(n * t, h, wd, c), w[0], stride[1:], padding[1:])
    return then(y.reshape(n, t, *y.shape[1:]))


def temporal_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> jax.Array:
    """A kT x 1 x 1 convolution: a 2-D convolution over (T, H*W); one dot per tap for short outputs.

    With one or two output frames most taps see only padding: those are skipped outright. bfloat16
    takes the per-tap dots for any number of output frames on frames up to `BF16_DOT_FRAME` pixels
    (`BF16_TEMPORAL_DOT_FRAME` on the CPUs it names): the float32-accumulating dots run there at
    1.5-1.7x XLA's convolution, which computes bfloat16 at float32 speed.
    """
    x = _subsample(x, 1, stride[1], stride[2])
    n, t, h, wd, c = x.shape
    kt, st, pt = w.shape[0], stride[0], padding[0]
    t_out = out_size(t, kt, st, pt)
    dot_frame = BF16_TEMPORAL_DOT_FRAME.get(_tuned_kind(), BF16_DOT_FRAME)
    if (t_out <= 2 and (t_out == 1 or st > 1)) or (_low_precision(x) and h * wd <= dot_frame):
        xp = jnp.pad(x, ((0, 0), (pt, pt), (0, 0), (0, 0), (0, 0)))
        terms = [channel_dot(_time_window(xp, a, t_out, st), w[a, 0, 0])
                 for a in _time_taps(t, kt, st, pt)]
        return sum(terms[1:], terms[0])
    y = conv2d(x.reshape(n, t, h * wd, c), w[:, 0], (stride[0], 1), (padding[0], 0))
    return y.reshape(n, y.shape[1], h, wd, y.shape[-1])


# Below this many (input channels x temporal taps), dense convolutions fold time into channels.
FOLD_TIME_CHANNELS = 96


def dense_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> jax.Array:
    """A dense kT x kH x kW convolution from 2-D convolutions over frames.

    Few input channels (the 3-channel stems): the kT shifted clips are stacked along channels and
    convolved once. Otherwise: one 2-D convolution per temporal tap, summed.
    """
    kt, st, pt = w.shape[0], stride[0], padding[0]
    t = x.shape[1]
    t_out = out_size(t, kt, st, pt)
    xp = jnp.pad(x, ((0, 0), (pt, pt), (0, 0), (0, 0), (0, 0)))
    spatial_stride, spatial_pad = (1, *stride[1:]), (0, *padding[1:])
    if kt * x.shape[-1] <= FOLD_TIME_CHANNELS:
        def stack(xp: jax.Array) -> jax.Array:
            return jnp.concatenate([_time_window(xp, a, t_out, st) for a in range(kt)], axis=-1)

        stacked = moved_as_bits(stack, xp)
        folded = w.reshape(1, kt, *w.shape[1:3], -1, w.shape[-1]).transpose(0, 2, 3, 1, 4, 5)
        return spatial_conv3d(stacked, folded.reshape(1, *w.shape[1:3], -1, w.shape[-1]),
                              spatial_stride, spatial_pad)
    terms = [spatial_conv3d(_time_window(xp, a, t_out, st), w[a:a + 1], spatial_stride, spatial_pad)
             for a in _time_taps(t, kt, st, pt)]
    return sum(terms[1:], terms[0])


def _depthwise_windows(xp: jax.Array, kernel: Triple, stride: Triple, out: Triple
                       ) -> list[jax.Array]:
    """The kT*kH*kW strided windows of a padded NTHWC input, each of the output's size."""
    n, c = xp.shape[0], xp.shape[-1]
    (st, sh, sw), (to, ho, wo) = stride, out
    return [lax.slice(xp, (0, a, b, d, 0),
                      (n, a + st * (to - 1) + 1, b + sh * (ho - 1) + 1, d + sw * (wo - 1) + 1, c),
                      (1, st, sh, sw, 1))
            for a in range(kernel[0]) for b in range(kernel[1]) for d in range(kernel[2])]


def _depthwise_taps(xp: jax.Array, w: jax.Array, stride: Triple, out: Triple, dtype: jnp.dtype
                    ) -> jax.Array:
    """Sum of the windows of the (already padded) input times their taps, accumulated in float32+."""
    acc_dtype = accumulator_dtype(dtype)
    taps = w[:, :, :, 0, :].astype(acc_dtype).reshape(-1, w.shape[-1])
    acc = None
    for window, tap in zip(_depthwise_windows(xp, w.shape[:3], stride, out), taps, strict=True):
        term = window.astype(acc_dtype) * tap
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc.astype(dtype)


def _depthwise_out(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> Triple:
    return tuple(out_size(n, k, s, p) for n, k, s, p in  # type: ignore[return-value]
                 zip(x.shape[1:4], w.shape[:3], stride, padding, strict=True))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv3d(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple) -> jax.Array:
    """Depthwise convolution as kT*kH*kW shifted multiply-adds (one fused loop under jit).

    Low-precision inputs accumulate in float32: the products are summed in registers, so the wider
    accumulator costs no memory traffic.

    The reverse-mode rule keeps both gradients in this form. Autodiff of the forward loop gave, for a
    64-channel 8x14x14 layer, 270 ms and 6 s of compile for what runs in 1 ms forward: the input
    gradient here is the same shifted multiply-add loop over the cotangent (dilated by the stride,
    padded to the input's reach) with the flipped taps, and the weight gradient one reduction per tap.
    """
    out = _depthwise_out(x, w, stride, padding)
    xp = jnp.pad(x, ((0, 0), *((p, p) for p in padding), (0, 0)))
    return _depthwise_taps(xp, w, stride, out, x.dtype)


def _depthwise_fwd(x: jax.Array, w: jax.Array, stride: Triple, padding: Triple
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return depthwise_conv3d(x, w, stride, padding), (x, w)


def _depthwise_bwd(stride: Triple, padding: Triple, res: tuple[jax.Array, jax.Array],
                   g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    kernel = w.shape[:3]
    out = g.shape[1:4]
    acc_dtype = accumulator_dtype(x.dtype)
    # input gradient: dx[j] = sum_a g_dilated[j + p - a] w[a], a stride-1 correlation with flip(w)
    reach = [(k - 1 - p, n + p - (o - 1) * s - 1, s - 1)
             for n, k, s, p, o in zip(x.shape[1:4], kernel, stride, padding, out, strict=True)]
    gp = lax.pad(g.astype(x.dtype), jnp.zeros((), x.dtype), [(0, 0, 0), *reach, (0, 0, 0)])
    gx = _depthwise_taps(gp, jnp.flip(w, (0, 1, 2)), (1, 1, 1), x.shape[1:4], x.dtype)
    # weight gradient: one reduction per tap, channels kept minor (XLA's fast reduction layout), run
    # as a loop over the taps: 27 separate reductions cost XLA ~27 compiled kernels per layer.
    xp = jnp.pad(x, ((0, 0), *((p, p) for p in padding), (0, 0)))
    ga = g.astype(acc_dtype)
    extent = tuple(s * (o - 1) + 1 for s, o in zip(stride, out, strict=True))
    offsets = jnp.array([(0, *tap, 0) for tap in np.ndindex(*kernel)], jnp.int32)

    def tap_gradient(offset: jax.Array) -> jax.Array:
        window = lax.dynamic_slice(xp, tuple(offset), (x.shape[0], *extent, x.shape[-1]))
        window = _subsample(window, *stride)
        return jnp.sum(window.astype(acc_dtype) * ga, axis=(0, 1, 2, 3))

    gw = lax.map(tap_gradient, offsets)
    return gx, gw.reshape(w.shape).astype(w.dtype)


depthwise_conv3d.defvjp(_depthwise_fwd, _depthwise_bwd)


def max_pool3d(x: jax.Array, kernel: Triple, stride: Triple, padding: Triple = (0, 0, 0)
               ) -> jax.Array:
    """Max-pool with explicit padding by -inf (PyTorch/Caffe2 semantics, floor mode).

    A running `maximum` over the kT*kH*kW strided window slices, not `lax.reduce_window`: its
    reverse-mode rule (select-and-scatter) ran 1.6x slower fwd+bwd on CPU for the CSN stem pool, and
    with a traced init value it has none at all. At exact ties the gradient is shared between the
    tied inputs (torch gives it all to the first); the sum is the same, and after a ReLU the only
    common ties are zeros, whose gradient the ReLU discards anyway.
    """
    if accumulator_dtype(x.dtype) != x.dtype:
        # bfloat16 compared in float32 (exact both ways: the maximum is one of the inputs): XLA's CPU
        # reverse pass of the bfloat16 running maximum, one fused select chain with converts, took
        # 120 ms for ir_csn_152's stem pool at 2x8x112x112, against 35 ms in float32
        return max_pool3d(x.astype(accumulator_dtype(x.dtype)), kernel, stride, padding).astype(x.dtype)
    n, t, h, wd, c = x.shape
    (kt, kh, kw), (st, sh, sw) = kernel, stride
    to, ho, wo = (out_size(t, kt, st, padding[0]), out_size(h, kh, sh, padding[1]),
                  out_size(wd, kw, sw, padding[2]))
    if min(to, ho, wo) < 1:
        raise ValueError(f"max-pool window {kernel} (padding {padding}) is larger than its input "
                         f"{(t, h, wd)}: the clip is too small for this network")
    xp = jnp.pad(x, ((0, 0), *((p, p) for p in padding), (0, 0)), constant_values=-jnp.inf)
    out = None
    for a in range(kt):
        for b in range(kh):
            for d in range(kw):
                window = lax.slice(
                    xp, (0, a, b, d, 0),
                    (n, a + st * (to - 1) + 1, b + sh * (ho - 1) + 1, d + sw * (wo - 1) + 1, c),
                    (1, st, sh, sw, 1))
                out = window if out is None else jnp.maximum(out, window)
    assert out is not None
    return out


# The fast forms that take no epilogue (`conv3d` applies it after them); "spatial" takes one itself.
_FAST_FORMS = {"temporal": temporal_conv3d, "depthwise": depthwise_conv3d, "dense": dense_conv3d}
