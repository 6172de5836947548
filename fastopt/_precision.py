"""Half precision: the dtypes a parameter and its state are stored in, and how they round.

Vocabulary of this module:

- *element*: a storage type by name, ``"float32"``, ``"float64"``,
  ``"float16"`` or ``"bfloat16"`` (NumPy's ``dtype.name``; bfloat16 is
  ``ml_dtypes.bfloat16``, imported only when such an array or option appears).
- *policy*: an optimizer's :class:`Precision` (``state_dtype``,
  ``master_weights``, ``stochastic_rounding``, ``seed``), checked once here.
- *kind*: the compute layer's storage kind of a (param element, state element)
  pair (``STORAGE_IDS``, generated from src_c/rules/table.py).
- *round key*: the 64-bit key of one parameter's stochastic rounding at one
  step, from (seed, step, parameter index); the compute layer derives each
  array's stream and each element's random bits from it (src_c/storage.pxi).

Every rule computes in float32 on half storage and rounds on store; see
docs/numerics.rst, "Half precision".
"""
from typing import NamedTuple

import numpy as np

# (_fastpath is imported where it is used: it imports _validation, which imports this.)

HALF = ("float16", "bfloat16")
#: what a parameter may be stored as
ELEMENTS = ("float32", "float64") + HALF
#: the state dtypes one may ask for (a float64 parameter keeps float64 state)
STATE_ELEMENTS = ("float32",) + HALF
_MASK = (1 << 64) - 1


_BFLOAT16 = []  # ml_dtypes.bfloat16's dtype, once imported


def bfloat16():
    """ml_dtypes.bfloat16 as a NumPy dtype (ImportError with the fix if it is missing)."""
    if _BFLOAT16:
        return _BFLOAT16[0]
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16 arrays in NumPy are ml_dtypes.bfloat16: "
                          "pip install ml_dtypes (or fastopt[half])") from None
    from . import _fastpath
    dtype = np.dtype(ml_dtypes.bfloat16)
    _fastpath.register_bfloat16(dtype.num)  # the fast path knows its arrays from now on
    _BFLOAT16.append(dtype)
    return dtype


# dtype -> element name, for the dtypes seen so far (a step asks per array)
_ELEMENT_OF = {np.dtype(name): name for name in ("float16", "float32", "float64")}


def element(dtype):
    """The element name of a NumPy dtype fastopt can step, else None."""
    try:
        return _ELEMENT_OF[dtype]
    except (KeyError, TypeError):
        pass
    dtype = np.dtype(dtype)
    if dtype in _ELEMENT_OF:
        return _ELEMENT_OF[dtype]
    if dtype.name == "bfloat16" and dtype.itemsize == 2 and type(dtype).__module__ != "numpy":
        bfloat16()  # (registers its type number with the fast path)
        _ELEMENT_OF[dtype] = "bfloat16"
        return "bfloat16"
    return None


def numpy_dtype(name):
    """The NumPy dtype of an element name."""
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def cast(value, dtype):
    """A new C-contiguous copy of ``value`` as ``dtype`` (rounded to nearest even)."""
    return np.array(value, dtype=dtype, order="C", copy=True)


def _state_element(value):
    if value is None:
        return None
    name = value if isinstance(value, str) else None
    if name is None:
        try:
            name = element(value) or str(value)
        except TypeError:
            name = str(getattr(value, "__name__", value))
    name = name.replace("torch.", "")
    if name not in STATE_ELEMENTS:
        raise ValueError(f"state_dtype must be None (the parameter's dtype), 'float32', "
                         f"'bfloat16' or 'float16', got {value!r}")
    return name


