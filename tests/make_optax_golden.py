"""Record golden trajectories from optax for the rules fastopt takes from it (Lion, Lamb).

The twin of ``make_golden.py`` (read its docstring: the same inputs, the
same parameter-dependent gradients, the same checkpoints and file layout)
for the rules torch.optim does not have. ``tests/test_optax_parity.py``
replays the recording through fastopt on every machine, and compares with
optax live where JAX is installed.

How to regenerate
-----------------
Needs JAX and optax (the recording was made with optax 0.2.8, jax 0.10.2, CPU;
``pip install jax jaxlib optax``)::

    python tests/make_optax_golden.py

Each case runs ``optax.<fn>`` jit-compiled on one parameter, in float32 and
in float64 (``jax_enable_x64``). optax has no ``maximize``: a maximizing
case feeds optax the negated gradient, which is what ``maximize`` means.
"""
import sys
from pathlib import Path

import numpy as np

import make_golden as mg

GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "golden_optax.npz"

#: (case id, fastopt class, constructor kwargs), as in make_golden.CASES.
CASES = (
    ("lion-defaults", "Lion", {}),
    ("lion-plain", "Lion", {"lr": 0.01}),
    ("lion-weight_decay", "Lion", {"lr": 0.01, "weight_decay": 0.1}),
    ("lion-betas-maximize", "Lion", {"lr": 0.003, "betas": [0.8, 0.95], "maximize": True}),

    ("lamb-defaults", "Lamb", {}),
    ("lamb-plain", "Lamb", {"lr": 0.01}),
    ("lamb-weight_decay", "Lamb", {"lr": 0.01, "weight_decay": 0.1}),
    ("lamb-betas-eps-maximize", "Lamb",
     {"lr": 0.02, "betas": [0.8, 0.95], "eps": 1e-3, "maximize": True}),
)

#: fastopt class -> (optax function, constructor kwargs -> its arguments)
OPTAX = {
    "Lion": ("lion", lambda kw: dict(learning_rate=kw.get("lr", 1e-4),
                                     b1=kw.get("betas", (0.9, 0.99))[0],
                                     b2=kw.get("betas", (0.9, 0.99))[1],
                                     weight_decay=kw.get("weight_decay", 0.0))),
    "Lamb": ("lamb", lambda kw: dict(learning_rate=kw.get("lr", 1e-3),
                                     b1=kw.get("betas", (0.9, 0.999))[0],
                                     b2=kw.get("betas", (0.9, 0.999))[1],
                                     eps=kw.get("eps", 1e-6),
                                     weight_decay=kw.get("weight_decay", 0.0))),
}


def run_optax(optimizer, kwargs, p0, grads, dtype, record_steps):
    """Run ``optax.<fn>`` (jitted) on one parameter; the twin of make_golden.run_torch."""
    import jax
    import optax

    jax.config.update("jax_enable_x64", True)  # float64 runs stay float64
    import jax.numpy as jnp

    name, arguments = OPTAX[optimizer]
    tx = getattr(optax, name)(**arguments(mg.call_kwargs(kwargs)))

    @jax.jit
    def step(x, state, g):
        updates, state = tx.update(g, state, x)
        return optax.apply_updates(x, updates), state

    x = jnp.asarray(np.asarray(p0, dtype=dtype))
    state = tx.init(x)
    record = set(record_steps)
    out = []
    for t, noise in enumerate(grads, start=1):
        g = mg.gradient(noise, np.asarray(x))
        x, state = step(x, state, jnp.asarray(-g if kwargs.get("maximize") else g))
        if t in record:
            out.append(np.asarray(x).copy())
    return np.stack(out)


def record():
    """Run every case through optax; return the arrays of ``golden_optax.npz``."""
    import jax
    import optax

    return mg.record_cases(mg.meta_header(CASES), run_optax,
                           {"optax_version": optax.__version__, "jax_version": jax.__version__})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else GOLDEN_PATH
    mg.write_npz(path, record())
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(CASES)} cases x "
          f"{len(mg.DTYPES)} dtypes, {mg.STEPS} steps)")


if __name__ == "__main__":
    main()
