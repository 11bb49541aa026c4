"""Streaming (non-temporal) stores for the numba loops: LLVM intrinsics numba does not offer.

A plain store first reads the cache line it writes into (a *read for ownership*), so writing
an output array that does not fit in the cache costs a read and a write of memory. A
non-temporal store writes whole lines straight to memory: half the traffic for an output that
nobody reads before it has left the cache anyway. The normalizers' outputs at training sizes
are such arrays (``y``, ``x_hat``, ``dx`` of 8 MiB each for (32, 64, 32, 32) in float32), so
the kernels write them with these stores when they are large
(:data:`refnorm.kernels.norms.STREAM_FROM`) and with plain stores otherwise, where a
non-temporal store would evict data the next layer is about to read.

Each intrinsic computes 16 values of one loop body with the loop's arithmetic (float64 for
float32 and float64 data, as the plain loops in :mod:`refnorm.kernels._loops`) and stores them
with one aligned non-temporal vector store: the destination ``out[i:i + 16]`` must start on a
64-byte boundary (:func:`aligned_start` gives the first such index; the arrays are allocated
64-byte aligned by :func:`refnorm.kernels.norms.empty`). LLVM's loop vectorizer refuses
non-temporal scalar stores, hence whole vectors here.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # values per vector store: 64 bytes of float32, 128 of float64 (two lines)
ALIGN = 64  # bytes: a cache line


def _pointer(context, builder, array_type, array, index):
    """The address of ``array[index]`` (a 1-D array, any layout with unit stride)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def _vector_load(context, builder, array_type, array, index):
    """16 consecutive values from ``array[index]`` (unaligned), widened to float64."""
    scalar = context.get_data_type(array_type.dtype)
    vec = ir.VectorType(scalar, LANES)
    ptr = builder.bitcast(_pointer(context, builder, array_type, array, index), vec.as_pointer())
    value = builder.load(ptr, align=8 if scalar == ir.DoubleType() else 4)
    if scalar != ir.DoubleType():
        value = builder.fpext(value, ir.VectorType(ir.DoubleType(), LANES))
    return value


def _splat(builder, value):
    """A float64 scalar repeated in all 16 lanes."""
    vec = ir.VectorType(ir.DoubleType(), LANES)
    out = cgutils.get_null_value(vec)
    for k in range(LANES):
        out = builder.insert_element(out, value, ir.Constant(ir.IntType(32), k))
    return out


def _stream_store(context, builder, array_type, array, index, value):
    """Round the float64 vector to the array's dtype and store it non-temporally."""
    scalar = context.get_data_type(array_type.dtype)
    vec = ir.VectorType(scalar, LANES)
    if scalar != ir.DoubleType():
        value = builder.fptrunc(value, vec)
    ptr = builder.bitcast(_pointer(context, builder, array_type, array, index), vec.as_pointer())
    store = builder.store(value, ptr, align=ALIGN)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32),
                                                                                1)]))


_FLAGS = ("contract",)  # as the loops' fastmath: a * b + c may fuse into one rounding


@intrinsic
def stream_normalize(typingctx, x, i, y, x_hat, mean, rstd, gamma, beta):  # pragma: no cover
    """``x_hat[i:i+16] = (x[i:i+16] - mean) * rstd``, ``y[i:i+16] = x_hat * gamma + beta``
    (float64 arithmetic), both stored non-temporally; ``y`` and ``x_hat`` 64-byte aligned at
    ``i``."""
    sig = types.void(x, i, y, x_hat, mean, rstd, gamma, beta)

    def codegen(context, builder, signature, args):
        xa, ia, ya, ha, mean_, rstd_, gamma_, beta_ = args
        xt, _, yt, ht = signature.args[:4]
        v = _vector_load(context, builder, xt, xa, ia)
        h = builder.fmul(builder.fsub(v, _splat(builder, mean_), flags=_FLAGS),
                         _splat(builder, rstd_), flags=_FLAGS)
        out = builder.fadd(builder.fmul(h, _splat(builder, gamma_), flags=_FLAGS),
                           _splat(builder, beta_), flags=_FLAGS)
        _stream_store(context, builder, ht, ha, ia, h)
        _stream_store(context, builder, yt, ya, ia, out)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def stream_combine(typingctx, dy, x_hat, i, dx, k_dy, k_one, k_xhat):  # pragma: no cover
    """``dx[i:i+16] = k_dy * dy[i:i+16] + k_one + k_xhat * x_hat[i:i+16]`` (float64
    arithmetic), stored non-temporally; ``dx`` 64-byte aligned at ``i``."""
    sig = types.void(dy, x_hat, i, dx, k_dy, k_one, k_xhat)

    def codegen(context, builder, signature, args):
        da, ha, ia, oa, k_dy_, k_one_, k_xhat_ = args
        dt, htype, _, ot = signature.args[:4]
        d = _vector_load(context, builder, dt, da, ia)
        h = _vector_load(context, builder, htype, ha, ia)
        out = builder.fadd(
            builder.fadd(builder.fmul(_splat(builder, k_dy_), d, flags=_FLAGS),
                         _splat(builder, k_one_), flags=_FLAGS),
            builder.fmul(_splat(builder, k_xhat_), h, flags=_FLAGS), flags=_FLAGS)
        _stream_store(context, builder, ot, oa, ia, out)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def address(typingctx, a):  # pragma: no cover - compiled
    """The address of ``a``'s first element, as an integer (for :func:`aligned_start`)."""
    sig = types.intp(a)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(types.intp))

    return sig, codegen
