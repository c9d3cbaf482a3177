"""Atari 2600 games through `ale-py`, as gymnax-style environments for the A2C and MGRL agents.

`make_env("ALE/Breakout-v5") -> (env, params)` with the gymnax calls the agents use:
`env.reset(key, params) -> (obs, state)` and
`env.step(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)`,
observations [84, 84, 4] uint8 (four grey frames, newest last, values 0..255; the reference's
CNN divides by 255), `observation_space(params)` and `action_space(params).n` (the game's minimal
action set).

Preprocessing is the reference's Atari chain (Kostrikov's pytorch-a2c-ppo-acktr `envs.py` on
stable-baselines3's `atari_wrappers`, after Mnih et al. 2015, "Human-level control through deep
reinforcement learning", Methods): 1–30 no-op frames after a real reset, the action repeated for 4
frames with the pixel-wise maximum of the last two RGB frames, episodic life (a lost life ends the
training episode), FIRE after each reset in games with FIRE, 84×84 grey (ITU-R 601 luma, area
resampling), a 4-frame stack cleared when an episode ends, rewards clipped to their sign for
training; `info["episode_score"]` carries the unclipped score of each finished game (all lives),
the number the reference logs. docs/atari.md has the table, reference vs gmrl.

Purity. The emulator runs on the host through one `jax.pure_callback` per step of the whole batch
(`vmap_method="broadcast_all"`: N envs of S seeds are stepped by one call). The host keeps no
per-environment state: an environment's state is its serialized ALE machine state (`ALEState`,
about 7.7 kB) inside `AtariState`, restored into a worker emulator, stepped and serialized again.
All randomness (the no-op count, sticky actions) is drawn from the JAX key given to `reset`/`step`,
so the same key gives the same trajectory, `vmap`, `jit`, `lax.scan` and checkpoints of the state
behave as for any gymnax environment, and the emulators' own seeds play no part (with sticky actions
done here, the ALE emulator is deterministic). The grey frame is resized and stacked in JAX.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gmrl.errors import require

Array = jax.Array

NAME_PATTERN = re.compile(r"^ALE/([A-Za-z0-9]+)-v5$")
OBS_SIZE = 84
STACK = 4
FRAME_SKIP = 4
HEADER = 4            # bytes of the length prefix in front of the serialized ALE state
STATE_MARGIN = 1024   # spare bytes beyond the fresh game's state size
# ITU-R BT.601 luma in 14-bit fixed point, as OpenCV's RGB2GRAY for uint8 (the reference's WarpFrame).
_LUMA = (4899, 9617, 1868)


def _import_ale():
    try:
        import ale_py
    except ImportError:
        ale_py = None
    require(ale_py is not None,
            "Atari environments (ALE/...) need ale-py: pip install 'gmrl[atari]' "
            "(ale-py 0.12.1 ships the ROMs)")
    return ale_py


def _rom_id_to_name(rom: str) -> str:
    return "".join(part.capitalize() for part in rom.split("_"))


@dataclasses.dataclass(frozen=True)
class AtariParams:
    """Static settings of one Atari environment (hashable; no array leaves).

    The defaults are the reference's (gym 0.17 `<Game>NoFrameskip-v4` under its wrappers), not the
    ALE v5 ones: repeat_action_probability (sticky actions, Machado et al. 2018) 0.0, where v5 uses
    0.25; a game is truncated after max_episode_frames = 400,000 emulator frames (gym's TimeLimit
    there), where v5 uses 108,000.
    """

    game: str = "breakout"
    noop_max: int = 30
    repeat_action_probability: float = 0.0
    episodic_life: bool = True
    fire_reset: bool = True
    clip_rewards: bool = True
    max_episode_frames: int = 400_000


jax.tree_util.register_static(AtariParams)


class AtariState(NamedTuple):
    """One environment: emulator [L] uint8 (length-prefixed `ALEState` bytes), frames [84, 84, 4]
    uint8 (the observation), lives [] int32 (as EpisodicLifeEnv counts them), last_action [] int32
    (for sticky actions), score [] float32 (unclipped score of the running game so far)."""

    emulator: Array
    frames: Array
    lives: Array
    last_action: Array
    score: Array


class _Emulator:
    """One ALE emulator used as a worker: it holds no environment's state between calls."""

    def __init__(self, ale_py, params: AtariParams):
        from ale_py import roms

        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
        ale = ale_py.ALEInterface()
        ale.setInt("random_seed", 0)                     # unused: randomness comes from JAX keys
        ale.setFloat("repeat_action_probability", 0.0)   # sticky actions are done here, per frame
        ale.setInt("max_num_frames_per_episode", params.max_episode_frames)
        ale.loadROM(roms.get_rom_path(params.game))
        self.ale_py, self.ale, self.params = ale_py, ale, params
        self.actions = ale.getMinimalActionSet()
        names = [str(a).split(".")[-1] for a in self.actions]
        self.fire = params.fire_reset and len(names) >= 3 and names[1] == "FIRE"
        ale.reset_game()
        self.fresh = ale.cloneState()
        height, width = ale.getScreenDims()
        self.rgb = np.empty((2, height, width, 3), np.uint8)
        self.rng = None
        self.last = 0

    # --- frames and the wrappers, in the reference's order ---------------------------------
    def _frame(self, action: int) -> float:
        """One emulator frame; with sticky actions the previous frame's action repeats w.p. p."""
        if self.rng is not None and self.rng.random() < self.params.repeat_action_probability:
            action = self.last
        self.last = action
        return float(self.ale.act(self.actions[action]))

    def _skip_step(self, action: int) -> tuple[float, bool]:
        """MaxAndSkipEnv(4): repeat 4 frames, keep the last two screens for the max; stop at game over."""
        total = 0.0
        kept = 0
        for i in range(FRAME_SKIP):
            total += self._frame(action)
            if i >= FRAME_SKIP - 2:
                self.ale.getScreenRGB(self.rgb[i - (FRAME_SKIP - 2)])
                kept += 1
            if self.ale.game_over():
                break
        if kept < 2:  # game over early: the observation is replaced by the reset one anyway
            self.ale.getScreenRGB(self.rgb[0])
            self.rgb[1] = self.rgb[0]
        self.pooled = True
        return total, self.ale.game_over()

    def _noop_reset(self, noops: int) -> None:
        """NoopResetEnv(30) under MaxAndSkip: a fresh game, then `noops` single no-op frames."""
        self.ale.restoreState(self.fresh)    # = reset_game(), which is deterministic
        self.last = 0
        for _ in range(noops):
            self._frame(0)
            if self.ale.game_over():
                self.ale.restoreState(self.fresh)
        self.pooled = False

    def _life_reset(self, real: bool, noops: int) -> float:
        """EpisodicLifeEnv.reset: a real reset after game over, else one no-op step. Returns the
        (unclipped) reward of that step, which the reference's Monitor counts in the score."""
        reward = 0.0
        if real or not self.params.episodic_life:
            self._noop_reset(noops)
        else:
            reward, _ = self._skip_step(0)
        self.lives = self.ale.lives()
        return reward

    def _life_step(self, action: int) -> tuple[float, bool, bool]:
        """EpisodicLifeEnv.step -> (reward, done, game over); done also when a life is lost."""
        reward, over = self._skip_step(action)
        lives = self.ale.lives()
        lost = self.params.episodic_life and 0 < lives < self.lives
        self.lives = lives
        return reward, over or lost, over

    def _reset(self, real: bool, noops: int) -> tuple[float, bool]:
        """FireResetEnv.reset over EpisodicLifeEnv.reset -> (score reward, a game ended on the way)."""
        reward = self._life_reset(real, noops)
        ended = False
        if self.fire:
            for action in (1, 2):
                r, done, over = self._life_step(action)
                reward += r
                if done:
                    ended |= over
                    reward += self._life_reset(over, noops)
        return reward, ended

    def _screen(self, out: np.ndarray) -> None:
        """The observation frame [H, W, 3] uint8 into `out`: the maximum of the two kept RGB frames
        after a step, the current screen after a no-op reset (grey and resize happen in JAX)."""
        if self.pooled:
            np.maximum(self.rgb[0], self.rgb[1], out=out)
        else:
            self.ale.getScreenRGB(out)

    # --- state in and out ----------------------------------------------------------------------
    def _restore(self, blob: np.ndarray) -> None:
        size = int(blob[:HEADER].view(np.uint32)[0])
        self.ale.restoreState(self.ale_py.ALEState(blob[HEADER:HEADER + size].tobytes()))

    def _save(self, out: np.ndarray) -> None:
        data = self.ale.cloneState().serialize()
        if HEADER + len(data) > out.shape[0]:
            raise RuntimeError(f"ALE state of {len(data)} bytes exceeds the {out.shape[0]}-byte buffer")
        out[:HEADER] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
        out[HEADER:HEADER + len(data)] = np.frombuffer(data, np.uint8)
        out[HEADER + len(data):] = 0

    def _seed(self, seed: int) -> None:
        self.rng = (np.random.default_rng(seed) if self.params.repeat_action_probability > 0
                    else None)

    # --- the two batched host functions --------------------------------------------------------
    def reset_one(self, noops: int, seed: int, out: dict, i: int) -> None:
        self._seed(seed)
        reward, _ = self._reset(True, noops)
        out["emulator"][i] = 0
        self._save(out["emulator"][i])
        self._screen(out["frame"][i])
        out["lives"][i] = self.lives
        out["last_action"][i] = self.last
        out["score"][i] = reward

    def step_one(self, inp: dict, out: dict, i: int) -> None:
        self._seed(int(inp["seed"][i]))
        self._restore(inp["emulator"][i])
        self.lives, self.last = int(inp["lives"][i]), int(inp["last_action"][i])
        score = float(inp["score"][i])
        reward, done, over = self._life_step(int(inp["action"][i]))
        truncated = over and self.ale.game_truncated()
        episode_score = 0.0
        score += reward
        if done:
            if over:
                episode_score, score = score, 0.0
            extra, ended = self._reset(over, int(inp["noops"][i]))
            if ended:  # a game ended inside the reset sequence (rare): its score is reported too
                episode_score, score, over = score + extra, 0.0, True
            else:
                score += extra
        self._save(out["emulator"][i])
        self._screen(out["frame"][i])
        out["lives"][i] = self.lives
        out["last_action"][i] = self.last
        out["score"][i] = score
        out["reward"][i] = reward
        out["terminated"][i] = done and not truncated
        out["truncated"][i] = truncated
        out["game_over"][i] = over
        out["episode_score"][i] = episode_score


