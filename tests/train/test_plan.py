"""The capacity planner against the papers' published configurations."""

from __future__ import annotations

import json

import pytest

from m6.cli import main
from m6.config import ModelConfig, preset
from m6.train.plan import Cluster, param_breakdown, parse_size, plan

V100_512 = dict(gpus=512, gpu_mem_bytes=32 * 2**30, gpus_per_node=8, gpu="v100", interconnect="ethernet-100g")


def test_m6_10t_on_512_v100_fits_only_with_offload_and_expert_parallelism():
    # M6-10T (arXiv 2110.03888) trained 10T parameters on 512 32 GB V100s with granular CPU offload.
    r = plan(preset("m6-10t").model, Cluster(**V100_512, cpu_mem_per_node_bytes=4 * 2**40), tokens=1e10)
    assert r["params"]["total"] > 9.9e12
    assert r["fits"] and r["uses_offload"] and r["uses_ep"]
    assert not r["fits_without_offload"] and not r["fits_without_ep"]
    assert r["best"]["gpu_total_bytes"] <= 0.9 * 32 * 2**30


def test_m6_10t_without_enough_host_memory_says_what_would_fit():
    r = plan(preset("m6-10t").model, Cluster(**V100_512, cpu_mem_per_node_bytes=1 * 2**40), tokens=1e10)
    assert not r["fits"] and r["best"] is None
    assert "host memory" in r["advice"] and "GiB" in r["advice"]


def test_megatron_1t_dense_on_3072_a100_takes_about_84_days():
    # Narayanan et al. 2021: 1T GPT, 3072 A100, 52% of peak, 450B tokens ≈ 84 days (with recompute, 8·P·T FLOPs).
    gpt = ModelConfig(name="gpt-1t", vocab_size=51200, d_model=25600, n_layers=128, n_heads=160, d_ff=102400,
                      moe_every=0, max_text_len=2048, image_size=32, patch_size=32, contrastive_dim=64)
    r = plan(gpt, Cluster(gpus=3072, gpu_mem_bytes=80 * 2**30, gpu="a100", interconnect="ib-hdr",
                          cpu_mem_per_node_bytes=2**40), tokens=450e9, mfu=0.52)
    assert r["fits"]
    assert r["best"]["days"] == pytest.approx(84, rel=0.03)
    assert r["best"]["energy_kwh"] > 0


@pytest.mark.parametrize(("name", "total"), [("m6-100b", 100e9), ("m6-1t", 1e12), ("m6-10t", 10e12)])
def test_paper_presets_have_their_published_sizes_and_experts_dominate(name, total):
    pb = param_breakdown(preset(name).model)
    assert pb.total == pytest.approx(total, rel=0.1)
    assert pb.expert > 10 * pb.dense and pb.active < pb.total / 10


def test_plan_command_prints_json_and_rejects_bad_sizes(capsys):
    assert main(["plan", "--preset", "m6-10t", "--gpus", "512", "--gpu-mem", "32GB", "--gpu", "v100",
                 "--cpu-mem-per-node", "4TB", "--tokens", "1e10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["best"]["ep_size"] > 1
    assert main(["plan", "--preset", "tiny", "--gpus", "1", "--gpu-mem", "lots", "--tokens", "1e6"]) == 2
    assert "bad size 'lots'" in capsys.readouterr().err
    assert parse_size("1.5TB") == 1.5 * 2**40
