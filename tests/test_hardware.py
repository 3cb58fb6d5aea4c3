"""The hardware catalog: figures, lookups and the torch-free import."""

import subprocess
import sys

import pytest

from supercluster.errors import UserError
from supercluster.hardware import ACCELERATORS, NODE_TYPES, accelerator, default_node_type, node_type


def test_every_accelerator_has_sane_figures():
    assert set(ACCELERATORS) >= {"a100-40gb", "a100-80gb", "h100", "h200", "mi300x", "b200"}
    for acc in ACCELERATORS.values():
        assert acc.peak("bf16") > 100
        assert acc.peak("tf32") == pytest.approx(acc.peak("bf16") / 2, rel=0.03)  # tensor cores: TF32 at half rate
        assert 30 < acc.hbm_gib < 200 and 1 < acc.hbm_tbps < 10 and acc.scale_up_gbps >= 400  # H800: 400
        if acc.peak_tflops.get("fp8"):
            assert acc.peak("fp8") == pytest.approx(2 * acc.peak("bf16"), rel=0.01)


def test_published_h100_figures():
    h100 = accelerator("h100")
    assert h100.peak("bf16") == pytest.approx(989.4) and h100.hbm_tbps == 3.35
    nd = node_type("nd-h100-v5")
    assert (nd.accelerator, nd.gpus_per_node, nd.scale_up_gbps, nd.scale_out_gbps_per_gpu) == ("h100", 8, 900, 400)


def test_gpu_variants_differ_where_their_datasheets_do():
    """H800: H100 compute with NVLink cut to 400 GB/s; the 96 GB board at 500 W; H200's HBM;
    B200's NVLink 5 and MXFP8 units."""
    h100, h800, gt96, h200, b200 = (accelerator(n) for n in ("h100", "h800", "h100-96gb", "h200", "b200"))
    assert h800.peak("bf16") == h100.peak("bf16") and h800.scale_up_gbps < h100.scale_up_gbps / 2
    assert gt96.power_w == 500 and gt96.peak("bf16") < h100.peak("bf16") and gt96.hbm_gib > h100.hbm_gib
    assert h200.hbm_gib > 1.7 * h100.hbm_gib and h200.hbm_tbps > h100.hbm_tbps
    assert b200.nvlink_gen == 5 and b200.mx_formats and not h100.mx_formats
    assert default_node_type("h800").scale_up_gbps == 400


def test_azure_health_pass_marks():
    marks = {name: (n.allreduce_busbw_gbps, n.h2d_gbps, n.d2d_gbps, n.ib_gbps_per_port) for name, n in NODE_TYPES.items()}
    assert marks["nd-h100-v5"] == (460, 48, 335, 380)
    assert marks["nd-h200-v5"] == (431, 48, 335, 360)
    assert marks["nd-a100-v4"] == (228, 21, 235, 180)
    assert node_type("Standard_ND96isr_H200_v5").name == "nd-h200-v5"


def test_node_types_point_at_known_accelerators():
    for n in NODE_TYPES.values():
        assert n.accelerator in ACCELERATORS and n.gpus_per_node in (8, 72)  # 72: one GB200 NVL72 NVLink domain
        assert n.scale_up_gbps == ACCELERATORS[n.accelerator].scale_up_gbps
    assert default_node_type("a100").accelerator == "a100-80gb"


def test_unknown_names_suggest_the_closest():
    with pytest.raises(UserError, match="did you mean 'h100'"):
        accelerator("h1000")
    with pytest.raises(UserError, match="did you mean 'nd-h100-v5'"):
        node_type("nd-h100-v4")
    with pytest.raises(UserError, match="no fp8"):
        accelerator("a100-80gb").peak("fp8")


def test_catalog_imports_without_torch():
    code = "import sys, supercluster.hardware, supercluster.hardware.device; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtime_device_names_map_to_the_catalog():
    from supercluster.hardware.catalog import match_device_name

    assert match_device_name("NVIDIA A100-SXM4-40GB").name == "a100-40gb"
    assert match_device_name("NVIDIA H100 80GB HBM3").name == "h100"
    assert match_device_name("AMD Instinct MI300X").name == "mi300x"
    assert match_device_name("NVIDIA H100 PCIe") is None  # other clocks than the SXM part
    assert match_device_name("cpu") is None


def test_best_rate_keeps_the_fastest_of_synced_repeats():
    from supercluster.hardware.timing import best_rate

    calls = []
    rate = best_rate(lambda: calls.append("work"), units=1000.0, seconds=0.0, min_repeats=3,
                     sync=lambda: calls.append("sync"))
    assert calls == ["work", "sync"] * 4  # one warm-up, then three timed calls, each waited for
    assert rate > 0


def test_local_devices_agree_with_torch():
    """The one place devices are detected; on a machine without accelerators, the CPU."""
    import torch

    from supercluster.hardware.device import device_name, local_devices, select_device

    found = local_devices()
    if torch.accelerator.is_available():
        assert found.type == torch.accelerator.current_accelerator().type
        assert found.count == torch.accelerator.device_count() and found.name
        assert select_device(found.count + 1) == torch.device(found.type, 1 % found.count)  # LOCAL_RANK wraps
    else:
        assert found == type(found)("cpu", 0, "cpu")
        assert select_device(3) == torch.device("cpu") and device_name("cpu") == "cpu"
