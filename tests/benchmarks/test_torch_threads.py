"""``--torch-threads`` is one field (``TorchThreads`` / ``ThreadConfig``) on every CLI: the same flag, the same check,
each CLI's own default kept, and reports that spell it only where it differs from that default."""

from __future__ import annotations

import demo_fit
import env_throughput
import gradient_noise
import learner_throughput
import pytest
import rollout_temperature
import sft_baseline
import sft_vs_grpo
import tyro
from reporting import command_line

from gym_libero_vla.evaluate import EvalArgs

# (Args class, the arguments it requires, its default thread count)
CLIS = [
    (EvalArgs, ["runs/x/policy"], 1),
    (gradient_noise.Args, ["--checkpoint", "runs/x/policy", "--cache", "runs/x/cache"], 1),
    (rollout_temperature.Args, ["--checkpoint", "runs/x/policy"], 1),
    (demo_fit.Args, ["--checkpoint", "runs/x/policy", "--demos", "a.hdf5"], 2),
    (learner_throughput.Args, [], 2),
    (env_throughput.Args, [], 1),
    (sft_baseline.Args, [], 1),
    (sft_vs_grpo.Args, [], 1),
]


@pytest.mark.parametrize(("cls", "required", "default"), CLIS, ids=lambda value: getattr(value, "__module__", None))
def test_every_cli_reads_torch_threads_through_the_one_validated_field(cls, required, default, capsys):
    assert tyro.cli(cls, args=required).threads.torch_threads == default
    assert tyro.cli(cls, args=[*required, "--torch-threads", "3"]).threads.torch_threads == 3
    with pytest.raises(SystemExit):
        tyro.cli(cls, args=[*required, "--torch-threads", "0"])
    assert "torch_threads 0 must be an int >= 1" in capsys.readouterr().err
    assert "--torch-threads" not in command_line(tyro.cli(cls, args=required), "script.py")
