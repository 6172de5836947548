"""The test suite's one table of fastopt's update rules, written out by hand.

Every test and bench module that sweeps the rules takes them from here (in
the spirit of bottleneck's ``tests/util.py``): the rules, their optimizer
classes, the kernel and torch.optim names, the constructor defaults, the
state each option set keeps, and the option sets worth sweeping. Nothing is
read from fastopt: the names and defaults are written out literally, so a
wrong registry in fastopt fails the tests instead of steering them.
``tests/test_spec.py`` checks this table against the code both ways (a rule
or class in one and not in the other, a default that differs, a buffer used
under other options) and against torch.optim where torch is installed.

Adding a rule is one :class:`Rule` entry in :data:`RULES`: its options,
buffers, classes, and the option sets and cases its sweeps should run.

Import it as ``import spec``: pytest puts ``tests/`` on ``sys.path`` for the
test modules (also for ``python -m pytest /path/to/repo/tests`` from another
folder); ``bench/`` modules insert ``tests/`` themselves.

A sweep case is an ``(id, what, options)`` tuple - ``what`` a rule name for
:func:`kernel_cases`, an optimizer class for :func:`optimizer_cases` - so
that ``@pytest.mark.parametrize("case", spec.optimizer_cases(), ids=spec.case_id)``
names each test after its case.
"""
import struct
from types import MappingProxyType
from typing import Callable, NamedTuple

NOTHING = MappingProxyType({})


def always(options):
    """A buffer every option set uses."""
    return True


#: A buffer's layout -> its shape for a parameter of ``shape``, or None where
#: such a parameter keeps no such buffer (torch.optim.Adafactor's factors)
LAYOUTS = MappingProxyType({
    "like": lambda shape: tuple(shape),
    "rows": lambda shape: tuple(shape[:-1]) + (1,) if len(shape) >= 2 else None,
    "cols": lambda shape: tuple(shape[:-2]) + (1, shape[-1]) if len(shape) >= 2 else None,
    "vector": lambda shape: tuple(shape) if len(shape) < 2 else None,
    "row_sums": lambda shape: tuple(shape[:-1]) + (1,) if len(shape) >= 1 else tuple(shape),
})


class Buffer(NamedTuple):
    """One state buffer of a rule (an array shaped like its parameter, unless ``layout``)."""

    #: the state key, torch.optim's name (fastopt's ``opt.state[i]`` uses it too)
    name: str
    #: the parameter of fastopt.kernels.<kernel> (and fastopt.reference) taking
    #: it, where that is not ``name``: see :attr:`param`
    arg: str = None
    #: full options -> whether they use it (required then, refused otherwise)
    used: Callable = always
    #: what it holds, for realistic starting values: "squares" (sums or averages
    #: of g * g: never negative), "small" (a mean of g whose square is subtracted
    #: from a "squares" buffer under a square root: |x| < 0.05 keeps that >= 0),
    #: or "signed" (anything)
    values: str = "signed"
    #: the option the optimizers' buffer starts at; None: it starts at 0
    start: str = None
    #: a "squares" buffer that a zero gradient still moves (Adamax's exp_inf
    #: becomes max(beta2 * u, |0| + eps) = eps), unlike a sum of squares
    moves_at_zero: bool = False
    #: its shape, a key of LAYOUTS: "like" its parameter; Adafactor's "rows"
    #: (..., R, 1) and "cols" (..., 1, C) of a parameter of two or more
    #: dimensions, and its "vector", kept only for fewer
    layout: str = "like"

    def shape_for(self, shape):
        """Its shape for a parameter of ``shape``; None: such a parameter keeps none."""
        return LAYOUTS[self.layout](shape)

    @property
    def param(self):
        """The kernel's parameter name for this buffer."""
        return self.arg or self.name


