"""Policy-gradient surrogate objectives whose derivatives are the gradient/Hessian estimates.

docs/design.md (estimators). Every function works on ONE trajectory of time-indexed 1-D arrays of
length T; callers `jax.vmap` over a batch and average. Time indexing, for t = 0..T-1:

  log_prob[t]            log π_θ(a_t|s_t), differentiable in θ (the policy being differentiated)
  behaviour_log_prob[t]  log μ(a_t|s_t) of the policy that sampled a_t (recorded; no gradient).
                         `None` means on-policy: μ = stop_gradient(π_θ).
  rewards[t]             r_t, received after a_t
  discounts[t]           γ_t, multiplying what follows step t (γ, or γ·(1 − done_t))
  advantages[t]          an advantage estimate for (s_t, a_t), e.g. G_t − V(s_t) (see `gae`)
  mask[t]                1 for real steps, 0 for padding (optional)

With ρ_t = π_θ(a_t|s_t)/μ(a_t|s_t) = exp(log π − log μ) and w_t = Π_{i≤t} ρ_i (w_{-1} = 1):

  dice        Σ_t γ^t w_t r_t                                  Foerster et al. 2018 (DiCE)
  loaded_dice Σ_t γ^t (w_t − w_{t-1}) A_t                      Farquhar et al. 2019 (Loaded DiCE)
  lvc         Σ_t γ^t (ρ_t − 1) A_t                            Rothfuss et al. 2019 (LVC / ProMP)
  maml        Σ_t γ^t A_t log π_θ(a_t|s_t)                     Finn et al. 2017 (vanilla PG surrogate)

where γ^t = Π_{i<t} γ_i. On-policy the values of ρ_t and w_t are 1, and only their derivatives matter.
All four give unbiased gradients; dice and loaded_dice (λ = 1) give unbiased derivatives of every
order; lvc and maml give biased Hessians (Liu, Feng et al. 2022, "A Theoretical Understanding of Gradient
Bias in Meta-Reinforcement Learning", Table 1).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax

from gmrl.errors import InputError, require

Array = jax.Array

BUILTIN = ("dice", "loaded", "lvc", "maml")
"""The surrogates defined in this module. `ESTIMATORS`, `SAMPLED_ESTIMATORS` and `USES_CRITIC`
are computed from the registry at every access (module `__getattr__`), so registered surrogates
appear wherever an estimator is chosen (`core.Source`, `gmrl tabular`, `gmrl check`)."""

PLUGIN_VARIABLE = "GMRL_ESTIMATORS"
"""Environment variable: comma-separated `.py` files or module names imported (once, at the first
registry look-up) so that their `register(...)` calls take effect, e.g. for `gmrl tabular`."""

ENTRY_POINT_GROUP = "gmrl.estimators"
"""Installed packages may also declare entry points in this group; each names a module (imported)
or a callable (called with no arguments) that registers surrogates."""


def _check_1d(*arrays: Array | None) -> None:
    present = [a for a in arrays if a is not None]
    chex.assert_rank(present, 1)
    chex.assert_equal_shape(present)


def _on_policy(log_prob: Array, behaviour_log_prob: Array | None) -> Array:
    return lax.stop_gradient(log_prob) if behaviour_log_prob is None else behaviour_log_prob


def _masked(x: Array, mask: Array | None) -> Array:
    return x if mask is None else jnp.where(mask > 0, x, 0.0)


def cumsum(x: Array) -> Array:
    """Inclusive prefix sum over axis 0 as a `lax.scan`.

    Same values as `jnp.cumsum` up to rounding. On CPU `jnp.cumsum` lowers to a reduce-window
    whose work grows with T²; differentiated to second order inside a LOLA-DiCE update (T = 100,
    128 episodes × 10 seeds) the scan was the cheapest of jnp.cumsum, `lax.associative_scan`
    and a blocked triangular product (benchmarks/lola.py). Shape unchanged.
    """
    def step(total, value):
        total = total + value
        return total, total

    return lax.scan(step, jnp.zeros_like(x[0]), x)[1]


def time_discounts(discounts: Array) -> Array:
    """γ^t = Π_{i<t} γ_i for t = 0..T-1 (so the first entry is 1). Shape [T]."""
    chex.assert_rank(discounts, 1)
    return jnp.cumprod(jnp.concatenate([jnp.ones_like(discounts[:1]), discounts[:-1]]))


def discounted_returns(rewards: Array, discounts: Array, bootstrap: Array | float) -> Array:
    """Returns G_t = r_t + γ_t G_{t+1} with G_T = bootstrap. Shapes [T], [T], [] -> [T]."""
    _check_1d(rewards, discounts)

    def step(g_next, inputs):
        r, d = inputs
        g = r + d * g_next
        return g, g

    _, returns = lax.scan(step, jnp.asarray(bootstrap, rewards.dtype), (rewards, discounts),
                          reverse=True)
    return returns


def gae(rewards: Array, values: Array, discounts: Array, bootstrap: Array | float,
        lam: float = 1.0) -> Array:
    """Generalised advantage estimate (Schulman et al. 2016), one trajectory.

    δ_t = r_t + γ_t V_{t+1} − V_t with V_T = bootstrap;  A_t = δ_t + γ_t λ A_{t+1}, A_T = 0.
    With λ = 1 this is exactly G_t − V(s_t). Shapes [T] x3, [] -> [T].
    """
    _check_1d(rewards, values, discounts)
    next_values = jnp.concatenate([values[1:], jnp.asarray(bootstrap, values.dtype)[None]])
    deltas = rewards + discounts * next_values - values
    return discounted_returns(deltas, discounts * lam, 0.0)


def dice(log_prob: Array, behaviour_log_prob: Array | None, rewards: Array, discounts: Array,
         mask: Array | None = None) -> Array:
    """DiCE surrogate Σ_t γ^t w_t r_t (Foerster et al. 2018, eq. 3; no baseline). Returns []."""
    _check_1d(log_prob, behaviour_log_prob, rewards, discounts, mask)
    log_ratio = _masked(log_prob - _on_policy(log_prob, behaviour_log_prob), mask)
    weights = jnp.exp(cumsum(log_ratio))
    return jnp.sum(_masked(time_discounts(discounts) * weights * rewards, mask))


def loaded_dice(log_prob: Array, behaviour_log_prob: Array | None, advantages: Array,
                discounts: Array, lam: float = 1.0, mask: Array | None = None) -> Array:
    """Loaded DiCE Σ_t γ^t (w_t − w_{t-1}) A_t (Farquhar et al. 2019, eq. 8). Returns [].

    With λ < 1 past dependencies are discounted: log w_t = Σ_{i≤t} λ^{t−i} log ρ_i and the
    subtracted weight is exp(log w_t − log ρ_t); λ = 1 is unbiased to every order, λ < 1 is not.
    """
    _check_1d(log_prob, behaviour_log_prob, advantages, discounts, mask)
    log_ratio = _masked(log_prob - _on_policy(log_prob, behaviour_log_prob), mask)

    def accumulate(carry, x):
        carry = lam * carry + x
        return carry, carry

    _, log_weights = lax.scan(accumulate, jnp.zeros((), log_ratio.dtype), log_ratio)
    weight_change = jnp.exp(log_weights) - jnp.exp(log_weights - log_ratio)
    return jnp.sum(_masked(time_discounts(discounts) * weight_change * advantages, mask))


def lvc(log_prob: Array, behaviour_log_prob: Array | None, advantages: Array, discounts: Array,
        mask: Array | None = None) -> Array:
    """Low-variance-curvature surrogate Σ_t γ^t (ρ_t − 1) A_t (Rothfuss et al. 2019). Returns []."""
    _check_1d(log_prob, behaviour_log_prob, advantages, discounts, mask)
    ratio = jnp.exp(log_prob - _on_policy(log_prob, behaviour_log_prob))
    return jnp.sum(_masked(time_discounts(discounts) * (ratio - 1.0) * advantages, mask))


def maml(log_prob: Array, advantages: Array, discounts: Array, mask: Array | None = None) -> Array:
    """Vanilla log-probability surrogate Σ_t γ^t A_t log π_θ(a_t|s_t) (Finn et al. 2017). Returns [].

    An on-policy estimator: it has no behaviour term, so off-policy data gives a biased gradient.
    """
    _check_1d(log_prob, advantages, discounts, mask)
    return jnp.sum(_masked(time_discounts(discounts) * advantages * log_prob, mask))


@dataclasses.dataclass(frozen=True)
class Registered:
    """A surrogate in the registry: `fn` has the signature of one of this module's functions
    (keyword arguments among log_prob, behaviour_log_prob, rewards, advantages, discounts, mask,
    lam); `uses_critic` says whether it wants advantages G_t − V(s_t) and the bootstrap V(s_T)
    (False: advantages are plain reward-to-go and the finite oracle has no bootstrap)."""

    name: str
    fn: Callable[..., Array]
    uses_critic: bool
    parameters: tuple[str, ...]


ARGUMENTS = ("log_prob", "behaviour_log_prob", "rewards", "advantages", "discounts", "mask", "lam")
_REGISTRY: dict[str, Registered] = {}
_plugins_loaded = False


def register(name: str, fn: Callable[..., Array], *, uses_critic: bool,
             overwrite: bool = False) -> Callable[..., Array]:
    """Add the surrogate `fn` under `name`, usable as any ingredient (`core.Source(name,
    N)`, `gmrl tabular --inner NAME:N`) and as a candidate explanation in `gmrl check`.

    `fn` works on ONE trajectory like `dice`/`lvc` above and returns a scalar []; gmrl calls it with
    the keyword arguments its signature names (see `ARGUMENTS`; positional names must be among
    them). Returns `fn`, so `register` also works as `functools.partial(register, ...)` decorator.
    """
    require(isinstance(name, str) and name.isidentifier(),
            f"an estimator name must be an identifier, got {name!r}")
    require(name not in ("exact",) + BUILTIN, f"{name!r} is a built-in estimator; choose another name")
    require(overwrite or name not in _REGISTRY,
            f"estimator {name!r} is already registered (pass overwrite=True to replace it)")
    require(callable(fn), f"the surrogate for {name!r} must be callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise InputError(f"cannot read the signature of the surrogate {name!r}") from None
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = tuple(p for p in params if params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                               inspect.Parameter.VAR_KEYWORD))
    unknown = [p for p in named if p not in ARGUMENTS and params[p].default is inspect.Parameter.empty]
    require(not unknown, f"the surrogate {name!r} has required argument(s) {unknown} that gmrl "
            f"cannot supply; allowed: {', '.join(ARGUMENTS)}")
    require("log_prob" in named or accepts_any,
            f"the surrogate {name!r} must take log_prob (the differentiable log π_θ(a_t|s_t))")
    parameters = ARGUMENTS if accepts_any else tuple(p for p in named if p in ARGUMENTS)
    _REGISTRY[name] = Registered(name, fn, bool(uses_critic), parameters)
    return fn


def unregister(name: str) -> None:
    """Remove a registered surrogate (built-ins cannot be removed)."""
    require(name in _REGISTRY, f"estimator {name!r} is not registered")
    del _REGISTRY[name]


def registered() -> dict[str, Registered]:
    """The user-registered surrogates by name (after loading plugins)."""
    _load_plugins()
    return dict(_REGISTRY)


def _import_plugin(spec: str) -> None:
    if spec.endswith(".py"):
        require(os.path.isfile(spec), f"{PLUGIN_VARIABLE}: file {spec!r} does not exist")
        module_name = f"gmrl_plugin_{abs(hash(os.path.abspath(spec)))}"
        loader = importlib.util.spec_from_file_location(module_name, spec)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def _load_plugins() -> None:
    """Import the `GMRL_ESTIMATORS` files/modules and `gmrl.estimators` entry points, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    specs = [s.strip() for s in os.environ.get(PLUGIN_VARIABLE, "").split(",") if s.strip()]
    for spec in specs:
        try:
            _import_plugin(spec)
        except InputError:
            raise
        except Exception as err:  # a user's plugin: report it in one line
            raise InputError(f"{PLUGIN_VARIABLE}: importing {spec!r} failed: "
                             f"{type(err).__name__}: {err}") from None
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()
        except Exception as err:
            raise InputError(f"entry point {entry.name!r} ({ENTRY_POINT_GROUP}) failed: "
                             f"{type(err).__name__}: {err}") from None