class _Host:
    """Worker emulators for one game, shared by all environments with the same `AtariParams`."""

    _lock = threading.Lock()
    _hosts: dict[tuple[AtariParams, int], _Host] = {}

    def __init__(self, ale_py, params: AtariParams, num_threads: int):
        self.workers = [_Emulator(ale_py, params) for _ in range(num_threads)]
        self.pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None
        self.busy = threading.Lock()
        first = self.workers[0]
        self.num_actions = len(first.actions)
        self.screen = first.rgb.shape[1:3]
        self.state_bytes = HEADER + len(first.fresh.serialize()) + STATE_MARGIN

    @classmethod
    def get(cls, ale_py, params: AtariParams, num_threads: int) -> _Host:
        with cls._lock:
            key = (params, num_threads)
            if key not in cls._hosts:
                cls._hosts[key] = _Host(ale_py, params, num_threads)
            return cls._hosts[key]

    @classmethod
    def close_all(cls) -> None:
        """Free every worker emulator (at exit, before the interpreter tears ale-py down)."""
        with cls._lock:
            for host in cls._hosts.values():
                if host.pool is not None:
                    host.pool.shutdown()
                host.workers.clear()
            cls._hosts.clear()

    def _map(self, fn, count: int) -> None:
        """fn(worker, i) for i < count, the batch split into contiguous chunks, one per worker."""
        with self.busy:
            if self.pool is None:
                for i in range(count):
                    fn(self.workers[0], i)
                return
            chunks = np.array_split(np.arange(count), len(self.workers))
            futures = [self.pool.submit(lambda w, idx: [fn(w, int(i)) for i in idx], w, idx)
                       for w, idx in zip(self.workers, chunks, strict=True)]
            for future in futures:
                future.result()

    def _outputs(self, count: int, step: bool) -> dict:
        out = {"emulator": np.zeros((count, self.state_bytes), np.uint8),
               "frame": np.zeros((count,) + self.screen + (3,), np.uint8),
               "lives": np.zeros((count,), np.int32), "last_action": np.zeros((count,), np.int32),
               "score": np.zeros((count,), np.float32)}
        if step:
            out.update(reward=np.zeros((count,), np.float32),
                       terminated=np.zeros((count,), np.bool_), truncated=np.zeros((count,), np.bool_),
                       game_over=np.zeros((count,), np.bool_),
                       episode_score=np.zeros((count,), np.float32))
        return out

    def reset(self, noops, seed):
        batch = np.shape(noops)
        noops, seed = np.reshape(noops, -1), np.reshape(seed, -1)
        out = self._outputs(noops.shape[0], step=False)
        self._map(lambda w, i: w.reset_one(int(noops[i]), int(seed[i]), out, i), noops.shape[0])
        return {k: v.reshape(batch + v.shape[1:]) for k, v in out.items()}

    def step(self, inp: dict):
        batch = np.shape(inp["action"])
        inp = {k: np.reshape(np.asarray(v), (-1,) + np.shape(v)[len(batch):]) for k, v in inp.items()}
        count = inp["action"].shape[0]
        out = self._outputs(count, step=True)
        self._map(lambda w, i: w.step_one(inp, out, i), count)
        return {k: v.reshape(batch + v.shape[1:]) for k, v in out.items()}