class Class(NamedTuple):
    """One optimizer class of a rule: fastopt.<name> and fastopt.torch.<name>."""

    name: str
    #: its torch.optim counterpart, torch.optim.<torch>; None: torch has none
    #: (fastopt.torch.<name> is then a torch-style optimizer of fastopt's own)
    torch: str
    #: the constructor's options, in signature order, with their defaults
    #: (torch.optim's); fastopt's own keyword-only ones (COMMON_KEYWORDS) aside
    defaults: dict
    #: the options among ``defaults`` that are keyword-only (as in torch.optim)
    keyword_only: tuple = ()
    #: rule options the class sets itself and does not take (AdamW's
    #: decoupled_weight_decay); its param groups hold them
    fixed: dict = NOTHING
    #: constructor kwargs worth sweeping: optimizer_cases()
    cases: tuple = ()
    #: case id -> kwargs: how most runs use it (what the benchmarks time);
    #: None: its defaults, named after the class in lower case
    typical: dict = None
    #: a run of several param groups against torch.optim (test_torch_parity):
    #: (constructor kwargs, the second group's own options, hyperparameter
    #: changes [(before step, group, key, value)]). Only values torch can
    #: change mid-run: options that add state (centered, amsgrad, RMSprop's
    #: momentum from 0) fail in torch when switched on later.
    scenario: tuple = None
    #: the optax function whose rule it follows (optax.<optax>), for the rules
    #: torch.optim lacks; their parity is against optax (tests/test_optax_parity.py)
    optax: str = None
    #: True: its torch.optim counterpart takes sparse gradients only
    #: (SparseAdam), so the dense sweeps against torch leave it out and
    #: tests/test_sparse.py holds it to torch on sparse ones
    sparse_only: bool = False


class Rule(NamedTuple):
    """One update rule: a kernel, its state, its optimizer classes, its sweeps."""

    #: the rule's name (fastopt's Rule.name)
    name: str
    #: fastopt.kernels.<kernel> and fastopt.reference.<kernel>
    kernel: str
    #: the kernel's per-step argument: "step" (the count t >= 1, kept in
    #: state["step"]) or "first_step" (a flag: SGD keeps no count)
    step_arg: str
    #: the kernel's options, in its signature order -> how they are validated:
    #: "nonneg" (>= 0), "positive" (> 0 and finite), "finite", "unit" ([0, 1)),
    #: "closed_unit" ([0, 1]), "betas" (a pair in [0, 1)), "etas" (a pair
    #: 0 < etaminus < 1 < etaplus), "bounds" (a pair 0 <= min <= max), "flag" (a bool)
    options: dict
    #: the state buffers, in kernel argument order
    buffers: tuple
    #: the optimizer classes; the first takes every option of the rule, and
    #: its defaults are the kernel's
    classes: tuple
    #: options only the constructors take (they shape the state) -> validation
    class_options: dict = NOTHING
    #: per-parameter scalars the optimizers keep in the state besides the
    #: buffers -> their value before the first step. "step" is the count the
    #: kernel gets as ``step``; the kernel takes each other one (NAdam's
    #: mu_product) as a keyword argument and returns its new value; a start
    #: written as an option's name is that option's value in float32 (ASGD's eta)
    scalars: dict = MappingProxyType({"step": 0})
    #: full options -> whether they go together (beyond each option's own check)
    valid: Callable = always
    #: what every kernel-level sweep of the rule starts from, over the defaults:
    #: a learning rate large enough that a few steps move the parameters
    sweep: dict = NOTHING
    #: kernel options worth sweeping (over ``sweep``): kernel_cases()
    option_sets: tuple = ()
    #: True: a step reads each parameter array as a whole (Lamb's norms), so
    #: one array holding several parameters is not the same as those parameters
    whole_arrays: bool = False
    #: parameter shapes its shaped sweeps run (a rule whose buffers have layouts)
    shapes: tuple = ()
    #: False: complex parameters are refused, as torch.optim.Adafactor refuses
    #: them (a real view would change the shape its rule reads)
    complex_ok: bool = True

    @property
    def shaped(self):
        """Whether any buffer's shape is not its parameter's (Adafactor)."""
        return any(b.layout != "like" for b in self.buffers)


