"""Run one trial under torchrun (gloo); rank 0 writes its result and measurements as JSON.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_trial.py OUT CONFIG_JSON
"""
import dataclasses
import json
import sys

import torch.distributed as dist

from study.distributed import exit_rank
from trainers.config import Target, TrialConfig
from trainers.loop import run_trial


def main(out: str, config_json: str) -> None:
    dist.init_process_group("gloo")
    values = json.loads(config_json)
    values["target"] = Target(**values["target"])
    measurements = []
    result = run_trial(TrialConfig(**values), on_measurement=measurements.append,
                       best_so_far=lambda: None)
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump({"result": dataclasses.asdict(result),
                       "measurements": [dataclasses.asdict(m) for m in measurements]}, handle,
                      default=dict)
    dist.barrier()  # no rank tears gloo down while its peer still talks to it (SIGABRT)
    dist.destroy_process_group()
    exit_rank(0)  # as the torchrun worker: no C++ static teardown (an occasional SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
