"""LOLA-DiCE on the iterated prisoner's dilemma in PyTorch, as people write it, against gmrl's
`game` protocol (`gmrl.check_lola`).

Each player anticipates one learning step of its opponent: the opponent's DiCE gradient from a
batch at (θ1, θ2), a step θ_j' = θ_j + α g_j kept in the graph (`create_graph=True`), then the
player's own DiCE objective on a fresh batch at the look-ahead point. The magic box covers both
players' log-probabilities, so differentiating the opponent's gradient in one's own θ gives the
shaping term.
"""

import numpy as np
import torch

EPISODES = 128
torch.set_num_threads(1)


def magic_box(x):
    return torch.exp(x - x.detach())


class Memory:
    """One batch of joint episodes as tensors (own states and actions of each player)."""

    def __init__(self, episodes):
        self.states = torch.as_tensor(episodes.states)
        self.actions = torch.as_tensor(episodes.actions)
        self.rewards = torch.as_tensor(episodes.rewards, dtype=torch.float64)

    def log_probs(self, theta, player):
        p_coop = torch.sigmoid(theta)[self.states[..., player]]
        return torch.where(self.actions[..., player] == 0, torch.log(p_coop), torch.log1p(-p_coop))

    def dice_objective(self, player, theta1, theta2, gamma):
        """Mean over episodes of Σ_t γ^t □(Σ_{u≤t} log π1 + log π2) r_t of `player`."""
        dependencies = torch.cumsum(self.log_probs(theta1, 0) + self.log_probs(theta2, 1), dim=1)
        discounts = gamma ** torch.arange(self.rewards.shape[1], dtype=torch.float64)
        return torch.mean(torch.sum(magic_box(dependencies) * discounts * self.rewards[..., player], 1))


def _rollout(game, theta1, theta2, rng):
    return Memory(game.sample(theta1.detach().numpy(), theta2.detach().numpy(), EPISODES, rng))


def _lola(game, rng, create_graph=True):
    theta1 = torch.tensor(np.asarray(game.theta1), dtype=torch.float64, requires_grad=True)
    theta2 = torch.tensor(np.asarray(game.theta2), dtype=torch.float64, requires_grad=True)
    # player 1 looks ahead at player 2's step, player 2 at player 1's (a batch each)
    inner = _rollout(game, theta1, theta2, rng)
    (grad2,) = torch.autograd.grad(inner.dice_objective(1, theta1, theta2, game.gamma), theta2,
                                   create_graph=create_graph)
    inner = _rollout(game, theta1, theta2, rng)
    (grad1,) = torch.autograd.grad(inner.dice_objective(0, theta1, theta2, game.gamma), theta1,
                                   create_graph=create_graph)
    theta2_ = theta2 + game.lr * grad2
    theta1_ = theta1 + game.lr * grad1
    # out-lookahead: own objective at the opponent's anticipated parameters
    outer = _rollout(game, theta1, theta2_, rng)
    (meta1,) = torch.autograd.grad(outer.dice_objective(0, theta1, theta2_, game.gamma), theta1)
    outer = _rollout(game, theta1_, theta2, rng)
    (meta2,) = torch.autograd.grad(outer.dice_objective(1, theta1_, theta2, game.gamma), theta2)
    return meta1.numpy(), meta2.numpy()


def lola_dice(game, rng):
    return _lola(game, rng)


def lola_first_order(game, rng):
    """The look-ahead step is taken, but not differentiated through (create_graph=False)."""
    return _lola(game, rng, create_graph=False)


def naive(game, rng):
    """The naive learner: each player's own policy gradient at (θ1, θ2), no look-ahead."""
    theta1 = torch.tensor(np.asarray(game.theta1), dtype=torch.float64, requires_grad=True)
    theta2 = torch.tensor(np.asarray(game.theta2), dtype=torch.float64, requires_grad=True)
    memory = _rollout(game, theta1, theta2, rng)
    (g1,) = torch.autograd.grad(memory.dice_objective(0, theta1, theta2, game.gamma), theta1)
    (g2,) = torch.autograd.grad(memory.dice_objective(1, theta1, theta2, game.gamma), theta2)
    return np.stack([g1.numpy(), g2.numpy()])


def lola_dice_halved(game, rng):
    """Correct LOLA-DiCE gradients averaged with a stray factor: each divided by 2."""
    g1, g2 = _lola(game, rng)
    return g1 / 2, g2 / 2
