"""DeepSpeed JSON generation, the offload spec, the LR schedule, and TrainJob objects."""

from __future__ import annotations

import json

import pytest

from m6.cli import main
from m6.config import ConfigError, TrainConfig
from m6.errors import UserError
from m6.train.dsconfig import deepspeed_config, lr_at, parse_offload
from m6.train.trainjob import JobSpec, build_trainjob, validate_trainjob


def test_offload_spec_fraction_and_layer_list():
    assert parse_offload("none", 4).mode == "none"
    assert parse_offload("granular:0.5", 4).layers == (0, 1)
    assert parse_offload("granular:0.1", 4).layers == (0,)
    assert parse_offload("granular:3,1", 4).layers == (1, 3)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[7\] out of range for a 4-layer model"):
        parse_offload("granular:7", 4)
    with pytest.raises(ConfigError, match="fraction must be in"):
        parse_offload("granular:1.5", 4)
    with pytest.raises(ConfigError, match="train.offload"):
        parse_offload("disk", 4)


def test_deepspeed_json_follows_the_dataclass():
    t = TrainConfig(micro_batch_size=4, grad_accum=2, zero_stage=2, offload="optimizer", grad_clip=0.5)
    ds = deepspeed_config(t, world_size=2, on_gpu=False, n_layers=2)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert deepspeed_config(TrainConfig(), world_size=1, on_gpu=True, n_layers=2)["bf16"]["enabled"] is True


@pytest.mark.parametrize(("kw", "msg"), [
    ({"ep_size": 3}, "does not divide the world size 2"),
    ({"offload": "granular:0.5", "zero_stage": 2}, "granular offload runs with train.zero_stage 0"),
    ({"offload": "optimizer", "zero_stage": 0}, "needs train.zero_stage >= 1"),
    ({"zero_stage": 3}, "contrastive objective cannot run under ZeRO-3"),
    ({"p2r_delink_step": 5, "zero_stage": 2}, "Pseudo-to-Real runs with train.zero_stage 0"),
])
def test_impossible_combinations_are_refused_by_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        deepspeed_config(TrainConfig(**kw), world_size=2, on_gpu=False, n_layers=2)


def test_schedule_warms_up_then_decays_to_the_floor():
    t = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.55, abs=0.01)
    assert lr_at(100, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))


def test_trainjob_validates_against_the_trainer_api_models():
    obj = build_trainjob(JobSpec(name="m6-base", image="m6:1", args=["--preset", "base"], num_nodes=4, gpus_per_node=8))
    validate_trainjob(obj)
    spec = obj["spec"]
    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["numNodes"] == 4 and spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory" and pod["nodeSelector"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e for e in spec["trainer"]["env"]}
    assert env["M6_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "m6-s3"


def test_trainjob_with_unknown_or_mistyped_fields_is_rejected():
    obj = build_trainjob(JobSpec(name="x", image="m6:1", args=[]))
    obj["spec"]["trainer"]["gpus"] = 8
    with pytest.raises(UserError, match=r"unknown field\(s\): TrainJob.spec.trainer.gpus"):
        validate_trainjob(obj)
    obj = build_trainjob(JobSpec(name="x", image="m6:1", args=[]))
    obj["spec"]["trainer"]["numNodes"] = "four"
    with pytest.raises(UserError, match="numNodes"):
        validate_trainjob(obj)


def test_train_submit_dry_run_prints_a_valid_trainjob(capsys, tmp_path):
    assert main(["train", "--preset", "base", "--data", "s3://b/ds", "--out", "s3://b/runs/r1", "--submit",
                 "--dry-run", "--nodes", "2", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)["trainjob"]
    validate_trainjob(obj)
    args = obj["spec"]["trainer"]["args"]
    assert args[args.index("--resume") + 1] == "auto" and "s3://b/runs/r1" in args


def test_granular_offload_needs_fp32_and_the_trainer_clips_only_fp32_without_zero():
    from m6.train.dsconfig import trainer_clips

    with pytest.raises(ConfigError, match="granular offload runs in fp32"):
        deepspeed_config(TrainConfig(offload="granular:0.5"), world_size=1, on_gpu=True, n_layers=2)
    assert trainer_clips(TrainConfig(zero_stage=0), on_gpu=False)
    assert not trainer_clips(TrainConfig(zero_stage=0), on_gpu=True)  # bf16: DeepSpeed's bf16 optimizer clips
    ds = deepspeed_config(TrainConfig(zero_stage=0, grad_clip=0.7), world_size=1, on_gpu=True, n_layers=2)
    assert ds["gradient_clipping"] == 0.7
