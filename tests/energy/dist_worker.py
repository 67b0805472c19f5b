"""One rank of a 2-process torch.distributed (gloo) job measured by EnergyMonitor with hardware doubles.

Run by tests/energy/test_monitor.py with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set;
argv: powercap root, GPU profile epoch (monotonic seconds), output folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fakes import fake_nvml  # noqa: E402

from m6.config import EnergyConfig  # noqa: E402
from m6.energy.monitor import EnergyMonitor  # noqa: E402
from m6.energy.nvml import open_gpu_sensors  # noqa: E402
from m6.energy.rapl import discover_rapl  # noqa: E402


def main() -> None:
    root, epoch, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    nv = fake_nvml(2, epoch_s=epoch)
    # Both ranks are handed the node's RAPL zones: the monitor must keep them on local rank 0 only.
    sensors = open_gpu_sensors(rank, nvml=nv) + discover_rapl(root)
    mon = EnergyMonitor(EnergyConfig(sample_hz=20), run_id="dist", rank=rank, world_size=world, local_rank=rank,
                        node_id="node-a", sensors=sensors).start()
    x = torch.randn(64, 64)
    with mon.window("train"):
        for step in range(12):
            t_end = time.monotonic() + 0.1
            while time.monotonic() < t_end:
                x = torch.tanh(x @ x.T / 64)
            dist.all_reduce(x)
            mon.step(step, 1000)
    running = mon.totals(reduce=True)
    doc = mon.stop()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "t0_s": mon.t0_s, "t1_s": mon.t1_s, "gpu_uuid": sensors[0].uuid, "kept_sensors": mon.keys,
        "running": running, "doc": doc}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
