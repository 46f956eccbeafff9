"""``--device`` and ``--precision`` resolution: spelling, availability, autocast semantics."""

from __future__ import annotations

import pytest
import torch

from mmiad.utils.compute import (
    PRECISIONS,
    autocast,
    autocast_dtype,
    available_devices,
    check_device_name,
    check_precision,
    device_present,
    resolve_device,
)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", " CPU "])
def test_device_names_are_checked_without_the_device(name: str) -> None:
    assert check_device_name(name) == name.strip().lower()


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps", ""])
def test_unknown_device_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        check_device_name(name)


def test_auto_is_cuda_exactly_when_torch_sees_one() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert available_devices()[0] == "cpu" and ("cuda" in available_devices()) == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
        resolve_device("cuda:1")
    assert not device_present("cuda") and device_present("cpu") and device_present("auto")


def test_precision_values() -> None:
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    assert autocast_dtype("fp32") is None and autocast_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        check_precision("fp8")


def test_fp32_autocast_changes_nothing_and_bf16_rounds_products(compute_device: str) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 96, generator=generator).to(compute_device)
    b = torch.randn(96, 32, generator=generator).to(compute_device)
    exact = (a.double() @ b.double()).float()
    with autocast(compute_device, "fp32"):
        plain = a @ b
    assert plain.dtype == torch.float32 and torch.equal(plain, a @ b)
    with autocast(compute_device, "bf16"):
        low = a @ b
    assert low.dtype == torch.bfloat16
    # A product of bf16-rounded inputs: each input carries a relative error up to 2^-8, so a 96-term sum of
    # unit-variance products is off by about sqrt(96)·2^-8 ≈ 0.04 in absolute value; fp32 is ~1e-5.
    assert (plain - exact).abs().max() < 1e-4
    assert 1e-4 < (low.float() - exact).abs().max() < 0.5
