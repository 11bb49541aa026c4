"""Independent reference implementations for the nn tests: plain numpy loops, one output
element at a time, written straight from the definitions (no im2col, no reshapes)."""

from __future__ import annotations

import numpy as np


def conv2d_loops(x, w, b, stride, padding):
    """y[n, o, p, q] = b[o] + sum_{c,i,j} w[o, c, i, j] x[n, c, h, v] over the positions
    h = s_h p + i - pad_h, v = s_w q + j - pad_w that lie inside x (outside is zero padding)."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = w.shape
    (sh, sw), (ph, pw) = stride, padding
    H_out = (H + 2 * ph - KH) // sh + 1
    W_out = (W + 2 * pw - KW) // sw + 1
    y = np.zeros((N, C_out, H_out, W_out))
    for n in range(N):
        for o in range(C_out):
            for p in range(H_out):
                for q in range(W_out):
                    total = 0.0 if b is None else b[o]
                    for c in range(C_in):
                        for i in range(KH):
                            for j in range(KW):
                                h, v = sh * p + i - ph, sw * q + j - pw
                                if 0 <= h < H and 0 <= v < W:
                                    total += w[o, c, i, j] * x[n, c, h, v]
                    y[n, o, p, q] = total
    return y


def pool2d_loops(x, kernel, stride, reduce):
    """y[n, c, p, q] = reduce(x[n, c, s_h p : s_h p + KH, s_w q : s_w q + KW])."""
    N, C, H, W = x.shape
    (KH, KW), (sh, sw) = kernel, stride
    H_out, W_out = (H - KH) // sh + 1, (W - KW) // sw + 1
    y = np.zeros((N, C, H_out, W_out))
    for n in range(N):
        for c in range(C):
            for p in range(H_out):
                for q in range(W_out):
                    y[n, c, p, q] = reduce(x[n, c, sh * p:sh * p + KH, sw * q:sw * q + KW])
    return y


def max_pool2d_backward_loops(x, dy, kernel, stride):
    """Each window's dy goes to its first maximum in row-major window order."""
    N, C, H, W = x.shape
    (KH, KW), (sh, sw) = kernel, stride
    dx = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for p in range(dy.shape[2]):
                for q in range(dy.shape[3]):
                    window = x[n, c, sh * p:sh * p + KH, sw * q:sw * q + KW]
                    i, j = divmod(int(np.argmax(window)), KW)   # numpy: first occurrence
                    dx[n, c, sh * p + i, sw * q + j] += dy[n, c, p, q]
    return dx
