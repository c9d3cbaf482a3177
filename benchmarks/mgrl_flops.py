"""Floating-point work per frame of a2c and MGRL, by part of the step, from XLA's cost analysis
of the compiled programs (no timing: this explains the cost ratio `benchmarks/mgrl.py` measures).

Usage: python benchmarks/mgrl_flops.py [--env Breakout-MinAtar] [--preset reference]

XLA counts a loop body once, so a rollout's flops are those of a one-step rollout (policy forward
and env step on all envs) times its T steps. Parts of one MGRL step (K inner steps,
`gmrl.algos.mgrl.make_meta_gradient`): K rollouts; the first inner update with its pullback w.r.t.
the meta-logits x only (θ_0 does not depend on x); K − 1 inner updates with their pullbacks w.r.t.
(x, θ, optimiser state) — the second-order part; the outer loss's value and gradient at θ_K.
"""

from __future__ import annotations

import argparse

import jax

from gmrl.algos import a2c, mgrl


def flops(fn, *args) -> float:
    """XLA's flop count of jit(fn)(*args) (loop bodies once)."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def parts(env_name: str, preset: str) -> dict[str, float]:
    """Flops of each part of one a2c step and one MGRL step (vanilla surrogate)."""
    cfg = mgrl.make_config("mgrl", env_name, preset=preset, total_updates=10 ** 6)
    env, env_params, network = mgrl.env_and_network(cfg)
    algorithm = mgrl.make_algorithm("mgrl", env_name, preset=preset, total_updates=10 ** 6)
    state = algorithm.init(jax.random.key(0))
    update = mgrl._make_update(cfg, network)
    x, params, opt_state, batch = state.meta_logits, state.params, state.opt_state, state.batch
    zero = jax.tree.map(mgrl._zero_cotangent, opt_state)

    def first_update(x, params, opt_state, batch):
        (new_params, _), pullback, _ = jax.vjp(lambda x: update(x, params, opt_state, batch), x,
                                               has_aux=True)
        return pullback((new_params, zero))

    def later_update(x, params, opt_state, batch):
        (new_params, _), pullback, _ = jax.vjp(lambda x, p, s: update(x, p, s, batch), x, params,
                                               opt_state, has_aux=True)
        return pullback((new_params, zero))

    def update_alone(x, params, opt_state, batch):
        return update(x, params, opt_state, batch)[0]

    def outer_forward(params, batch):  # the torso (and policy head) on D_K's T+1 observations
        return network.policy(params, a2c._obs_all(batch))

    def outer(params, batch):
        return jax.value_and_grad(
            lambda p: mgrl._outer_objective(network, p, p, batch, cfg))(params)

    def rollout_step(params, runner, key, net=network):
        return a2c.rollout(env, env_params, net, params, runner, key, 1)[1]

    a2c_algo = mgrl.make_algorithm("a2c", env_name, preset=preset, total_updates=10 ** 6)
    a2c_state = a2c_algo.init(jax.random.key(0))
    a2c_network = mgrl.env_and_network(mgrl.make_config("a2c", env_name, preset=preset))[2]
    steps = cfg.num_steps
    roll_step = flops(rollout_step, params, state.runner, state.key)
    a2c_roll = steps * flops(lambda p, r, k: rollout_step(p, r, k, a2c_network), a2c_state.params,
                             a2c_state.runner, a2c_state.key)
    later = flops(later_update, x, params, opt_state, batch)
    return {
        "a2c: rollout": a2c_roll,
        "a2c: update": flops(a2c_algo.step, a2c_state) - a2c_roll / steps,
        "mgrl: K rollouts": cfg.inner_steps * steps * roll_step,
        "mgrl: first update + pullback (x)": flops(first_update, x, params, opt_state, batch),
        "mgrl: K-1 updates + pullbacks (x, θ, s)": (cfg.inner_steps - 1) * later,
        "mgrl: outer loss value and gradient": flops(outer, params, batch),
        "one inner update alone": flops(update_alone, x, params, opt_state, batch),
        "outer forward": flops(outer_forward, params, batch),
        "one later update + pullback": later,
        "mgrl: whole step (one program)": flops(algorithm.step, state)
        + cfg.inner_steps * (steps - 1) * roll_step,
        "frames per a2c step": float(cfg.num_envs * steps),
        "frames per mgrl step": float(cfg.inner_steps * cfg.num_envs * steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Breakout-MinAtar")
    parser.add_argument("--preset", default="reference")
    args = parser.parse_args()
    result = parts(args.env, args.preset)
    a2c_frames, mgrl_frames = result.pop("frames per a2c step"), result.pop("frames per mgrl step")
    whole = result.pop("mgrl: whole step (one program)")
    update_alone, outer_forward = result.pop("one inner update alone"), result.pop("outer forward")
    later = result.pop("one later update + pullback")
    a2c_total = result["a2c: rollout"] + result["a2c: update"]
    print(f"{args.env}, preset {args.preset}: XLA flops per step (MFLOP) and per frame (kFLOP)")
    for name, value in result.items():
        frames = a2c_frames if name.startswith("a2c") else mgrl_frames
        print(f"  {name:42s} {value / 1e6:9.1f} MFLOP {value / frames / 1e3:8.1f} kFLOP/frame")
    print(f"  {'mgrl: whole step (one program)':42s} {whole / 1e6:9.1f} MFLOP "
          f"{whole / mgrl_frames / 1e3:8.1f} kFLOP/frame")
    a2c_per_frame = a2c_total / a2c_frames
    print(f"MGRL / a2c flops per frame: {(whole / mgrl_frames) / a2c_per_frame:.2f}x")
    # A Hessian-vector product costs about twice the gradient it differentiates (each matrix
    # product of the forward and backward pass gets a tangent with two products): the pullback of
    # a later update against the update itself shows how close the second-order part is to that.
    print(f"later pullback / its update: {(later - update_alone) / update_alone:.2f}x "
          f"(update {update_alone / 1e6:.1f} MFLOP)")
    # The one MGRL-only repetition: the outer loss's network forward at (θ_K, D_K) is repeated by
    # the next step's first update (same θ, same observations); sharing it would save this much.
    print(f"MGRL / a2c with the outer forward shared: "
          f"{((whole - outer_forward) / mgrl_frames) / a2c_per_frame:.2f}x "
          f"(outer forward {outer_forward / 1e6:.1f} MFLOP)")


if __name__ == "__main__":
    main()
