"""Pure-NumPy twins of ``fastopt.kernels``: the textbook formulas.

Same signatures and the same in-place contract as the fast kernels, one
NumPy expression per line of the formulas in docs/update_rules.rst. Slow (every line is a pass
over memory and a temporary) and obviously right: the tests use them as the
oracle and the benchmarks as the baseline. They do not validate their input.

Python-float hyperparameters combine with float32 arrays in float32 (NumPy 2
promotion rules), which is how torch.optim computes a float32 step.
"""

import math

import numpy as np

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "nadam", "adamax", "radam", "adadelta", "rprop",
           "lion", "asgd", "lamb", "adafactor", "sparse_adam", "rowwise_adagrad"]


def _lerp(a, b, w):
    # torch's lerp: exact at both ends. The weight is rounded to the array's
    # dtype before 1 - w is formed, as torch's kernel does.
    w = a.dtype.type(w)
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1 - w)


def _decayed_grad(p, g, lr, weight_decay, decoupled, maximize):
    """The gradient after maximize and coupled decay; a decoupled decay scales p itself."""
    if decoupled:
        p[...] = p * (1 - lr * weight_decay)
        return _effective_grad(p, g, 0.0, maximize)
    return _effective_grad(p, g, weight_decay, maximize)


def _moments(g, exp_avg, exp_avg_sq, beta1, beta2):
    """Adam's two moment estimates, updated in place (Adam, NAdam, RAdam)."""
    exp_avg[...] = _lerp(exp_avg, g, 1 - beta1)
    exp_avg_sq[...] = exp_avg_sq * beta2 + (1 - beta2) * g * g


def _effective_grad(p, g, weight_decay, maximize):
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    return g


def sgd(p, g, momentum_buffer=None, *, lr=1e-3, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, first_step=False):
    """Reference for :func:`fastopt.kernels.sgd`."""
    g = _effective_grad(p, g, weight_decay, maximize)
    if momentum != 0:
        if first_step:
            momentum_buffer[...] = g
        else:
            momentum_buffer[...] = momentum_buffer * momentum + (1 - dampening) * g
        g = g + momentum * momentum_buffer if nesterov else momentum_buffer
    p[...] = p + (-lr) * g


def adagrad(p, g, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False):
    """Reference for :func:`fastopt.kernels.adagrad`."""
    g = _effective_grad(p, g, weight_decay, maximize)
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum[...] = state_sum + g * g
    p[...] = p + (-clr) * g / (np.sqrt(state_sum) + eps)


def _adagrad_rows(p, g, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                  eps=1e-10, maximize=False):
    """Adagrad's update of listed rows, as torch's sparse path forms it: g / std, then * -clr."""
    g = _effective_grad(p, g, 0.0, maximize)
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum[...] = state_sum + g * g
    p[...] = p + (-clr) * (g / (np.sqrt(state_sum) + eps))


def rmsprop(p, g, square_avg, grad_avg=None, momentum_buffer=None, *, step=1, lr=1e-2,
            alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False):
    """Reference for :func:`fastopt.kernels.rmsprop`."""
    g = _effective_grad(p, g, weight_decay, maximize)
    square_avg[...] = square_avg * alpha + (1 - alpha) * g * g
    if centered:
        grad_avg[...] = _lerp(grad_avg, g, 1 - alpha)
        avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if momentum > 0:
        momentum_buffer[...] = momentum_buffer * momentum + g / avg
        p[...] = p + (-lr) * momentum_buffer
    else:
        p[...] = p + (-lr) * g / avg


