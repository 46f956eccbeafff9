from __future__ import annotations

import pytest
import torch

from mmiad.utils.threads import single_thread_on_cpu


def test_one_thread_inside_on_cpu_restored_after_even_on_error() -> None:
    before = torch.get_num_threads()
    with single_thread_on_cpu("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), single_thread_on_cpu(torch.device("cpu")):
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_other_devices_keep_the_thread_count() -> None:
    before = torch.get_num_threads()
    with single_thread_on_cpu("meta"):
        assert torch.get_num_threads() == before
