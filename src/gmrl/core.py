"""The unified GMRL framework: one meta-problem shape, one decomposition, one K-step unroll.

Liu, Feng et al. 2022 ("A Theoretical Understanding of Gradient Bias in Meta-Reinforcement
Learning", §3) write every gradient-based meta-RL algorithm as K inner steps from a learner state
that depends on the meta-parameters φ, followed by an outer objective:

    θ_0 = init(φ),   θ_{k+1} = θ_k + Δ_k(θ_k, φ),   meta-gradient  d/dφ J_out(θ_K(φ), φ).

MAML (θ_0 = φ), LIRPG (φ an intrinsic reward), MGRL (φ the discount and trace parameters), LOLA (φ an
agent's own policy, the inner steps the opponent's) differ only in init, Δ and J_out. A
`MetaProblem` holds those three pure functions; a `Source` says where one part of a step comes
from (the exact expectation, a sampled surrogate of n episodes, the value's own batch, nothing);
a `Decomposition` (value, jacobian, outer) picks a source for each part (§4): the step's value
moves θ (no derivative), its Jacobian comes through `straight_through`, and the outer source
gives J_out at θ̂_K. `unroll` is the only K-step loop; the exact meta-gradient is its gradient
with every part exact, a decomposed estimate its gradient with sampled parts.

α, the number of active steps K ≤ K_max and the injected Hessian error scale c may be traced
(`Hyper`): steps k ≥ K are skipped with `lax.cond`, so one compiled program serves a sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gmrl.errors import InputError, require

Array = jax.Array
PyTree = Any

SAME = "same"
"""Jacobian source only: the Jacobian of the step's own value (one batch does both, as autodiff
through `θ + α ∇L(θ; τ)` with `create_graph=True` gives)."""
NONE = "none"
"""Jacobian source only: the step's Jacobian is the identity (a first-order meta-gradient)."""
EXACT = "exact"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one part of the decomposition comes from. Hashable: jit-static.

    estimator: "exact", a surrogate name (`gmrl.estimators.ESTIMATORS`), or, for a Jacobian,
    `SAME` / `NONE`. samples: episodes of a sampled source; None means the exact expectation of
    that estimator's surrogate (for a finite-horizon oracle, J_T with the estimator's bootstrap).
    """

    estimator: str = EXACT
    samples: int | None = None

    def __post_init__(self):
        from gmrl import estimators as est

        if self.estimator in (SAME, NONE):
            require(self.samples is None, f"{self.estimator!r} takes no sample size, got {self.samples!r}")
            return
        require(self.estimator in est.ESTIMATORS,
                f"unknown estimator {self.estimator!r}; allowed: {', '.join(est.ESTIMATORS)}")
        if self.samples is not None:
            require(isinstance(self.samples, int) and not isinstance(self.samples, bool)
                    and self.samples >= 1,
                    f"the sample size of {self.estimator!r} must be an integer >= 1, got {self.samples!r}")

    @property
    def kind(self) -> str:
        """"exact", "sampled", "same" or "none"."""
        if self.estimator in (SAME, NONE):
            return self.estimator
        return EXACT if self.is_exact else "sampled"

    @property
    def is_exact(self) -> bool:
        return self.estimator not in (SAME, NONE) and (self.samples is None or self.estimator == EXACT)

    def __str__(self) -> str:
        if self.estimator in (EXACT, SAME, NONE):
            return self.estimator
        return f"{self.estimator}:{'exact' if self.samples is None else self.samples}"

    @classmethod
    def parse(cls, text: str, default_samples: int = 32, jacobian: bool = False) -> Source:
        """`exact`, `NAME` (default sample size), `NAME:N` (e.g. `dice:32`); for a Jacobian also
        `same` and `none`."""
        from gmrl import estimators as est

        name, _, count = text.strip().partition(":")
        if name in (EXACT, SAME, NONE):
            require(name == EXACT or jacobian,
                    f"{name!r} is a Jacobian source (--hessian) only, got {text!r}")
            require(not count, f"{name!r} takes no sample size, got {text!r}")
            return cls(name, None)
        extra = ", same, none" if jacobian else ""
        require(name in est.SAMPLED_ESTIMATORS,
                f"unknown estimator {name!r} in {text!r}; allowed: {', '.join(est.ESTIMATORS)}{extra}")
        if not count:
            return cls(name, default_samples)
        try:
            samples = int(count)
        except ValueError:
            raise InputError(f"sample size in {text!r} must be an integer >= 1") from None
        require(samples >= 1, f"sample size in {text!r} must be an integer >= 1, got {samples}")
        return cls(name, samples)


class Decomposition(NamedTuple):
    """The three parts of a decomposed meta-gradient estimate (Liu, Feng et al. 2022, §4).

    value: moves θ̂_k forward (its noise is the compositional bias); jacobian: supplies dθ̂_{k+1}/dθ̂_k
    and dθ̂_{k+1}/dφ (its bias is the Hessian-estimation bias); outer: J_out at θ̂_K. Each field is a
    `Source`, or a tuple of one `Source` per inner step (value and jacobian; the loop is then
    unrolled in Python and K is static).
    """

    value: Source | tuple[Source, ...] = Source()
    jacobian: Source | tuple[Source, ...] = Source()
    outer: Source = Source()


EXACT_PARTS = Decomposition(Source(), Source(SAME), Source())


class Hyper(NamedTuple):
    """Per-point hyper-parameters that may be traced: α, active steps K (≤ K_max), error scale c."""

    lr: Array | float
    steps: Array | int
    hessian_error: Array | float = 0.0


class MetaProblem(NamedTuple):
    """A GMRL problem as three pure functions (optax-style: a NamedTuple of functions).

    init(φ) -> θ_0 (a pytree: the learner state).
    increment(key, source, θ, φ, lr, count, extra) -> Δ, a pytree like θ: one inner step
        θ' = θ + Δ from `source` (exact: the expected step; sampled: a surrogate over fresh episodes
        drawn with `key` at θ), differentiable in θ and φ the way that source's estimate is.
        `count` (None, or a traced int ≤ source.samples; 0 = exact) uses only the first `count`
        episodes; `extra` (None or a function of θ returning []) is added to the step's objective
        before differentiation (the injected Hessian error of the reference study).
    outer(key, source, θ, φ, count) -> [], J_out at θ from `source`.
    """

    init: Callable[[PyTree], PyTree]
    increment: Callable[..., PyTree]
    outer: Callable[..., Array]


def straight_through(value: PyTree, differentiable: PyTree) -> PyTree:
    """`value` in the forward pass, the derivative of `differentiable` in the backward pass.

    Returns sg(value) + differentiable − sg(differentiable) (pytrees of equal structure). With
    value = θ + α ĝ_in and differentiable = θ + α ∇L_H(θ), the step has the inner estimate's value
    and the Jacobian I + α ∇²L_H of the Hessian estimate (Liu, Feng et al. 2022, §4).
    """
    return jax.tree.map(lambda v, d: lax.stop_gradient(v) + d - lax.stop_gradient(d), value, differentiable)


def step_keys(key: Array, num_steps: int) -> tuple[Array, Array]:
    """(keys of steps 0..num_steps-1 [num_steps], key of the outer part).

    Step k's key is fold_in(·, k), so it does not depend on num_steps (the loop length K_max).
    """
    key_steps, key_outer = jax.random.split(key)
    return jax.vmap(lambda k: jax.random.fold_in(key_steps, k))(jnp.arange(num_steps)), key_outer


def masked_scan(step: Callable, theta: PyTree, xs: PyTree, active_steps) -> PyTree:
    """θ after applying `step(θ, x)` for the first `active_steps` of the xs (lax.cond skips the rest)."""
    def body(carry, inputs):
        k, x = inputs
        return lax.cond(k < active_steps, step, lambda th, _: th, carry, x), None

    length = jax.tree.leaves(xs)[0].shape[0]
    theta, _ = lax.scan(body, theta, (jnp.arange(length), xs))
    return theta


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _hessian_error(key: Array, scale) -> Callable[[PyTree], Array]:
    """mean(θ² ⊙ E), E = c + 0.3·N(0, 1) (E = 0 where c = 0): the reference study's injected error."""
    def extra(theta):
        noise = jax.random.normal(key, theta.shape, theta.dtype)
        error = jnp.where(scale != 0, scale + 0.3 * noise, 0.0)
        return jnp.mean(theta**2 * error)

    return extra


