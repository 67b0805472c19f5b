"""Training metrics: JSON lines, a progress line with ETA, and Prometheus gauges on ``/metrics``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from m6 import storage

log = logging.getLogger("m6.train")
OBJECTIVES = ("text", "caption", "mm", "contrastive")


class TrainMetrics:
    """Accumulates per-step figures on every rank; :meth:`flush` reduces them and rank 0 records them."""

    def __init__(self, out_uri: str, *, rank: int, world: int, total_steps: int, flops_per_token: float,
                 peak_flops_per_rank: float, registry: Any = None, start_step: int = 0):
        self.out_uri, self.rank, self.world = out_uri, rank, world
        self.total_steps, self.flops_per_token, self.peak = total_steps, flops_per_token, peak_flops_per_rank
        self.lines: list[dict] = []
        self.t_start = self.t_last = time.monotonic()
        self.last_step = start_step
        self.tokens_total = 0
        """Job-wide tokens since this process started (the energy figures cover the same span)."""
        """The step count at the previous flush: the ETA uses the latest interval's rate (start-up excluded)."""
        self._reset()
        self.gauges = _gauges(registry) if registry is not None else None

    def _reset(self) -> None:
        self.loss_sum = {o: 0.0 for o in OBJECTIVES}
        self.loss_n = {o: 0 for o in OBJECTIVES}
        self.tokens = 0
        self.target_tokens = 0
        self.t_last = time.monotonic()

    def add(self, objective: str, loss: float, tokens: int, target_tokens: int) -> None:
        self.loss_sum[objective] += loss
        self.loss_n[objective] += 1
        self.tokens += tokens
        self.target_tokens += target_tokens

    def flush(self, step: int, *, lr: float, grad_norm: float, moe: list[dict], device: Any,
              energy_j: tuple[float, float] | None = None) -> dict | None:
        """Reduce the interval over ranks (collective); rank 0 appends a JSON line and logs progress.

        Args:
            energy_j: this rank's (measured, estimated) joules since its monitor started; summed over
                ranks in the same collective (node-level sensors are read by one rank per node only).
        """
        import torch
        import torch.distributed as dist

        vec = torch.tensor([*(self.loss_sum[o] for o in OBJECTIVES), *(self.loss_n[o] for o in OBJECTIVES),
                            self.tokens, self.target_tokens, *(energy_j or ())], dtype=torch.float64, device=device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(vec)
        v = vec.tolist()
        now = time.monotonic()
        dt = max(1e-9, now - self.t_last)
        losses = {o: v[i] / v[4 + i] for i, o in enumerate(OBJECTIVES) if v[4 + i] > 0}
        n = sum(v[4:8])
        tokens_per_s = v[8] / dt
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.world)
        eta_s = dt / max(1, step + 1 - self.last_step) * (self.total_steps - step - 1)
        self.last_step = step + 1
        self.tokens_total += int(v[8])
        rec = {"step": step + 1, "loss": sum(v[:4]) / max(1, n), **{f"loss_{o}": x for o, x in losses.items()},
               "lr": lr, "tokens": int(v[8]), "target_tokens": int(v[9]), "tokens_per_s": tokens_per_s, "mfu": mfu,
               "grad_norm": grad_norm, "elapsed_s": now - self.t_start, "eta_s": eta_s,
               "moe": [{"layer": s["layer"], "load_cv": s["load_cv"], "drop_rate": s["drop_rate"],
                        "router_entropy": s["router_entropy"]} for s in moe]}
        if energy_j is not None:
            rec.update(energy_j=v[10] + v[11], energy_measured_j=v[10], energy_estimated_j=v[11],
                       j_per_token=(v[10] + v[11]) / max(1, self.tokens_total))
        self._reset()
        if self.gauges is not None:
            _update(self.gauges, rec)
        if self.rank != 0:
            return rec
        self.lines.append(rec)
        with_obj = " ".join(f"{o} {x:.3f}" for o, x in losses.items())
        energy = ""
        if energy_j is not None:
            kind = "estimated" if rec["energy_estimated_j"] > rec["energy_measured_j"] else "measured"
            j = rec["energy_j"]
            amount = f"{j / 1e3:.2f} kJ" if j >= 1e3 else f"{j:.1f} J"
            energy = f" energy {amount} ({kind}, {1e3 * rec['j_per_token']:.3f} mJ/token)"
        log.info("step %d/%d loss %.4f (%s) %.0f tok/s mfu %.2f%% lr %.2e gnorm %.3f%s ETA %s",
                 step + 1, self.total_steps, rec["loss"], with_obj, tokens_per_s, 100 * mfu, lr, grad_norm,
                 energy, _hms(eta_s))
        return rec

    def write(self) -> None:
        """Rank 0: rewrite ``metrics.jsonl`` (S3 objects cannot be appended to)."""
        if self.rank == 0:
            storage.write_text(storage.join(self.out_uri, "metrics.jsonl"),
                               "".join(json.dumps(r) + "\n" for r in self.lines))


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _gauges(registry: Any) -> dict:
    from prometheus_client import Counter, Gauge

    return {
        "loss": Gauge("m6_train_loss", "Training loss over the last log interval", ["objective"], registry=registry),
        "lr": Gauge("m6_train_learning_rate", "Current learning rate", registry=registry),
        "tps": Gauge("m6_train_tokens_per_second", "Job-wide training tokens per second", registry=registry),
        "mfu": Gauge("m6_train_mfu_ratio", "Estimated model FLOPs utilisation (0-1)", registry=registry),
        "gnorm": Gauge("m6_train_grad_norm", "Global gradient norm before clipping", registry=registry),
        "step": Gauge("m6_train_step", "Last completed optimizer step", registry=registry),
        "tokens": Counter("m6_train_tokens", "Job-wide tokens trained on", registry=registry),
        "cv": Gauge("m6_train_expert_load_cv", "Coefficient of variation of tokens per expert", ["layer"],
                    registry=registry),
        "drop": Gauge("m6_train_expert_drop_ratio", "Share of expert assignments dropped", ["layer"], registry=registry),
    }


def _update(g: dict, rec: dict) -> None:
    g["loss"].labels("all").set(rec["loss"])
    for o in OBJECTIVES:
        if f"loss_{o}" in rec:
            g["loss"].labels(o).set(rec[f"loss_{o}"])
    g["lr"].set(rec["lr"])
    g["tps"].set(rec["tokens_per_s"])
    g["mfu"].set(rec["mfu"])
    if rec["grad_norm"] == rec["grad_norm"]:
        g["gnorm"].set(rec["grad_norm"])
    g["step"].set(rec["step"])
    g["tokens"].inc(rec["tokens"])
    for s in rec["moe"]:
        g["cv"].labels(str(s["layer"])).set(s["load_cv"])
        g["drop"].labels(str(s["layer"])).set(s["drop_rate"])
