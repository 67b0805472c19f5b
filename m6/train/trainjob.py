"""Kubeflow Trainer v2 ``TrainJob`` for a training run: build, validate, submit, follow, clean up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from m6.errors import UserError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
CONTAINER = "node"
"""The trainer container (and replicated job) name in the torch-distributed runtime."""


@dataclass(kw_only=True)
class JobSpec:
    """Cluster-side settings of one TrainJob.

    Attributes:
        name: the TrainJob's name (DNS-1123). image: the m6 container image.
        args: arguments after ``m6 train`` (the worker reads them as on the command line).
        num_nodes / gpus_per_node: the job's shape. cpu / memory: requests per node.
        shm_size: the ``/dev/shm`` memory volume (NCCL and data loaders need more than 64 MiB).
        node_selector / tolerations: place pods on the GPU node pool.
        s3_secret: a Secret with ``access_key``/``secret_key`` (and optional ``endpoint``) keys.
    """

    name: str
    image: str
    args: list[str]
    namespace: str = "default"
    num_nodes: int = 1
    gpus_per_node: int = 1
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = field(default_factory=lambda: {"m6.io/pool": "gpu"})
    tolerations: list[dict[str, str]] = field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    s3_secret: str = "m6-s3"
    s3_endpoint: str | None = None
    active_deadline_s: int | None = None


def build_trainjob(spec: JobSpec) -> dict[str, Any]:
    """The TrainJob object (a plain dict, as the Kubernetes API takes it)."""
    if spec.num_nodes < 1 or spec.gpus_per_node < 0:
        raise UserError("trainjob: num_nodes must be >= 1 and gpus_per_node >= 0")
    secret_env = [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key, "optional": opt}}}
        for env, key, opt in (("M6_S3_ACCESS_KEY", "access_key", False), ("M6_S3_SECRET_KEY", "secret_key", False),
                              ("M6_S3_ENDPOINT", "endpoint", True))
    ]
    env = secret_env if spec.s3_endpoint is None else [
        *secret_env[:2], {"name": "M6_S3_ENDPOINT", "value": spec.s3_endpoint}]
    requests = {"cpu": spec.cpu, "memory": spec.memory}
    limits: dict[str, str] = {}
    if spec.gpus_per_node:
        requests["nvidia.com/gpu"] = str(spec.gpus_per_node)
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    trainer: dict[str, Any] = {
        "image": spec.image,
        # torchrun takes --nnodes/--nproc-per-node/--node-rank/--master-* from the PET_* variables
        # the torch-distributed runtime injects; each process is one rank of `m6 train --worker`.
        "command": ["torchrun", "-m", "m6", "train", "--worker"],
        "args": list(spec.args),
        "numNodes": spec.num_nodes,
        "numProcPerNode": max(1, spec.gpus_per_node),
        "env": env,
        "resourcesPerNode": {"requests": requests, **({"limits": limits} if limits else {})},
    }
    pod_spec = {
        "nodeSelector": dict(spec.node_selector),
        "tolerations": [dict(t) for t in spec.tolerations],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
        "containers": [{"name": CONTAINER, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/part-of": "m6"}},
        "spec": {
            "runtimeRef": {"name": RUNTIME, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": trainer,
            "runtimePatches": [{
                "manager": "m6.io/train",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                    {"name": CONTAINER, "template": {"spec": {"template": {"spec": pod_spec}}}}]}}},
            }],
        },
    }
    if spec.active_deadline_s:
        body["spec"]["activeDeadlineSeconds"] = int(spec.active_deadline_s)
    return body


def _dropped(original: Any, kept: Any, where: str) -> list[str]:
    """Paths present in ``original`` but missing from ``kept`` (fields the model does not know)."""
    out: list[str] = []
    if isinstance(original, dict):
        kept = kept if isinstance(kept, dict) else {}
        for k, v in original.items():
            if k not in kept:
                out.append(f"{where}.{k}")
            else:
                out.extend(_dropped(v, kept[k], f"{where}.{k}"))
    elif isinstance(original, list):
        kept = kept if isinstance(kept, list) else []
        for i, v in enumerate(original):
            out.extend(_dropped(v, kept[i] if i < len(kept) else None, f"{where}[{i}]"))
    return out


def validate_trainjob(obj: dict[str, Any]) -> None:
    """Check ``obj`` against the ``kubeflow-trainer-api`` models; unknown fields are errors.

    Raises:
        UserError: naming the first bad or unknown field path.
    """
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    try:
        model = TrainerV1alpha1TrainJob.from_dict(obj)
    except Exception as e:  # pydantic's ValidationError names the field path
        raise UserError(f"TrainJob does not validate: {e}") from None
    # The generated models silently drop keys they do not know; a round trip exposes them.
    unknown = _dropped(obj, model.to_dict(), "TrainJob")
    if unknown:
        raise UserError(f"TrainJob has unknown field(s): {', '.join(unknown)}")


def submit(obj: dict[str, Any], *, timeout_s: float = 86400.0, poll_s: float = 10.0, follow_logs: bool = True,
           delete_on_exit: bool = True, api_client: Any = None) -> dict[str, Any]:
    """Create the TrainJob, stream its trainer logs, wait for Complete/Failed and delete it.

    Returns:
        ``{"name", "status": "Complete"|"Failed"|"Timeout", "reason", "message", "duration_s"}``.

    Raises:
        UserError: when the cluster cannot be reached or the job fails (with the reason the controller gave).
    """
    from kubernetes import client, config

    validate_trainjob(obj)
    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except Exception as e:
                raise UserError(f"no Kubernetes cluster configured: {e}") from None
    api = client.CustomObjectsApi(api_client)
    core = client.CoreV1Api(api_client)
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, obj)
    except client.ApiException as e:
        raise UserError(f"creating TrainJob {ns}/{name} failed: {e.status} {e.reason}: {e.body}") from None
    t0 = time.monotonic()
    seen_lines: dict[str, int] = {}
    result = {"name": name, "status": "Timeout", "reason": "", "message": ""}
    try:
        while time.monotonic() - t0 < timeout_s:
            job = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            if follow_logs:
                _stream_logs(core, ns, name, seen_lines)
            for cond in (job.get("status") or {}).get("conditions") or []:
                if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
                    result.update(status=cond["type"], reason=cond.get("reason", ""), message=cond.get("message", ""))
            if result["status"] != "Timeout":
                break
            time.sleep(poll_s)
    finally:
        if delete_on_exit:
            try:
                api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            except client.ApiException as e:
                log.warning("deleting TrainJob %s/%s: %s", ns, name, e.reason)
    result["duration_s"] = time.monotonic() - t0
    if result["status"] != "Complete":
        raise UserError(f"TrainJob {ns}/{name} {result['status']}: {result['reason']} {result['message']}".strip())
    return result


def _stream_logs(core: Any, ns: str, name: str, seen: dict[str, int]) -> None:
    """Print new trainer log lines of the job's pods, prefixed by pod name."""
    pods = core.list_namespaced_pod(ns, label_selector=f"jobset.sigs.k8s.io/jobset-name={name}").items
    for pod in pods:
        pname = pod.metadata.name
        try:
            text = core.read_namespaced_pod_log(pname, ns, container=CONTAINER)
        except Exception:  # the container has not started yet
            continue
        lines = text.splitlines()
        for line in lines[seen.get(pname, 0):]:
            print(f"[{pname}] {line}", flush=True)
        seen[pname] = len(lines)