class Precision(NamedTuple):
    """An optimizer's half-precision options, validated (see :func:`check`)."""

    #: element name of every state buffer, None: each parameter's own dtype
    state_dtype: str = None
    #: a float32 master copy of each half parameter, kept in its state
    master_weights: bool = False
    #: round to half types stochastically (else to nearest even)
    stochastic_rounding: bool = False
    seed: int = 0

    @property
    def plain(self):
        """True for the default: state like each parameter, rounding to nearest."""
        return self.state_dtype is None and not self.master_weights and not self.stochastic_rounding

    def state_element(self, p_element):
        """The element the state of a ``p_element`` parameter is stored in."""
        if p_element == "float64" or self.state_dtype is None:
            return "float32" if self.master_weights and p_element in HALF else p_element
        return self.state_dtype

    def has_master(self, p_element):
        return self.master_weights and p_element in HALF

    def kind(self, p_element):
        """The compute layer's storage kind of a ``p_element`` parameter."""
        from . import _fastpath
        return _fastpath.STORAGE_IDS[(p_element, self.state_element(p_element))]

    def rounds_stochastically(self, p_element):
        """Whether a step of such a parameter rounds anything to a half type stochastically."""
        return self.stochastic_rounding and (
            (p_element in HALF and not self.has_master(p_element))
            or self.state_element(p_element) in HALF)

    def round_key(self, step, index):
        """The round key of parameter ``index`` at step ``step`` (None: no stochastic rounding)."""
        if not self.stochastic_rounding:
            return None
        return _splitmix64(_splitmix64(_splitmix64(self.seed) ^ step) ^ index)

    def check_param(self, label, p_element, is_complex=False):
        """Refuse a parameter this policy cannot apply to (``p_element``: its real view's)."""
        if p_element == "float64" and self.state_dtype not in (None,):
            raise ValueError(f"{label} is float64, whose state stays float64: state_dtype="
                             f"{self.state_dtype!r} applies to float32 and half parameters")
        if is_complex and self.state_dtype not in (None, p_element):
            # (its state is complex like it, stepped as the real view: no half type has one)
            raise ValueError(f"{label} is complex, whose state stays its own dtype: "
                             f"state_dtype={self.state_dtype!r} applies to real parameters")

    def options(self):
        """The constructor keywords that make this policy (for checkpoints)."""
        return dict(self._asdict())

    def policy(self):
        """This policy as the fast path applies it (a ``_fastpath.Policy``), None
        for the default; made once per distinct policy."""
        if self.plain:
            return None
        made = _POLICIES.get(self)
        if made is None:
            from . import _fastpath
            rows = [None] * len(_fastpath.STORAGE_IDS)
            for name in ELEMENTS:
                try:
                    state_type = numpy_dtype(self.state_element(name)).num
                except ImportError:
                    continue  # (no ml_dtypes: no bfloat16 array can reach a step)
                rows[_fastpath.STORAGE_IDS[(name, name)]] = (
                    self.kind(name), state_type, self.has_master(name),
                    self.rounds_stochastically(name))
            made = _POLICIES[self] = _fastpath.Policy(rows, self.seed, self.stochastic_rounding)
        return made


_POLICIES = {}  # Precision -> its _fastpath.Policy


def _splitmix64(x):
    # Sebastiano Vigna's SplitMix64 finaliser: a 64-bit mix of a counter.
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def check(state_dtype=None, master_weights=False, stochastic_rounding=False, seed=0):
    """The :class:`Precision` of these constructor options (TypeError/ValueError if invalid)."""
    for name, value in (("master_weights", master_weights),
                        ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return Precision(_state_element(state_dtype), bool(master_weights),
                     bool(stochastic_rounding), int(seed))


#: the shared docstring of the options (fastopt.optim.optimizer.PARAMS_DOC)
DOC = """state_dtype : {None, "float32", "bfloat16", "float16"} or dtype, default None
        The dtype of the state buffers. None: each parameter's own (torch's
        fused kernels do the same for half parameters); "bfloat16" on float32
        parameters moves 20 bytes per Adam element instead of 28. Half state
        is computed in float32 and stored rounded. float64 parameters keep
        float64 state.
    master_weights : bool, default False
        Keep a float32 copy of each float16/bfloat16 parameter in its state
        (``state[i]["master_param"]``), updated exactly as a float32
        parameter would be; the parameter is written as the master rounded
        to nearest even in the same pass. State is then float32 unless
        ``state_dtype`` says otherwise. No effect on float32/float64 ones.
    stochastic_rounding : bool, default False
        Round every store to a half type (a parameter without master, half
        state) stochastically: unbiased, so updates far below half an ulp
        still move the parameter on average. Every rule then counts steps in
        ``state[i]["step"]``.
    seed : int, default 0
        The stochastic rounding's seed: its random bits are a function of
        (seed, step, parameter index, element index) only, the same for
        every thread count and SIMD level, and across a checkpoint resume."""
