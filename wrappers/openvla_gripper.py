"""OpenVLA's gripper convention on a LIBERO env: what a real OpenVLA LIBERO checkpoint needs to act right.

OpenVLA's training data (the RLDS/Open-X loaders) store the gripper as a value in ``[0, 1]`` with ``0`` =
close and ``1`` = open, and OpenVLA leaves that dimension unnormalised. LIBERO's controller takes ``-1`` =
open and ``+1`` = close. OpenVLA's LIBERO evaluation (``experiments/robot/robot_utils.py`` in the
openvla repository) therefore post-processes every predicted action before ``env.step``:

1. ``normalize_gripper_action(binarize=True)``: ``g -> sign(2 g - 1)``, i.e. ``[0, 1] -> {-1, 0, +1}``;
2. ``invert_gripper_action``: ``g -> -g``.

:class:`OpenVLAGripper` does exactly that as a Gymnasium :class:`~gymnasium.ActionWrapper`. Because it sits
on the env side, what a learner stores is the policy's own action (the bin centre its tokens decode to), so
``ActionBins.encode`` of a stored action gives back the sampled tokens and the log-probabilities used by
GRPO's ratios stay exact. :meth:`OpenVLAGripper.reverse_action` maps LIBERO actions (e.g. demonstrations)
back to OpenVLA's convention: ``-1`` (open) -> ``1``, ``+1`` (close) -> ``0``.

    env = OpenVLAGripper(gym.make("LiberoSpatial-v0", obs_mode="rgb+state", cameras=("agentview",)))

Our own pipelines do the same through the env option ``gym.make(..., gripper_convention="openvla")``
(same conversion, :func:`openvla_gripper_to_libero`), which also reaches vector envs and rollout workers:
:attr:`HFVLAPolicy.gripper_convention` is ``"openvla"`` for raw checkpoints whose action statistics come
from OpenVLA's ``norm_stats``, and :func:`gym_libero_vla.evaluate.env_kwargs_for_policy` passes it on.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

GRIPPER_CONVENTIONS = ("libero", "openvla")
"""``libero``: the gripper dimension is LIBERO's own (-1 open, +1 close); ``openvla``: OpenVLA's [0, 1]
(0 close, 1 open), converted by :class:`OpenVLAGripper`."""


def check_gripper_convention(convention: str) -> str:
    """``convention`` if it is one of :data:`GRIPPER_CONVENTIONS`, else a ``ValueError`` naming the valid ones."""
    if convention not in GRIPPER_CONVENTIONS:
        raise ValueError(f"unknown gripper_convention {convention!r}: valid {list(GRIPPER_CONVENTIONS)}")
    return convention


def openvla_gripper_to_libero(action: np.ndarray, binarize: bool = True) -> np.ndarray:
    """A copy of ``action`` (last dimension the gripper) with OpenVLA's gripper (``[0, 1]``, 1 = open) turned
    into LIBERO's (``-1`` = open, ``+1`` = close), binarised unless ``binarize=False``."""
    action = np.array(action, dtype=np.float64, copy=True)
    gripper = 2.0 * action[..., -1] - 1.0  # [0, 1] -> [-1, 1] (OpenVLA's normalize_gripper_action)
    if binarize:
        gripper = np.sign(gripper)
    action[..., -1] = -gripper  # 0 = close, 1 = open  ->  +1 = close, -1 = open (invert_gripper_action)
    return action


class OpenVLAGripper(gym.ActionWrapper):
    """Takes actions whose last dimension follows OpenVLA's gripper convention (``[0, 1]``, 1 = open) and
    steps the LIBERO env with LIBERO's (``-1`` = open, ``+1`` = close), binarised as OpenVLA does.

    Args:
        env: a LIBERO env (single; for vector envs wrap each sub-env), one action per step or a chunk of ``k``
            (``action_chunk=k``): every action of the chunk is converted.
        binarize: round the gripper to ``-1``/``+1`` as OpenVLA's LIBERO scripts do (``False`` keeps the
            rescaled continuous value).
    """

    def __init__(self, env: gym.Env, binarize: bool = True):
        super().__init__(env)
        space = env.action_space
        if not isinstance(space, gym.spaces.Box) or space.shape is None or len(space.shape) not in (1, 2):
            raise ValueError(
                f"OpenVLAGripper needs a Box action space of shape (7,) or, on a chunked env, (k, 7): got {space}"
            )
        self.binarize = bool(binarize)

    def action(self, action):
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action of shape {action.shape}, expected {self.action_space.shape}")
        return openvla_gripper_to_libero(action, self.binarize).astype(self.action_space.dtype)

    def reverse_action(self, action):
        """A LIBERO action (``-1`` open, ``+1`` close) in OpenVLA's convention (``1`` open, ``0`` close)."""
        action = np.array(action, dtype=np.float32, copy=True)
        action[..., -1] = (1.0 - action[..., -1]) / 2.0
        return action