def _at_step(part, k: int):
    return part[k] if isinstance(part, tuple) else part


def inner_step(problem: MetaProblem, parts: Decomposition, step_key: Array, theta: PyTree, phi: PyTree,
               lr, counts: Sequence, error_scale=None, k: int = 0) -> PyTree:
    """One composed inner step θ̂_{k+1} = straight_through(θ̂_k + Δ_value, θ̂_k + Δ_jacobian).

    The value part sees sg(θ̂_k), sg(φ) (no derivative); the Jacobian part sees θ̂_k, φ. Keys:
    (value, jacobian) = split(step_key); the Jacobian's own key is split(jacobian)[0] (its second
    half draws the injected error when `error_scale` is given).
    """
    value_source, jac_source = _at_step(parts.value, k), _at_step(parts.jacobian, k)
    key_value, key_jac = jax.random.split(step_key)
    if jac_source.kind == SAME:
        return _add(theta, problem.increment(key_value, value_source, theta, phi, lr, counts[0], None))
    value = problem.increment(key_value, value_source, lax.stop_gradient(theta),
                              lax.stop_gradient(phi), lr, counts[0], None)
    if jac_source.kind == NONE:
        return straight_through(_add(theta, value), theta)
    key_h, key_e = jax.random.split(key_jac)
    extra = None if error_scale is None else _hessian_error(key_e, error_scale)
    jac = problem.increment(key_h, jac_source, theta, phi, lr, counts[1], extra)
    return straight_through(_add(theta, value), _add(theta, jac))