RULES = (
    Rule(
        name="sgd",
        kernel="sgd",
        step_arg="first_step",
        options={"lr": "nonneg", "momentum": "nonneg", "dampening": "finite",
                 "weight_decay": "nonneg", "nesterov": "flag", "maximize": "flag"},
        buffers=(Buffer("momentum_buffer", used=lambda o: o["momentum"] != 0),),
        scalars={},
        valid=lambda o: not o["nesterov"] or (o["momentum"] > 0 and o["dampening"] == 0),
        classes=(
            Class("SGD", torch="SGD",
                  defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                nesterov=False, maximize=False),
                  cases=({"lr": 0.1},
                         {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
                         {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3,
                          "maximize": True}),
                  typical={"sgd": {"lr": 0.01}, "sgd-momentum": {"lr": 0.01, "momentum": 0.9}},
                  scenario=(
                      {"lr": 0.05, "momentum": 0.9, "nesterov": True},
                      {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.01},
                      [(11, 0, "lr", 0.02),
                       (21, 1, "momentum", 0.6),  # the buffer starts here, as a copy of g
                       (21, 1, "dampening", 0.2),
                       (31, 0, "momentum", 0.5),
                       (31, 1, "maximize", True)])),
        ),
        sweep={"lr": 0.1},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"momentum": 0.9},
            {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
            {"momentum": 0.9, "nesterov": True},
            {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1, "maximize": True},
            {"maximize": True},
        ),
    ),
    Rule(
        name="adagrad",
        kernel="adagrad",
        step_arg="step",
        options={"lr": "nonneg", "lr_decay": "nonneg", "weight_decay": "nonneg",
                 "eps": "positive", "maximize": "flag"},
        buffers=(Buffer("sum", arg="state_sum", values="squares",
                        start="initial_accumulator_value"),),
        class_options={"initial_accumulator_value": "nonneg"},
        classes=(
            Class("Adagrad", torch="Adagrad",
                  defaults=dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                                initial_accumulator_value=0.0, eps=1e-10, maximize=False),
                  cases=({"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01,
                          "initial_accumulator_value": 0.1},
                         {"lr_decay": 0.01, "maximize": True}),
                  scenario=(
                      # initial_accumulator_value only in the defaults: torch ignores a group's
                      # own value (see test_live_adagrad_group_initial_accumulator_value).
                      {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
                      {"lr": 0.05, "weight_decay": 0.01},
                      [(11, 0, "lr", 0.05),
                       (21, 1, "lr_decay", 0.05),
                       (21, 1, "eps", 1e-6),
                       (31, 0, "weight_decay", 0.02),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.1},
        option_sets=(
            {},
            {"lr_decay": 0.1, "weight_decay": 0.05},
            {"maximize": True, "eps": 1e-3},
        ),
    ),
    Rule(
        name="rmsprop",
        kernel="rmsprop",
        step_arg="step",
        options={"lr": "nonneg", "alpha": "unit", "eps": "positive", "weight_decay": "nonneg",
                 "momentum": "nonneg", "centered": "flag", "maximize": "flag"},
        buffers=(Buffer("square_avg", values="squares"),
                 Buffer("grad_avg", used=lambda o: o["centered"], values="small"),
                 Buffer("momentum_buffer", used=lambda o: o["momentum"] > 0)),
        classes=(
            Class("RMSprop", torch="RMSprop",
                  defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                                centered=False, maximize=False),
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "momentum": 0.9},
                         {"lr": 0.01, "centered": True, "momentum": 0.5, "weight_decay": 0.1,
                          "maximize": True}),
                  scenario=(
                      {"lr": 0.01, "centered": True, "momentum": 0.5},
                      {"lr": 0.003, "alpha": 0.9, "weight_decay": 0.01},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "alpha", 0.95),
                       (21, 1, "weight_decay", 0.0),
                       (31, 0, "momentum", 0.8),
                       (31, 0, "eps", 1e-6),
                       (31, 1, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"centered": True},
            {"momentum": 0.9},
            {"centered": True, "momentum": 0.9},
            {"weight_decay": 0.1, "maximize": True, "alpha": 0.3},
            {"centered": True, "momentum": 0.5, "weight_decay": 0.1},
        ),
    ),
    Rule(
        name="adam",
        kernel="adam",
        step_arg="step",
        options={"lr": "nonneg", "betas": "betas", "eps": "positive", "weight_decay": "nonneg",
                 "amsgrad": "flag", "maximize": "flag", "decoupled_weight_decay": "flag"},
        buffers=(Buffer("exp_avg"),
                 Buffer("exp_avg_sq", values="squares"),
                 Buffer("max_exp_avg_sq", used=lambda o: o["amsgrad"],
                        values="squares")),
        classes=(
            Class("Adam", torch="Adam",
                  defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                amsgrad=False, maximize=False, decoupled_weight_decay=False),
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
                         {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1,
                          "betas": (0.3, 0.6)}),
                  scenario=(
                      {"lr": 0.01, "amsgrad": True},
                      {"lr": 0.003, "betas": (0.8, 0.99), "weight_decay": 0.01},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "betas", (0.9, 0.999)),
                       (21, 1, "weight_decay", 0.05),
                       (31, 0, "eps", 1e-6),
                       (31, 0, "maximize", True)])),
            Class("AdamW", torch="AdamW",
                  defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                amsgrad=False, maximize=False),
                  fixed={"decoupled_weight_decay": True},
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "amsgrad": True, "weight_decay": 0.5}),
                  scenario=(
                      {"lr": 0.01},
                      {"lr": 0.003, "amsgrad": True, "weight_decay": 0.1},
                      [(11, 0, "lr", 0.005),
                       (21, 0, "betas", (0.8, 0.99)),
                       (21, 1, "weight_decay", 0.5),
                       (31, 1, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"amsgrad": True},
            {"amsgrad": True, "weight_decay": 0.1, "maximize": True},
            {"decoupled_weight_decay": True, "weight_decay": 0.1},
            {"decoupled_weight_decay": True, "weight_decay": 0.1, "amsgrad": True},
            {"betas": (0.3, 0.6)},  # 1 - beta1 >= 0.5: the other form of lerp
        ),
    ),
    Rule(
        name="nadam",
        kernel="nadam",
        step_arg="step",
        options={"lr": "nonneg", "betas": "betas", "eps": "positive", "weight_decay": "nonneg",
                 "momentum_decay": "nonneg", "decoupled_weight_decay": "flag",
                 "maximize": "flag"},
        buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq", values="squares")),
        scalars={"step": 0, "mu_product": 1.0},
        classes=(
            Class("NAdam", torch="NAdam",
                  defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                momentum_decay=4e-3, decoupled_weight_decay=False,
                                maximize=False),
                  keyword_only=("maximize",),
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
                         {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1,
                          "momentum_decay": 0.01, "betas": (0.8, 0.9)}),
                  scenario=(
                      {"lr": 0.01, "momentum_decay": 0.01},
                      {"lr": 0.003, "betas": (0.8, 0.99), "weight_decay": 0.01},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "momentum_decay", 0.002),
                       (21, 1, "decoupled_weight_decay", True),
                       (31, 0, "eps", 1e-6),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"decoupled_weight_decay": True, "weight_decay": 0.1},
            {"maximize": True, "momentum_decay": 0.01, "betas": (0.8, 0.9), "eps": 1e-3},
            {"betas": (0.3, 0.6)},  # 1 - beta1 >= 0.5: the other form of lerp
        ),
    ),
    Rule(
        name="adamax",
        kernel="adamax",
        step_arg="step",
        options={"lr": "nonneg", "betas": "betas", "eps": "nonneg", "weight_decay": "nonneg",
                 "maximize": "flag"},
        buffers=(Buffer("exp_avg"), Buffer("exp_inf", values="squares", moves_at_zero=True)),
        classes=(
            Class("Adamax", torch="Adamax",
                  defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                maximize=False),
                  keyword_only=("maximize",),
                  # (weight decay: the kernel sweeps and the scenario's second group;
                  # with it, no state stays in the subnormal range test_denormals needs)
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "maximize": True},
                         {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3}),
                  scenario=(
                      {"lr": 0.01},
                      {"lr": 0.003, "betas": (0.8, 0.99), "weight_decay": 0.01},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "betas", (0.85, 0.95)),
                       (31, 0, "eps", 1e-6),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"maximize": True, "betas": (0.8, 0.9), "eps": 1e-3},
            {"betas": (0.3, 0.6)},  # 1 - beta1 >= 0.5: the other form of lerp
            {"eps": 0.0},           # torch allows it: |g| alone bounds the norm
        ),
    ),
    Rule(
        name="radam",
        kernel="radam",
        step_arg="step",
        options={"lr": "nonneg", "betas": "betas", "eps": "nonneg", "weight_decay": "nonneg",
                 "decoupled_weight_decay": "flag", "maximize": "flag"},
        buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq", values="squares")),
        classes=(
            Class("RAdam", torch="RAdam",
                  defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                decoupled_weight_decay=False, maximize=False),
                  keyword_only=("maximize",),
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
                         {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1,
                          "betas": (0.8, 0.9)}),
                  scenario=(
                      {"lr": 0.01},
                      {"lr": 0.003, "betas": (0.8, 0.99), "weight_decay": 0.01},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "decoupled_weight_decay", True),
                       (21, 0, "betas", (0.85, 0.95)),
                       (31, 0, "eps", 1e-6),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"decoupled_weight_decay": True, "weight_decay": 0.1},
            {"maximize": True, "betas": (0.8, 0.9), "eps": 1e-3},
            {"betas": (0.3, 0.6)},  # 1 - beta1 >= 0.5: the other form of lerp
            {"betas": (0.9, 0.5)},  # rho_inf = 3: never rectified
        ),
    ),
    Rule(
        name="adadelta",
        kernel="adadelta",
        step_arg="step",
        options={"lr": "nonneg", "rho": "closed_unit", "eps": "nonneg",
                 "weight_decay": "nonneg", "maximize": "flag"},
        buffers=(Buffer("square_avg", values="squares"), Buffer("acc_delta", values="squares")),
        classes=(
            Class("Adadelta", torch="Adadelta",
                  defaults=dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
                  keyword_only=("maximize",),
                  cases=({},
                         {"lr": 0.5, "maximize": True},
                         {"lr": 2.0, "rho": 0.5, "eps": 1e-4}),
                  scenario=(
                      {"lr": 1.0},
                      {"lr": 0.5, "rho": 0.8, "weight_decay": 0.01},
                      [(11, 0, "lr", 0.5),
                       (21, 1, "rho", 0.95),
                       (31, 0, "eps", 1e-4),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 1.0},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"maximize": True, "rho": 0.5, "eps": 1e-3},
            {"rho": 1.0},           # torch allows it: the averages never move
            {"rho": 0.0, "eps": 1e-8},
        ),
    ),
    Rule(
        name="rprop",
        kernel="rprop",
        step_arg="step",
        options={"etas": "etas", "step_sizes": "bounds", "maximize": "flag"},
        buffers=(Buffer("prev"), Buffer("step_size", values="squares", start="lr")),
        class_options={"lr": "nonneg"},
        classes=(
            Class("Rprop", torch="Rprop",
                  defaults=dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), maximize=False),
                  keyword_only=("maximize",),
                  cases=({},
                         {"lr": 0.05, "maximize": True},
                         {"lr": 0.02, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.1)}),
                  scenario=(
                      {"lr": 0.01},
                      {"lr": 0.003, "etas": (0.4, 1.3)},
                      [(11, 0, "etas", (0.6, 1.1)),
                       (21, 1, "step_sizes", (1e-4, 0.05)),
                       (31, 0, "maximize", True)])),
        ),
        option_sets=(
            {},
            {"maximize": True, "etas": (0.3, 1.5)},
            {"step_sizes": (1e-3, 0.02)},
            {"step_sizes": (0.0, float("inf"))},
        ),
    ),
    Rule(
        name="asgd",
        kernel="asgd",
        step_arg="step",
        options={"lr": "nonneg", "lambd": "nonneg", "alpha": "finite", "t0": "finite",
                 "weight_decay": "nonneg", "maximize": "flag"},
        buffers=(Buffer("ax"),),
        scalars={"step": 0, "eta": "lr", "mu": 1.0},
        classes=(
            Class("ASGD", torch="ASGD",
                  defaults=dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                                maximize=False),
                  cases=({},
                         {"lr": 0.05, "weight_decay": 0.1, "maximize": True},
                         {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 3}),
                  scenario=(
                      {"lr": 0.01, "t0": 5},
                      {"lr": 0.003, "lambd": 0.01, "weight_decay": 0.01},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "alpha", 0.6),
                       (21, 1, "t0", 10),
                       (31, 0, "lambd", 0.001),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.05},
        option_sets=(
            {},
            {"weight_decay": 0.1, "t0": 0.0},
            {"maximize": True, "lambd": 0.05, "alpha": 1.0},
            {"t0": -5.0, "lambd": 0.0},   # averaging from the first step
        ),
    ),
    Rule(
        name="lion",
        kernel="lion",
        step_arg="step",
        options={"lr": "nonneg", "betas": "betas", "weight_decay": "nonneg", "maximize": "flag"},
        buffers=(Buffer("exp_avg"),),
        classes=(
            Class("Lion", torch=None, optax="lion",
                  defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
                  keyword_only=("maximize",),
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
                         {"lr": 0.003, "betas": (0.8, 0.95)}),
                  scenario=(
                      {"lr": 0.01},
                      {"lr": 0.003, "betas": (0.8, 0.95), "weight_decay": 0.01},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "betas", (0.85, 0.9)),
                       (31, 0, "weight_decay", 0.1),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"maximize": True, "betas": (0.5, 0.6)},
            {"betas": (0.0, 0.0)},
        ),
    ),
    Rule(
        name="lamb",
        kernel="lamb",
        step_arg="step",
        whole_arrays=True,
        options={"lr": "nonneg", "betas": "betas", "eps": "nonneg", "weight_decay": "nonneg",
                 "maximize": "flag"},
        buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq", values="squares")),
        classes=(
            Class("Lamb", torch=None, optax="lamb",
                  defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                                maximize=False),
                  keyword_only=("maximize",),
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
                         {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3}),
                  scenario=(
                      {"lr": 0.01},
                      {"lr": 0.003, "betas": (0.8, 0.99), "weight_decay": 0.01},
                      [(5, 0, "lr", 0.005),
                       (7, 1, "betas", (0.85, 0.95)),
                       (9, 0, "eps", 1e-3),
                       (9, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"weight_decay": 0.1},
            {"maximize": True, "betas": (0.8, 0.9), "eps": 1e-3},
            {"eps": 0.0},
        ),
    ),
    Rule(
        name="adafactor",
        kernel="adafactor",
        step_arg="step",
        whole_arrays=True,
        options={"lr": "nonneg", "beta2_decay": "nonpos", "eps": "eps_pair",
                 "d": "at_least_one", "weight_decay": "nonneg", "maximize": "flag"},
        buffers=(Buffer("row_var", values="squares", layout="rows"),
                 Buffer("col_var", values="squares", layout="cols"),
                 Buffer("variance", values="squares", layout="vector")),
        classes=(
            Class("Adafactor", torch="Adafactor",
                  defaults=dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                                weight_decay=0.0, maximize=False),
                  keyword_only=("maximize",),
                  cases=({},
                         {"lr": 0.05, "weight_decay": 0.1, "maximize": True},
                         {"lr": 0.02, "beta2_decay": -0.5, "eps": (1e-3, 1e-2), "d": 2.0}),
                  scenario=(
                      {"lr": 0.02},
                      {"lr": 0.005, "beta2_decay": -0.6, "weight_decay": 0.01},
                      [(11, 0, "lr", 0.01),
                       (21, 1, "d", 1.5),
                       (21, 1, "eps", (1e-4, 1e-2)),
                       (31, 0, "weight_decay", 0.1),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.05},
        option_sets=(
            {},
            {"weight_decay": 0.1, "maximize": True},
            {"beta2_decay": -0.5, "eps": (1e-3, 1e-2), "d": 2.0},
            {"beta2_decay": 0.0, "eps": (0.0, 0.0)},
        ),
        shapes=((1, 1), (3, 5), (17, 33), (2, 3, 4, 5), (1, 70000), (70000, 1), (300, 301)),
        complex_ok=False,
    ),
    Rule(
        name="sparse_adam",
        kernel="sparse_adam",
        step_arg="step",
        options={"lr": "nonneg", "betas": "betas", "eps": "positive", "maximize": "flag"},
        buffers=(Buffer("exp_avg"), Buffer("exp_avg_sq", values="squares")),
        classes=(
            Class("SparseAdam", torch="SparseAdam", sparse_only=True,
                  defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False),
                  cases=({"lr": 0.01},
                         {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "maximize": True}),
                  scenario=(
                      {"lr": 0.01},
                      {"lr": 0.003, "betas": (0.8, 0.99)},
                      [(11, 0, "lr", 0.005),
                       (21, 1, "eps", 1e-6),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.01},
        option_sets=(
            {},
            {"maximize": True, "betas": (0.5, 0.6), "eps": 1e-3},
        ),
    ),
    Rule(
        name="rowwise_adagrad",
        kernel="rowwise_adagrad",
        step_arg="step",
        options={"lr": "nonneg", "eps": "positive", "weight_decay": "nonneg", "maximize": "flag"},
        buffers=(Buffer("sum", arg="state_sum", values="squares",
                        start="initial_accumulator_value", layout="row_sums"),),
        class_options={"initial_accumulator_value": "nonneg"},
        classes=(
            Class("RowWiseAdagrad", torch=None,
                  defaults=dict(lr=1e-2, eps=1e-10, weight_decay=0.0,
                                initial_accumulator_value=0.0, maximize=False),
                  cases=({"lr": 0.1},
                         {"lr": 0.1, "weight_decay": 0.01, "initial_accumulator_value": 0.1,
                          "maximize": True}),
                  scenario=(
                      {"lr": 0.1},
                      {"lr": 0.05, "weight_decay": 0.01},
                      [(11, 0, "lr", 0.05),
                       (21, 1, "eps", 1e-6),
                       (31, 0, "maximize", True)])),
        ),
        sweep={"lr": 0.1},
        option_sets=(
            {},
            {"weight_decay": 0.05, "maximize": True, "eps": 1e-3},
        ),
        shapes=((1,), (7,), (3, 5), (17, 33), (2, 3, 4), (1, 70000), (70000, 1)),
        whole_arrays=True,
        complex_ok=False,
    ),
)

#: the keyword-only constructor options every class takes (fastopt's own)
COMMON_KEYWORDS = {"backend": "cython", "skip_nonfinite": False, "flush_denormals": False}
#: the half-precision keywords every optimizer takes, NumPy's and fastopt.torch's
PRECISION_KEYWORDS = {"state_dtype": None, "master_weights": False,
                      "stochastic_rounding": False, "seed": 0}
#: the step guards every optimizer takes (fastopt/optim/guards.py; tests/test_guards.py)
GUARD_KEYWORDS = {"max_grad_norm": None, "ema_decay": None}
#: fastopt's keyword-only options of every class, NumPy's and fastopt.torch's, in order
OPTION_KEYWORDS = {**PRECISION_KEYWORDS, **GUARD_KEYWORDS}


# ------------------------------------------------------------------ look-ups

def rules():
    """Every rule, in table order."""
    return RULES


def rule_names():
    return [r.name for r in RULES]


def classes():
    """Every optimizer class entry, in table order."""
    return [c for r in RULES for c in r.classes]


def class_names():
    return [c.name for c in classes()]


def torch_class_names():
    """The classes with a torch.optim counterpart that takes dense gradients."""
    return [c.name for c in classes() if c.torch and not c.sparse_only]


def optax_class_names():
    """The classes whose rule is optax's (no torch.optim counterpart)."""
    return [c.name for c in classes() if c.optax]


def rule(name):
    """The rule entry for a rule name, a class name, a Rule, a Class or an optimizer class."""
    return _lookup(name)[0]


def find_class(name):
    """The class entry for a class name, a Class or an optimizer class (fastopt's, torch's)."""
    found = _lookup(name)[1]
    if found is None:
        raise KeyError(f"{name!r} names a rule, not an optimizer class")
    return found


def _lookup(name):
    """``(Rule, Class or None)`` for any of the names rule() takes."""
    if isinstance(name, Rule):
        return name, None
    if isinstance(name, Class):
        name = name.name
    name = getattr(name, "__name__", name)
    for r in RULES:
        if r.name == name:
            return r, None
        for c in r.classes:
            if c.name == name:
                return r, c
    raise KeyError(f"{name!r} is no rule or optimizer class of tests/spec.py")


# ---------------------------------------------------------------- defaults

def kernel_defaults(name):
    """The kernel's keyword defaults: its first class's defaults for the rule's options."""
    r = rule(name)
    first = r.classes[0]
    return {k: {**first.defaults, **first.fixed}[k] for k in r.options}


def defaults(class_name):
    """The constructor's options and defaults, keyword-only ones (but fastopt's own) included."""
    return dict(find_class(class_name).defaults)


def group_defaults(class_name):
    """What a param group of the class holds by default: its defaults and fixed options."""
    c = find_class(class_name)
    return {**c.defaults, **c.fixed}


def option_kinds(class_name):
    """Constructor option -> validation kind, in signature order."""
    r, c = _lookup(class_name)
    kinds = {**r.options, **r.class_options}
    return {k: kinds[k] for k in c.defaults}


def full_options(name, options=NOTHING):
    """``options`` over the defaults: a rule's kernel's, or a class's param group's."""
    r, c = _lookup(name)
    base = kernel_defaults(r) if c is None else group_defaults(c)
    return {**base, **options}


# ------------------------------------------------------------------- state

def needs(name, options=NOTHING, shape=None):
    """Per buffer (kernel order), whether ``options`` use it (``name``: as for rule()).

    ``shape``: also whether a parameter of that shape keeps it (Adafactor's
    factors for two or more dimensions, its variance for fewer).
    """
    full = full_options(name, options)
    return tuple(bool(b.used(full)) and (shape is None or b.shape_for(shape) is not None)
                 for b in rule(name).buffers)


def buffers_for(name, options=NOTHING, shape=None):
    """The names of the buffers ``options`` use (for a parameter of ``shape``), in kernel order."""
    return tuple(b.name for b, n in zip(rule(name).buffers, needs(name, options, shape)) if n)


def state_keys(name, options=NOTHING, shape=None):
    """The keys of a parameter's state (of ``shape``) after a step with ``options``."""
    return set(rule(name).scalars) | set(buffers_for(name, options, shape))


def carried(name, options=NOTHING):
    """The scalars a kernel call takes and returns anew (NAdam's mu_product) -> start value.

    A start written as an option's name (ASGD's eta starts at lr) is that
    option's value under ``options`` (over the defaults), rounded to float32
    as torch stores it.
    """
    out = {}
    for k, v in rule(name).scalars.items():
        if k != "step":
            out[k] = _float32(full_options(name, options)[v]) if isinstance(v, str) else v
    return out


def _float32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def carry(name, returned):
    """The carried scalars' new values, from what a kernel call returned."""
    names = list(carried(name))
    if not names:
        return {}
    if len(names) == 1:
        return {names[0]: returned}
    return dict(zip(names, returned))


def is_valid(name, options=NOTHING):
    """Whether ``options`` go together (e.g. SGD's nesterov needs momentum, no dampening)."""
    return bool(rule(name).valid(full_options(name, options)))


def step_kwargs(name, t):
    """The kernel's per-step argument for step ``t`` (1 on the first step)."""
    if rule(name).step_arg == "step":
        return {"step": t}
    return {"first_step": t == 1}


def streams(name, options=NOTHING):
    """Memory streams per element of a step: read p, g and each buffer; write p and each."""
    return 3 + 2 * len(buffers_for(name, options))


# ------------------------------------------------------------------- sweeps

def case_id(case):
    """The id of a sweep case (its first item): for pytest's ``ids=``."""
    return case[0]


def _option_id(prefix, options):
    return prefix + "".join(f"-{k}={v}" for k, v in options.items())


def option_sets(name):
    """The rule's kernel option sets worth sweeping (over its ``sweep`` base)."""
    return [dict(o) for o in rule(name).option_sets]


def kernel_case(rule_name, options):
    """``(id, rule name, options)``: a kernel sweep case."""
    return (_option_id(rule_name, options), rule_name, dict(options))


def kernel_cases():
    """Every rule's option sets: ``(id, rule name, options)``."""
    return [kernel_case(r.name, o) for r in RULES for o in r.option_sets]


def kernel_kwargs(name, options=NOTHING):
    """The kernel's keyword arguments for a sweep case: defaults, sweep base, options."""
    r = rule(name)
    return {**kernel_defaults(r), **r.sweep, **options}


def class_cases():
    """Every class's cases: ``(id, Class entry, kwargs)``."""
    return [(_option_id(c.name, kw), c, dict(kw)) for c in classes() for kw in c.cases]


def torch_class_cases():
    """:func:`class_cases` of the classes torch.optim has too (for dense gradients)."""
    return [case for case in class_cases() if case[1].torch and not case[1].sparse_only]


def _resolve(cases, module):
    if module is None:
        import fastopt as module
    return [(cid, getattr(module, c.name), kw) for cid, c, kw in cases]


def optimizer_cases(module=None):
    """Every class's cases: ``(id, class, kwargs)``, the class taken from ``module``.

    ``module`` defaults to fastopt; ``fastopt.torch`` gives its torch.optim
    subclasses (same names).
    """
    return _resolve(class_cases(), module)


def richest_cases(module=None):
    """One case per class, its first that uses the most state buffers: ``(id, class, kwargs)``.

    For the sweeps too costly to run every case (long runs, error x case grids).
    """
    picked = []
    for cid, c, kw in class_cases():
        if picked and picked[-1][1] is c:
            if len(buffers_for(c, kw)) > len(buffers_for(c, picked[-1][2])):
                picked[-1] = (cid, c, kw)
        else:
            picked.append((cid, c, kw))
    return _resolve(picked, module)


def typical_cases(module=None):
    """Every class as most runs use it: ``(id, class, kwargs)`` (what benchmarks time)."""
    cases = []
    for c in classes():
        typical = {c.name.lower(): {}} if c.typical is None else c.typical
        cases += [(cid, c, dict(kw)) for cid, kw in typical.items()]
    return _resolve(cases, module)
