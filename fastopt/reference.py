"""Pure-NumPy twins of ``fastopt.kernels``: the textbook formulas.

Same signatures and the same in-place contract as the fast kernels, one
NumPy expression per line of the formulas in docs/update_rules.rst. Slow (every line is a pass
over memory and a temporary) and obviously right: the tests use them as the
oracle and the benchmarks as the baseline. They do not validate their input.

Python-float hyperparameters combine with float32 arrays in float32 (NumPy 2
promotion rules), which is how torch.optim computes a float32 step.
"""

import numpy as np

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "nadam", "adamax", "radam", "adadelta", "rprop",
           "lion", "asgd", "lamb", "adafactor"]


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