def unroll(problem: MetaProblem, parts: Decomposition, key: Array, phi: PyTree, hyper: Hyper,
           max_steps: int, counts: Sequence | None = None, with_error: bool = False) -> Array:
    """J_out(θ̂_K(φ), φ) after the K = hyper.steps ≤ max_steps composed inner steps. Returns [].

    Its gradient in φ is the decomposed meta-gradient estimate (with every part exact: the exact
    meta-gradient). `counts` [3] (optional, traced ints): episodes used by value, jacobian, outer
    (0 = exact); `with_error` (static) adds the injected Hessian error of scale hyper.hessian_error
    to the Jacobian part. Per-step sources (tuples in `parts`) unroll the loop in Python with
    K = max_steps.
    """
    counts = (None, None, None) if counts is None else counts
    lr, steps, error_scale = hyper
    error_scale = error_scale if with_error else None
    keys, key_outer = step_keys(key, max_steps)
    theta = problem.init(phi)
    if isinstance(parts.value, tuple) or isinstance(parts.jacobian, tuple):
        for k in range(max_steps):
            theta = inner_step(problem, parts, keys[k], theta, phi, lr, counts, error_scale, k)
    else:
        theta = masked_scan(lambda th, sk: inner_step(problem, parts, sk, th, phi, lr, counts, error_scale),
                            theta, keys, steps)
    return problem.outer(key_outer, parts.outer, theta, phi, counts[2])


def meta_gradient(problem: MetaProblem, parts: Decomposition, key: Array, phi: PyTree, hyper: Hyper,
                  max_steps: int, counts: Sequence | None = None, with_error: bool = False) -> PyTree:
    """d/dφ of `unroll`: one decomposed meta-gradient estimate (exact when every part is). Like φ."""
    return jax.grad(lambda p: unroll(problem, parts, key, p, hyper, max_steps, counts, with_error))(phi)


def exact_parts(estimator: str = EXACT) -> Decomposition:
    """Every part the exact expectation of `estimator`'s surrogate (its finite-oracle bootstrap)."""
    return Decomposition(Source(estimator), Source(SAME), Source(estimator))


def exact_meta_gradient(problem: MetaProblem, phi: PyTree, hyper: Hyper, max_steps: int,
                        estimator: str = EXACT) -> PyTree:
    """The exact meta-gradient: autodiff through K exact steps (no key is used). Like φ."""
    return meta_gradient(problem, exact_parts(estimator), jax.random.key(0), phi, hyper, max_steps)


def inner_path(problem: MetaProblem, source: Source, key: Array, phi: PyTree, hyper: Hyper,
               max_steps: int, count=None) -> PyTree:
    """θ̂_1..θ̂_{K_max} of the value part alone (no derivative), with the same step keys as `unroll`;
    entries after K = hyper.steps repeat θ̂_K. Leaves stacked on a leading axis [K_max, ...]."""
    lr, steps, _ = hyper
    keys, _ = step_keys(key, max_steps)
    phi = lax.stop_gradient(phi)

    def body(theta, inputs):
        k, step_key = inputs
        key_value, _ = jax.random.split(step_key)
        moved = _add(theta, problem.increment(key_value, source, theta, phi, lr, count, None))
        theta = jax.tree.map(lambda new, old: jnp.where(k < steps, new, old), moved, theta)
        return theta, theta

    _, path = lax.scan(body, problem.init(phi), (jnp.arange(max_steps), keys))
    return path


def gradient_increment(objective: Callable[..., Array]) -> Callable[..., PyTree]:
    """An `increment` for problems whose inner step is gradient ascent on a surrogate objective:
    Δ = lr · ∇_θ [objective(key, source, θ, φ, count) + extra(θ)]."""
    def increment(key, source, theta, phi, lr, count=None, extra=None):
        def total(th):
            value = objective(key, source, th, phi, count)
            return value if extra is None else value + extra(th)

        return jax.tree.map(lambda g: lr * g, jax.grad(total)(theta))

    return increment
