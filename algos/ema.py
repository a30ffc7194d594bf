"""WeightEMA: an exponential moving average of a policy's trainable weights, for evaluating and deploying them.

Behaviour cloning from pixels moves a small policy's per-task success by 20-40 points from one run (or one
checkpoint) to the next; averaging the weights over the last ~``1 / (1 - decay)`` steps smooths that out (diffusion
policy and most pixel-BC recipes evaluate such an average). After every optimizer step

    averaged <- d_t * averaged + (1 - d_t) * weights,    d_t = min(decay, (1 + t) / (10 + t))

where ``t`` counts the updates (the warm-up keeps the first steps' random weights from dominating, as TensorFlow's
``ExponentialMovingAverage(num_updates=...)``). Fine-tuning from a trained policy (``GRPO(ema_decay=...)``) starts
the average at that policy and has no warm-up (``warmup=False``, ``d_t = decay``): its first steps are not noise to
forget, and the average should leave the starting point only as fast as the decay says.

A learner with one (``SFT(ema_decay=...)``) trains its weights as usual; outside ``learn`` its policy holds the
averaged ones (what ``predict``, evaluation and ``save`` see), the training weights kept aside and written beside
them by ``save`` so that a resumed run continues exactly. :class:`~gym_libero_vla.algos.base.BaseLearner` does the
swapping; this module only keeps the two sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

EMA_FILENAME = "ema_training_weights.pt"


class WeightEMA:
    """The moving average of ``parameters`` (by ``names``, for checkpoints), and which set the parameters hold."""

    def __init__(self, named_parameters: Sequence[tuple[str, torch.nn.Parameter]], decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay {decay!r} must be in (0, 1)")
        self.warmup = bool(warmup)
        self.names = [name for name, _ in named_parameters]
        self.parameters = [parameter for _, parameter in named_parameters]
        self.decay = float(decay)
        self.num_updates = 0
        self.averaged = [parameter.detach().clone() for parameter in self.parameters]
        self._training: list[torch.Tensor] | None = None  # the training weights while the averaged ones are in place

    @property
    def holds_averaged(self) -> bool:
        """Whether the parameters hold the averaged weights now (the training ones kept aside)."""
        return self._training is not None

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the parameters' (training) weights: call after each optimizer step."""
        if self.holds_averaged:
            raise RuntimeError("WeightEMA.update: the parameters hold the averaged weights, not the training ones")
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay
        self.num_updates += 1
        for averaged, parameter in zip(self.averaged, self.parameters):
            averaged.lerp_(parameter.detach(), 1.0 - decay)

    @torch.no_grad()
    def put_averaged(self) -> None:
        """Load the averaged weights into the parameters (the training ones kept aside); no-op if already there."""
        if self.holds_averaged:
            return
        self._training = [parameter.detach().clone() for parameter in self.parameters]
        for parameter, averaged in zip(self.parameters, self.averaged):
            parameter.copy_(averaged)

    @torch.no_grad()
    def put_training(self) -> None:
        """Load the training weights back into the parameters; no-op if they are there."""
        if not self.holds_averaged:
            return
        for parameter, training in zip(self.parameters, self._training):
            parameter.copy_(training)
        self._training = None

    def training_weights(self) -> list[torch.Tensor]:
        return self._training if self.holds_averaged else [parameter.detach() for parameter in self.parameters]

    def state_dict(self) -> dict[str, Any]:
        """The update count and the training weights (the averaged ones are the policy a checkpoint saves)."""
        weights = self.training_weights()
        return {"num_updates": self.num_updates,
                "training_weights": {name: weight.cpu().clone() for name, weight in zip(self.names, weights)}}  # fmt: skip

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint whose policy (now in the parameters) is the averaged weights: the average is taken
        from the parameters, the training weights from ``state`` are kept aside."""
        saved = state["training_weights"]
        missing = [name for name in self.names if name not in saved]
        if missing:
            raise ValueError(f"the EMA checkpoint lacks the training weights of {missing[:3]} (of {len(missing)})")
        self.averaged = [parameter.detach().clone() for parameter in self.parameters]
        self._training = [saved[name].to(parameter.device, parameter.dtype) for name, parameter in
                          zip(self.names, self.parameters)]  # fmt: skip
        self.num_updates = int(state["num_updates"])