def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled_weight_decay=False):
    """Reference for :func:`fastopt.kernels.adam`."""
    beta1, beta2 = betas
    g = _decayed_grad(p, g, lr, weight_decay, decoupled_weight_decay, maximize)
    _moments(g, exp_avg, exp_avg_sq, beta1, beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    else:
        second = exp_avg_sq
    denom = np.sqrt(second) / bias_correction2 ** 0.5 + eps
    p[...] = p + (-(lr / bias_correction1)) * exp_avg / denom


def adamax(p, g, exp_avg, exp_inf, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
           weight_decay=0.0, maximize=False):
    """Reference for :func:`fastopt.kernels.adamax`."""
    beta1, beta2 = betas
    g = _effective_grad(p, g, weight_decay, maximize)
    exp_avg[...] = _lerp(exp_avg, g, 1 - beta1)
    np.maximum(exp_inf * beta2, np.abs(g) + eps, out=exp_inf)
    p[...] = p + (-(lr / (1 - beta1 ** step))) * exp_avg / exp_inf


def nadam(p, g, exp_avg, exp_avg_sq, *, step, mu_product, lr=2e-3, betas=(0.9, 0.999),
          eps=1e-8, weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False,
          maximize=False):
    """Reference for :func:`fastopt.kernels.nadam`; returns the new ``mu_product``."""
    beta1, beta2 = betas
    g = _decayed_grad(p, g, lr, weight_decay, decoupled_weight_decay, maximize)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    # torch keeps mu_product as a float32 tensor: the product is rounded to float32.
    mu_product = float(np.float32(mu_product) * np.float32(mu))
    _moments(g, exp_avg, exp_avg_sq, beta1, beta2)
    denom = np.sqrt(exp_avg_sq / (1 - beta2 ** step)) + eps
    p[...] = p + (-lr * (1.0 - mu) / (1.0 - mu_product)) * (g / denom)
    p[...] = p + ((-lr * mu_next) / (1.0 - mu_product * mu_next)) * (exp_avg / denom)
    return mu_product


def radam(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
          weight_decay=0.0, decoupled_weight_decay=False, maximize=False):
    """Reference for :func:`fastopt.kernels.radam`."""
    beta1, beta2 = betas
    g = _decayed_grad(p, g, lr, weight_decay, decoupled_weight_decay, maximize)
    _moments(g, exp_avg, exp_avg_sq, beta1, beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2 ** step / bias_correction2
    corrected = exp_avg / bias_correction1
    if rho_t > 5:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive = (1 / (np.sqrt(exp_avg_sq) + eps)) * bias_correction2 ** 0.5
        p[...] = p - corrected * lr * adaptive * rect
    else:
        p[...] = p - corrected * lr


def adadelta(p, g, square_avg, acc_delta, *, step, lr=1.0, rho=0.9, eps=1e-6,
             weight_decay=0.0, maximize=False):
    """Reference for :func:`fastopt.kernels.adadelta`."""
    g = _effective_grad(p, g, weight_decay, maximize)
    square_avg[...] = square_avg * rho + (1 - rho) * g * g
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * g
    acc_delta[...] = acc_delta * rho + (1 - rho) * delta * delta
    p[...] = p + (-lr) * delta


def _torch_sign(x):
    # torch.sign on the CPU: 0 for NaN (numpy.sign gives NaN)
    return np.where(np.isnan(x), x.dtype.type(0), np.sign(x))


def rprop(p, g, prev, step_size, *, step=1, etas=(0.5, 1.2), step_sizes=(1e-6, 50),
          maximize=False):
    """Reference for :func:`fastopt.kernels.rprop`."""
    etaminus, etaplus = etas
    g = -g if maximize else g
    s = g * prev
    factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, 1.0)).astype(p.dtype)
    # torch.clamp: a bound replaces only a value beyond it (a -0.0 or a NaN stays)
    size = step_size * factor
    size = np.where(size < step_sizes[0], p.dtype.type(step_sizes[0]), size)
    step_size[...] = np.where(size > step_sizes[1], p.dtype.type(step_sizes[1]), size)
    g = np.where(s < 0, p.dtype.type(0), g)
    p[...] = p - _torch_sign(g) * step_size
    prev[...] = g


def _jnp_sign(x):
    # jnp.sign: numpy.sign, except that a zero keeps its sign (numpy's -0.0 gives +0.0)
    return np.where(x == 0, x, np.sign(x))


def lion(p, g, exp_avg, *, step=1, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
         maximize=False):
    """Reference for :func:`fastopt.kernels.lion`."""
    beta1, beta2 = betas
    g = -g if maximize else g
    u = _jnp_sign((1 - beta1) * g + beta1 * exp_avg)
    if weight_decay != 0:
        u = u + weight_decay * p
    p[...] = p + u * (-lr)
    exp_avg[...] = (1 - beta2) * g + beta2 * exp_avg


