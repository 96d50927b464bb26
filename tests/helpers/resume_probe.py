"""A callback for the kill-and-resume test: records every training step, and can SIGKILL the run.

Appends one JSON line per optimizer step to ``$FLOWMAP_PROBE_LOG``: the step, the sample keys of its
batch, the loss, the tangent warmup r and a checksum of the student's weights. With
``$FLOWMAP_PROBE_KILL_AT`` set, the process kills itself with SIGKILL right after that step.
"""

import json
import os
import signal

import lightning.pytorch as pl
import torch


class RecordSteps(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.ema_network().parameters()])
        ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMA")
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                  "keys": list(batch["key"]), "loss": float(outputs["loss"]),
                  "r": float(pl_module.tangent_warmup()), "weights": float(weights.double().square().sum()),
                  "ema": float(sum(v.double().square().sum() for v in ema.shadow.values()))}
        with open(os.environ["FLOWMAP_PROBE_LOG"], "a") as f:
            f.write(json.dumps(record) + "\n")
        if int(os.environ.get("FLOWMAP_PROBE_KILL_AT", -1)) == trainer.global_step:
            os.kill(os.getpid(), signal.SIGKILL)
