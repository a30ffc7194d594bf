"""Helpers of gym_libero_vla.policies.base that every learner and script uses: devices, threads, observation batches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gym_libero_vla.policies import ThreadConfig, resolve_device, torch_threads
from gym_libero_vla.policies.base import batch_observation, stack_observations


def test_resolve_device_gives_what_this_machine_has_and_names_the_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu': valid 'cpu', 'cuda', 'cuda:<index>', 'mps' or 'auto'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"unknown device 'meta'"):
        resolve_device("meta")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: none on a CPU machine
    with pytest.raises(ValueError, match=rf"device '{missing}' is not available on this machine: valid here \['cpu'"):
        resolve_device(missing)
    if torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cuda")


def test_stack_observations_batches_single_env_observations():
    first = {"instruction": "open the drawer", "state": np.zeros(3, np.float32), "task_id": 2}
    second = {"instruction": "close it", "state": np.ones(3, np.float32), "task_id": 5}
    batch = stack_observations([first, second])
    assert batch["instruction"] == ["open the drawer", "close it"]
    np.testing.assert_array_equal(batch["state"], [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(batch["task_id"], [2, 5])
    one = batch_observation(first)
    assert {key: np.asarray(value).tolist() for key, value in stack_observations([first]).items()} == {
        key: np.asarray(value).tolist() for key, value in one.items()
    }
    with pytest.raises(ValueError, match="no observations to stack"):
        stack_observations([])


def test_torch_threads_sets_the_count_inside_the_block_and_restores_it():
    before = torch.get_num_threads()
    with torch_threads(None) as every_core:
        assert every_core == len(os.sched_getaffinity(0)) == torch.get_num_threads()  # the cores it may run on
        with pytest.raises(RuntimeError, match="inside"), torch_threads(3):
            assert torch.get_num_threads() == 3
            raise RuntimeError("inside")
        assert torch.get_num_threads() == every_core  # restored after an error too
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"torch threads 0 must be >= 1 \(or None for every core\)"), torch_threads(0):
        pass


def test_thread_config_refuses_counts_below_one_naming_the_field():
    assert ThreadConfig().sft_torch_threads is None and ThreadConfig(2, 2).torch_threads == 2
    with pytest.raises(ValueError, match=r"sft_torch_threads 0 must be an int >= 1 \(or omitted for every core\)"):
        ThreadConfig(sft_torch_threads=0)
    with pytest.raises(ValueError, match=r"torch_threads 1.5 must be an int >= 1$"):
        ThreadConfig(torch_threads=1.5)