atexit.register(_Host.close_all)


def _area_block(size_in: int, size_out: int) -> tuple[int, np.ndarray]:
    """`_area_weights` is block diagonal with g = gcd(in, out) equal blocks [out/g, in/g] (the grid
    repeats every in/g source pixels): returns (g, block), so resampling costs O(in · out/g)."""
    g = math.gcd(size_in, size_out)
    return g, _area_weights(size_in // g, size_out // g)


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """Area resampling as a matrix [out, in]: W[d, s] = |[s, s+1] ∩ [d·r, (d+1)·r]| / r, r = in/out
    (OpenCV's INTER_AREA for shrinking, which the reference's WarpFrame uses)."""
    ratio = size_in / size_out
    lo = np.arange(size_out)[:, None] * ratio
    src = np.arange(size_in)[None, :]
    overlap = np.clip(np.minimum(src + 1, lo + ratio) - np.maximum(src, lo), 0.0, None)
    return (overlap / ratio).astype(np.float32)


class AtariEnv:
    """gymnax-style Atari environment (see the module docstring). Build it with `make_env`."""

    def __init__(self, params: AtariParams, num_threads: int = 1):
        self.params = params
        self._host = _Host.get(_import_ale(), params, num_threads)
        self.num_actions = self._host.num_actions
        height, width = self._host.screen
        (self._gy, wy), (self._gx, wx) = _area_block(height, OBS_SIZE), _area_block(width, OBS_SIZE)
        self._wy, self._wx = jnp.asarray(wy), jnp.asarray(wx)

    @property
    def name(self) -> str:
        return f"ALE/{_rom_id_to_name(self.params.game)}-v5"

    @property
    def default_params(self) -> AtariParams:
        return self.params

    def observation_space(self, params: AtariParams | None = None):
        from gymnax.environments import spaces
        return spaces.Box(0, 255, (OBS_SIZE, OBS_SIZE, STACK), jnp.uint8)

    def action_space(self, params: AtariParams | None = None):
        from gymnax.environments import spaces
        return spaces.Discrete(self.num_actions)

    def _check_params(self, params) -> None:
        require(params is None or params == self.params,
                f"this environment was built for {self.params}; got params {params}")

    def _preprocess(self, rgb: Array) -> Array:
        """RGB frame [H, W, 3] uint8 -> grey [84, 84] uint8: ITU-R 601 luma in OpenCV's fixed point
        (RGB2GRAY), then area resampling rounded to nearest (INTER_AREA), as the reference's WarpFrame."""
        rgb = rgb.astype(jnp.int32)
        grey = (rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2] + (1 << 13)) >> 14
        x = grey.astype(jnp.float32).reshape(grey.shape[:-2] + (self._gy, -1, self._gx, self._wx.shape[1]))
        x = jnp.einsum("...aibj,ki,lj->...akbl", x, self._wy, self._wx, precision=lax.Precision.HIGHEST)
        x = x.reshape(grey.shape[:-2] + (OBS_SIZE, OBS_SIZE))
        return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)

    def _draws(self, key: Array) -> tuple[Array, Array]:
        """The per-step randomness: no-op count in 1..noop_max and a seed for sticky actions."""
        noop_key, seed_key = jax.random.split(key)
        noops = jax.random.randint(noop_key, (), 1, self.params.noop_max + 1, dtype=jnp.int32)
        return noops, jax.random.bits(seed_key, (), jnp.uint32)

    def _shapes(self, step: bool) -> dict:
        u8, i32, f32 = jnp.uint8, jnp.int32, jnp.float32
        shapes = {"emulator": jax.ShapeDtypeStruct((self._host.state_bytes,), u8),
                  "frame": jax.ShapeDtypeStruct(self._host.screen + (3,), u8),
                  "lives": jax.ShapeDtypeStruct((), i32), "last_action": jax.ShapeDtypeStruct((), i32),
                  "score": jax.ShapeDtypeStruct((), f32)}
        if step:
            shapes.update(reward=jax.ShapeDtypeStruct((), f32),
                          terminated=jax.ShapeDtypeStruct((), jnp.bool_),
                          truncated=jax.ShapeDtypeStruct((), jnp.bool_),
                          game_over=jax.ShapeDtypeStruct((), jnp.bool_),
                          episode_score=jax.ShapeDtypeStruct((), f32))
        return shapes

    def reset(self, key: Array, params: AtariParams | None = None) -> tuple[Array, AtariState]:
        """A new game (no-ops and FIRE as the reference) -> (obs [84, 84, 4] uint8, state)."""
        self._check_params(params)
        noops, seed = self._draws(key)
        out = jax.pure_callback(self._host.reset, self._shapes(step=False), noops, seed,
                                vmap_method="broadcast_all")
        frames = jnp.zeros((OBS_SIZE, OBS_SIZE, STACK), jnp.uint8).at[..., -1].set(
            self._preprocess(out["frame"]))
        state = AtariState(out["emulator"], frames, out["lives"], out["last_action"], out["score"])
        return frames, state

    def step(self, key: Array, state: AtariState, action: Array, params: AtariParams | None = None):
        """One agent step (4 frames) with auto-reset ->
        (obs [84, 84, 4] uint8, state, reward [] float32 (clipped to its sign unless clip_rewards is
        off), terminated [] bool (life lost or game over), truncated [] bool (frame limit), info).

        info: game_over [] bool (the game really ended), episode_score [] float32 (its unclipped
        score, 0 otherwise), score [] float32 (this step's unclipped reward), lives [] int32.
        """
        self._check_params(params)
        noops, seed = self._draws(key)
        inp = {"emulator": state.emulator, "lives": state.lives, "last_action": state.last_action,
               "score": state.score, "action": jnp.asarray(action, jnp.int32), "noops": noops,
               "seed": seed}
        out = jax.pure_callback(self._host.step, self._shapes(step=True), inp,
                                vmap_method="broadcast_all")
        done = jnp.logical_or(out["terminated"], out["truncated"])
        frame = self._preprocess(out["frame"])
        shifted = jnp.concatenate([state.frames[..., 1:], frame[..., None]], axis=-1)
        cleared = jnp.zeros_like(state.frames).at[..., -1].set(frame)
        frames = jnp.where(done, cleared, shifted)
        reward = jnp.sign(out["reward"]) if self.params.clip_rewards else out["reward"]
        new_state = AtariState(out["emulator"], frames, out["lives"], out["last_action"], out["score"])
        info = {"game_over": out["game_over"], "episode_score": out["episode_score"],
                "score": out["reward"], "lives": out["lives"]}
        return frames, new_state, reward, out["terminated"], out["truncated"], info