def asgd(p, g, ax, *, step, eta, mu, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6,
         weight_decay=0.0, maximize=False):
    """Reference for :func:`fastopt.kernels.asgd`; returns the new ``(eta, mu)``."""
    g = _effective_grad(p, g, weight_decay, maximize)
    p[...] = p * (1 - lambd * eta)
    p[...] = p + (-eta) * g
    if mu != 1:
        ax[...] = ax + (p - ax) * mu
    else:
        ax[...] = p
    # torch keeps eta and mu as float32 tensors: the new values are rounded to float32
    with np.errstate(over="ignore"):
        new_eta = float(np.float32(lr / np.float64(1 + lambd * lr * step) ** alpha))
    return new_eta, float(np.float32(1 / max(1, step - t0)))


#: the compute layer's fixed summation order (src_c/_kernels.pxi: STATS_BLOCK, LANES)
_BLOCK, _LANES = 8192, 8


def _fixed_order_sumsq(x):
    """The sum of squares in double, in the kernels' order: blocks of _BLOCK,
    each summed in _LANES interleaved running sums (element i into lane
    i % _LANES), the lanes and then the blocks added in order. Any order
    gives nearly the same number; this one gives the same bits."""
    sq = np.square(np.asarray(x, dtype=np.float64).ravel())
    total = 0.0
    for start in range(0, sq.size, _BLOCK):
        block = sq[start:start + _BLOCK]
        block_sum = 0.0
        for lane in range(_LANES):
            values = block[lane::_LANES]
            # cumsum adds one element at a time, as the kernel's running sum does
            block_sum += float(np.cumsum(values)[-1]) if values.size else 0.0
        total += block_sum
    return total


def lamb(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-6,
         weight_decay=0.0, maximize=False):
    """Reference for :func:`fastopt.kernels.lamb`."""
    beta1, beta2 = betas
    g = -g if maximize else g
    exp_avg[...] = (1 - beta1) * g + beta1 * exp_avg
    exp_avg_sq[...] = (1 - beta2) * (g * g) + beta2 * exp_avg_sq
    u = (exp_avg / (1 - beta1 ** step)) / (np.sqrt(exp_avg_sq / (1 - beta2 ** step)) + eps)
    if weight_decay != 0:
        u = u + weight_decay * p
    param_norm = np.sqrt(_fixed_order_sumsq(p))
    update_norm = np.sqrt(_fixed_order_sumsq(u))
    trust = 1.0 if param_norm == 0 or update_norm == 0 else param_norm / update_norm
    p[...] = p + (u * p.dtype.type(trust)) * (-lr)


# Adafactor's sums, in its kernel's order (src_c/rules/adafactor.pxi): norms
# over rows cut into at most _SUM_BLOCKS blocks; a vector's rows hold
# _VECTOR_ROW elements.
_SUM_BLOCKS, _VECTOR_ROW = 256, 4096


def _row_sums(x):
    """Per row of 2-D ``x``, its sum in double: _LANES running sums (element i
    into lane i % _LANES), then the lanes in order."""
    x = x.astype(np.float64)
    total = np.zeros(x.shape[0])
    for lane in range(min(_LANES, x.shape[1])):
        total = total + np.cumsum(x[:, lane::_LANES], axis=1)[:, -1]
    return total


def _row_sumsq(x):
    """Per row of 2-D ``x``, the sum of its squares in double, as _row_sums adds."""
    return _row_sums(np.square(x.astype(np.float64)))


def _vector_rows(x, sums):
    """``sums`` (_row_sums or _row_sumsq) of a vector cut into rows of _VECTOR_ROW
    elements (the last one shorter)."""
    x = x.ravel()
    whole = x.size - x.size % _VECTOR_ROW
    parts = [sums(x[:whole].reshape(-1, _VECTOR_ROW))]
    if whole < x.size:
        parts.append(sums(x[whole:].reshape(1, -1)))
    return np.concatenate(parts)


