"""Rprop: torch.optim.Rprop's rule - resilient backpropagation, sign-based steps.

Per element (g after ``maximize``), with ``(eta-, eta+) = etas`` and
``(lo, hi) = step_sizes``::

    s = g * prev
    step_size = clamp(step_size * (eta+ if s > 0 else eta- if s < 0 else 1), lo, hi)
    g = 0 where s < 0                   (a flipped sign: no move, and no flip next step)
    p = p - sign(g) * step_size
    prev = g

``step_size`` starts at ``lr``, which does nothing else (as in torch). The
sign is torch's: 0 for zero and for NaN, so a NaN product keeps the step
size and a NaN gradient does not move the parameter. The fused loop:
src_c/rules/rprop.pxi.
"""
from .. import _validation as V
from .. import reference
from .._fastpath import RULE_IDS
from .optimizer import PARAMS_DOC, Optimizer
from .rule import Rule, apply

__all__ = ["RULE", "rprop", "Rprop"]


def _consts(h):
    (etaminus, etaplus), (low, high) = h["etas"], h["step_sizes"]
    return dict(etaminus=etaminus, etaplus=etaplus, step_size_min=low, step_size_max=high,
                maximize=h["maximize"])


RULE = Rule(
    name="rprop",
    rule_id=RULE_IDS["rprop"],
    hyper={"etas": V.etas, "step_sizes": V.bounds, "maximize": V.flag},
    buffers=("prev", "step_size"),
    needs=lambda h: (True, True),
    twin=reference.rprop,
    consts=_consts,
    initial={"step_size": "lr"},
    state_hyper={"lr": V.nonnegative},
)


def rprop(p, g, prev, step_size, *, step=1, etas=(0.5, 1.2), step_sizes=(1e-6, 50),
          maximize=False):
    """One Rprop step (torch.optim.Rprop's rule), in place.

    Parameters
    ----------
    p, g : ndarray
        Parameter (updated) and gradient (read only).
    prev : ndarray
        The previous step's gradient, zeroed where its sign flipped (starts
        at 0), updated in place.
    step_size : ndarray
        The per-element step sizes (start at ``lr``), updated in place.
    step : int, default 1
        The step count including this step (the rule does not depend on it;
        torch keeps it in the state).
    etas : (float, float), default (0.5, 1.2)
        ``(etaminus, etaplus)``, with ``0 < etaminus < 1 < etaplus``.
    step_sizes : (float, float), default (1e-6, 50)
        The smallest and largest step size.
    maximize : bool
        As in torch.optim.Rprop.
    """
    apply(RULE, p, g, (prev, step_size), step,
          dict(etas=etas, step_sizes=step_sizes, maximize=maximize))


class Rprop(Optimizer):
    rule = RULE

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *,
                 maximize=False, backend="cython", skip_nonfinite=False,
                 flush_denormals=False, **precision):
        super().__init__(params, dict(lr=lr, etas=etas, step_sizes=step_sizes,
                                      maximize=maximize),
                         backend=backend, skip_nonfinite=skip_nonfinite,
                         flush_denormals=flush_denormals, **precision)


Rprop.__doc__ = f"""Rprop: per-element step sizes adapted to sign changes of the gradient.

    Same rule and defaults as ``torch.optim.Rprop`` (``maximize`` is
    keyword-only there too). Meant for full-batch gradients.

    Parameters
    ----------
    {PARAMS_DOC}
    lr : float, default 1e-2
        The initial step size of every element (it sets the state only).
    etas : (float, float), default (0.5, 1.2)
        ``(etaminus, etaplus)``: the factors after a sign flip and a kept sign.
    step_sizes : (float, float), default (1e-6, 50)
        The bounds of the step sizes.
    maximize : bool, default False

    Examples
    --------
    >>> import numpy as np, fastopt
    >>> w = np.zeros(2)
    >>> opt = fastopt.Rprop([w], lr=0.1)
    >>> opt.step([np.array([1.0, -1.0])])
    >>> w.round(6)
    array([-0.1,  0.1])
    """