def game_names() -> list[str]:
    """Every ALE game as the names `make_env` accepts (needs ale-py)."""
    _import_ale()
    from ale_py import roms
    return [f"ALE/{_rom_id_to_name(rom)}-v5" for rom in roms.get_all_rom_ids()]


def make_env(name: str, *, noop_max: int = 30, repeat_action_probability: float = 0.0,
             episodic_life: bool = True, fire_reset: bool = True, clip_rewards: bool = True,
             max_episode_frames: int = 400_000, num_threads: int = 1) -> tuple[AtariEnv, AtariParams]:
    """`ALE/<Game>-v5` -> (env, params) with the reference's Atari preprocessing (module docstring).

    num_threads: worker emulators stepping contiguous parts of one batch in threads (a speed-up
    only where ale-py's act runs outside the GIL and spare cores exist; not measured to help on a
    loaded 2-core machine). Results do not depend on it.
    """
    match = NAME_PATTERN.match(name) if isinstance(name, str) else None
    require(match is not None, f"unknown Atari environment {name!r}; allowed: ALE/<Game>-v5, e.g. "
                               "ALE/Breakout-v5, ALE/Pong-v5")
    _import_ale()
    from ale_py import roms
    by_name = {_rom_id_to_name(rom): rom for rom in roms.get_all_rom_ids()}
    game = match.group(1)
    require(game in by_name, f"unknown Atari game {game!r} in {name!r}; allowed: "
                             f"{', '.join(sorted(by_name))}")
    require(isinstance(noop_max, int) and noop_max >= 1, f"noop_max must be an integer >= 1, got {noop_max}")
    require(0.0 <= repeat_action_probability < 1.0,
            f"repeat_action_probability must lie in [0, 1), got {repeat_action_probability}")
    require(isinstance(max_episode_frames, int) and max_episode_frames >= 0,
            f"max_episode_frames must be an integer >= 0 (0: no limit), got {max_episode_frames}")
    require(isinstance(num_threads, int) and num_threads >= 1,
            f"num_threads must be an integer >= 1, got {num_threads}")
    params = AtariParams(by_name[game], noop_max, float(repeat_action_probability), bool(episodic_life),
                         bool(fire_reset), bool(clip_rewards), max_episode_frames)
    env = AtariEnv(params, num_threads)
    return env, env.params


__all__ = ["AtariEnv", "AtariParams", "AtariState", "game_names", "make_env"]