def _blocked_total(row_sums):
    """The rows' sums added in blocks: block b of B = min(rows, _SUM_BLOCKS) starts at
    row b * rows // B; each block's rows in order, then the blocks in order."""
    rows = row_sums.size
    blocks = min(rows, _SUM_BLOCKS)
    total = 0.0
    for b in range(blocks):
        part = row_sums[b * rows // blocks:(b + 1) * rows // blocks]
        total += float(np.cumsum(part)[-1]) if part.size else 0.0
    return total


def adafactor(p, g, row_var, col_var, variance, *, step, lr=1e-2, beta2_decay=-0.8,
              eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False):
    """Reference for :func:`fastopt.kernels.adafactor` (torch.optim.Adafactor's rule)."""
    if p.size == 0:
        return
    t = p.dtype.type
    eps1, eps2 = eps
    eps1 = float(np.finfo(p.dtype).eps) if eps1 is None else eps1
    w = float(step) ** beta2_decay
    rho = min(lr, 1 / float(step) ** 0.5)
    g = -g if maximize else g
    eps1_sq = t(eps1 * eps1)
    if p.ndim >= 2:
        rows, cols = p.shape[-2:]
        matrices = p.reshape(-1, rows, cols)
        grads = g.reshape(-1, rows, cols)
        p_sq = _blocked_total(_row_sumsq(matrices.reshape(-1, cols)))
        g_sq = np.square(grads.astype(np.float64))
        row_mean = (_row_sumsq(grads.reshape(-1, cols)) / cols).astype(p.dtype)
        col_mean = (np.cumsum(g_sq, axis=1)[:, -1, :] / rows).astype(p.dtype)
        row_var[...] = _lerp(row_var, row_mean.reshape(row_var.shape), w)
        col_var[...] = _lerp(col_var, col_mean.reshape(col_var.shape), w)
        r = row_var.reshape(-1, rows, 1)
        mean_of_rows = np.cumsum(r.astype(np.float64), axis=1)[:, -1:, :] / rows
        # torch's (row_var @ col_var) / mean, as (row_var / mean) * col_var
        var = (r / np.maximum(mean_of_rows.astype(p.dtype), t(eps1))) * col_var.reshape(-1, 1, cols)
        var = np.maximum(var, eps1_sq)
        u_sq = _blocked_total(_row_sums(((grads / var) * grads).reshape(-1, cols)))
        update = (grads / np.sqrt(var)).reshape(p.shape)
    else:
        p_sq = _blocked_total(_vector_rows(p, _row_sumsq))
        variance[...] = _lerp(variance, g * g, w)
        var = np.maximum(variance, eps1_sq)
        u_sq = _blocked_total(_vector_rows((g / var) * g, _row_sums))
        # torch's rsqrt(var) * g, as g / sqrt(var)
        update = g / np.sqrt(var)
    # torch, in Python floats (max(a, b) keeps a unless b > a)
    alpha = max(eps2, np.sqrt(p_sq) / p.size ** 0.5) * rho
    denom = max(1.0, np.sqrt(u_sq) / (p.size ** 0.5 * d))
    if weight_decay != 0:
        p[...] = p * t(1 - lr * weight_decay)
    p[...] = p + t(-alpha / denom) * update


# ------------------------------------------------------------ half storage
# The twins of src_c/storage.pxi: how a float32 result is stored in a half
# type. A half-precision step is the float32 rule on the widened values, each
# result stored with one of these (fastopt.optim.optimizer runs them so under
# backend="numpy"). Integer arithmetic on the bits, in uint64 so nothing wraps
# unseen.

_M32 = np.uint64(0xFFFFFFFF)


def _mix32(x):
    """Chris Wellons' lowbias32 finaliser on uint64 arrays holding 32-bit values."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


def random_bits(key, start, n):
    """The random integers (uint32) of elements start..start+n-1 of stream ``key``."""
    i = np.arange(start, start + n, dtype=np.uint64)
    key = np.uint64(key)
    high = _mix32((i >> np.uint64(32)) ^ (key >> np.uint64(32)))
    return _mix32((i & _M32) ^ (key & _M32) ^ high).astype(np.uint32)


def stream_key(key, stream):
    """The stream of array ``stream`` of a parameter (0: p, 1 + j: state buffer j)."""
    return (key + stream * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)


def bfloat16_bits(x, bits=None):
    """float32 -> bfloat16 bits (uint16): to nearest even, or stochastically with ``bits``."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    if bits is None:
        rounded = (u + 0x7FFF + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    else:
        rounded = (u + (bits.astype(np.uint64) & np.uint64(0xFFFF))) >> np.uint64(16)
    nan = (u & np.uint64(0x7FFFFFFF)) > 0x7F800000
    canonical = ((u >> np.uint64(16)) & np.uint64(0x8000)) | np.uint64(0x7FC0)
    return np.where(nan, canonical, rounded).astype(np.uint16)


def float16_bits(x, bits=None):
    """float32 -> float16 bits (uint16): to nearest even, or stochastically with ``bits``."""
    x = np.ascontiguousarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        nearest = x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32).astype(np.uint64)
    sign = (u >> np.uint64(16)) & np.uint64(0x8000)
    a = u & np.uint64(0x7FFFFFFF)
    nan = a > 0x7F800000
    # NaNs as F16C writes them: quieted, payload truncated
    nearest = np.where(nan, sign | np.uint64(0x7E00) | ((a >> np.uint64(13)) & np.uint64(0x3FF)),
                       nearest).astype(np.uint16)
    if bits is None:
        return nearest
    r = bits.astype(np.uint64)
    e = a >> np.uint64(23)
    normal = np.minimum((a - np.minimum(a, np.uint64(0x38000000)) + (r & np.uint64(0x1FFF)))
                        >> np.uint64(13), np.uint64(0x7C00))
    shift = np.uint64(126) - np.minimum(e, np.uint64(126))
    small = np.where(shift > 31, np.uint64(0),
                     ((a & np.uint64(0x7FFFFF)) | np.uint64(0x800000))
                     + (r & ((np.uint64(1) << np.minimum(shift, np.uint64(63))) - np.uint64(1))))
    small = small >> np.minimum(shift, np.uint64(63))
    out = np.where(e >= 113, normal, small) | sign
    return np.where(a >= 0x7F800000, nearest, out).astype(np.uint16)


def store_half(x, out, key=None, start=0):
    """Store float32 ``x`` into the half array ``out`` (same size), rounded as the kernels do.

    ``key``: the array's stochastic-rounding stream, element ``i`` of ``x``
    being element ``start + i`` of its array (None: to nearest even).
    """
    flat = np.ravel(x)
    bits = None if key is None else random_bits(key, start, flat.size)
    convert = bfloat16_bits if out.dtype.name == "bfloat16" else float16_bits
    out.reshape(-1).view(np.uint16)[...] = convert(flat, bits)


def ema(avg, p, weight, key=None):
    """The weight average's twin: ``avg = lerp(avg, p, weight)`` (torch's
    get_ema_multi_avg_fn with weight = 1 - decay). A half average is computed in
    float32 and stored rounded (``key``: stochastically, from that stream)."""
    if avg.dtype.itemsize == 2:
        store_half(_lerp(avg.astype(np.float32), p.astype(np.float32), weight), avg,
                   None if key is None else stream_key(key, 0))
    else:
        avg[...] = _lerp(avg, p, weight)


def half_step(twin, p, g, buffers, master=None, key=None, **kwargs):
    """One step of ``twin`` on arrays of any storage, as the kernels take it.

    Each half array (float16, bfloat16) is widened to float32, the float32
    twin runs on the widened values (float32 ones in place; with a
    ``master``, on it instead of p), and the results are stored back rounded:
    to nearest even, or stochastically from ``key`` (the parameter's round
    key), p as stream 0 and ``buffers[j]`` as stream 1 + j. p is written as
    the master rounded to nearest even, if there is one.
    """
    def half(a):
        return a is not None and a.dtype.itemsize == 2

    if not half(p) and not any(half(b) for b in buffers):
        twin(p, g, *buffers, **kwargs)
        return
    eps = kwargs.get("eps")
    if isinstance(eps, tuple) and eps[0] is None and half(p) and master is None:
        # Adafactor's eps1=None is the machine epsilon of the parameter's dtype
        # (torch: finfo(grad.dtype).eps), not float32's, which it computes in
        # (a master copy is a float32 parameter: float32's)
        kwargs = {**kwargs, "eps": (float(2.0 ** -(7 if p.dtype.name == "bfloat16" else 10)),
                                    eps[1])}
    wide = [None if b is None else (b.astype(np.float32) if half(b) else b) for b in buffers]
    wide_p = master if master is not None else (p.astype(np.float32) if half(p) else p)
    returned = twin(wide_p, g.astype(np.float32) if half(g) else g, *wide, **kwargs)
    if master is not None:
        store_half(master, p)
    elif half(p):
        store_half(wide_p, p, None if key is None else stream_key(key, 0))
    for j, (b, w) in enumerate(zip(buffers, wide)):
        if half(b):
            store_half(w, b, None if key is None else stream_key(key, j + 1))
    return returned


def sparse_adam(p, g, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                maximize=False):
    """Reference for :func:`fastopt.kernels.sparse_adam` (torch.optim.SparseAdam on the listed rows)."""
    beta1, beta2 = betas
    g = _effective_grad(p, g, 0.0, maximize)
    exp_avg[...] = exp_avg + (g - exp_avg) * (1 - beta1)
    exp_avg_sq[...] = exp_avg_sq + (g * g - exp_avg_sq) * (1 - beta2)
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    p[...] = p + (-step_size) * (exp_avg / (np.sqrt(exp_avg_sq) + eps))


def rowwise_adagrad(p, g, state_sum, *, step=1, lr=1e-2, eps=1e-10, weight_decay=0.0,
                    maximize=False):
    """Reference for :func:`fastopt.kernels.rowwise_adagrad`: one accumulator per row of the
    last axis (``state_sum`` shaped ``p.shape[:-1] + (1,)``), the row's mean of g * g."""
    g = _effective_grad(p, g, weight_decay, maximize)
    width = p.shape[-1] if p.ndim else 1
    if p.size == 0:
        return
    mean = _row_sums(np.square(g.reshape(-1, width).astype(np.float64))) / width
    acc = state_sum.reshape(-1)
    acc[...] = acc + mean.astype(p.dtype)
    multiplier = (p.dtype.type(lr) / (np.sqrt(acc) + p.dtype.type(eps)))[:, None]
    flat = p.reshape(-1, width)
    flat[...] = flat - multiplier * g.reshape(-1, width)


def merge_rows(indices, values):
    """The distinct rows of a sparse-row gradient and their summed value rows.

    Returns ``(rows, merged)``: the rows in increasing order, and per row its
    value rows added in position order (the first as it is, then the next one
    by one), as the kernels' plan adds them (src_c/fastpath/rows.pxi).
    """
    indices = np.asarray(indices).astype(np.int64)
    order = np.argsort(indices, kind="stable")
    rows, first, counts = np.unique(indices[order], return_index=True, return_counts=True)
    merged = values[order[first]].copy()
    for extra in range(1, int(counts.max()) if counts.size else 0):
        more = counts > extra
        merged[more] = merged[more] + values[order[first[more] + extra]]
    return rows, merged


def sparse_rows_step(twin, p, indices, values, buffers, **kwargs):
    """One step of ``twin`` on the rows a sparse-row gradient lists, the others left alone.

    ``buffers``: the rule's state arrays (None: unused), each with p's leading
    axis. Adagrad's twin is its sparse form (torch's: ``g / std`` first).
    """
    if twin is adagrad:
        twin = _adagrad_rows
    rows, merged = merge_rows(indices, values)
    part_p = p[rows]
    parts = [None if b is None else b[rows] for b in buffers]
    returned = twin(part_p, merged, *parts, **kwargs)
    p[rows] = part_p
    for b, part in zip(buffers, parts):
        if b is not None:
            b[rows] = part
    return returned