def __getattr__(name: str):
    """ESTIMATORS, SAMPLED_ESTIMATORS and USES_CRITIC, computed from the registry at each access."""
    if name == "SAMPLED_ESTIMATORS":
        _load_plugins()
        return BUILTIN + tuple(_REGISTRY)
    if name == "ESTIMATORS":
        _load_plugins()
        return ("exact",) + BUILTIN + tuple(_REGISTRY)
    if name == "USES_CRITIC":
        _load_plugins()
        return {"dice": False, "loaded": True, "lvc": True, "maml": True,
                **{n: r.uses_critic for n, r in _REGISTRY.items()}}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def surrogate(name: str, *, log_prob: Array, behaviour_log_prob: Array | None, rewards: Array,
              advantages: Array, discounts: Array, mask: Array | None = None,
              lam: float = 1.0) -> Array:
    """The surrogate `name` ∈ SAMPLED_ESTIMATORS for one trajectory (arguments as above). Returns [].

    A registered surrogate receives the keyword arguments its signature names.
    """
    if name == "dice":
        return dice(log_prob, behaviour_log_prob, rewards, discounts, mask)
    if name == "loaded":
        return loaded_dice(log_prob, behaviour_log_prob, advantages, discounts, lam, mask)
    if name == "lvc":
        return lvc(log_prob, behaviour_log_prob, advantages, discounts, mask)
    if name == "maml":
        return maml(log_prob, advantages, discounts, mask)
    _load_plugins()
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        values = dict(log_prob=log_prob, behaviour_log_prob=behaviour_log_prob, rewards=rewards,
                      advantages=advantages, discounts=discounts, mask=mask, lam=lam)
        return entry.fn(**{k: values[k] for k in entry.parameters})
    allowed = BUILTIN + tuple(_REGISTRY)
    raise ValueError(f"unknown estimator {name!r}; allowed: {', '.join(allowed)}")
