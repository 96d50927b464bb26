"""``NetworkTeacher``: a velocity network from a ``FlowMatchingModule`` checkpoint (EMA weights by
default), or any network passed in with its weights."""

from __future__ import annotations

from torch import nn

from flowmap_lit.checkpoints import ema_state_from_checkpoint, load_checkpoint
from flowmap_lit.checkpoints.trust import check_trusted
from flowmap_lit.teachers.base import Teacher


def network_from_config(config: dict) -> nn.Module:
    """Instantiate a network from a ``{"class_path": ..., "init_args": {...}}`` dict."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "net", fail_untyped=False)
    cfg = parser.parse_object({"net": config})
    return parser.instantiate(cfg).net


class NetworkTeacher(Teacher):
    """A trained velocity network, frozen.

    Give ``checkpoint`` (a ``FlowMatchingModule`` checkpoint written by ``python -m flowmap_lit
    fit``: its network config is read from the checkpoint) and/or ``net`` (the architecture, when
    the checkpoint lacks it, or a network with weights already loaded when ``checkpoint`` is None).

    Args:
        checkpoint: A Lightning checkpoint of a FlowMatchingModule run (a file or a sharded FSDP2
            directory) whose network weights are loaded; None: net is used as given.
        net: The network architecture (class_path/init_args); optional with a checkpoint written by
            python -m flowmap_lit fit (which records it), or, without a checkpoint, the network with
            its weights already loaded.
        use_ema: Load the checkpoint's EMA weights when it has them; false (or none saved): the raw
            trained weights.
        num_classes: Classes of the network (label num_classes is its null label for classifier-free
            guidance); None: the checkpoint's num_classes hyperparameter, else 0 (unconditional).
        allow_pickle: Load the checkpoint with weights_only=False, which can run code stored in it
            (trusted files only).
        trust_code: Build the network class the checkpoint names even when it is not a class of
            flowmap_lit (trusted files only; flowmap_lit.checkpoints.trust).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        net: nn.Module | None = None,
        use_ema: bool = True,
        num_classes: int | None = None,
        allow_pickle: bool = False,
        trust_code: bool = False,
    ) -> None:
        super().__init__()
        if checkpoint is None and net is None:
            raise ValueError("NetworkTeacher needs a checkpoint path, a net, or both")
        hparams = {}
        self.net_config: dict | None = None  # {"class_path", "init_args"} of the network, when the checkpoint has it
        if checkpoint is not None:
            ckpt = load_checkpoint(checkpoint, allow_pickle)
            hparams = ckpt.get("hyper_parameters", {})
            if isinstance(hparams.get("net"), dict):
                self.net_config = hparams["net"]
            if net is None:
                if not isinstance(hparams.get("net"), dict):
                    raise ValueError(
                        f"{checkpoint} does not record its network config; give the architecture as "
                        "teacher net: {class_path: ..., init_args: ...}"
                    )
                check_trusted(hparams["net"], checkpoint, trust_code, option="trust_code: true")
                net = network_from_config(hparams["net"])
            state = ema_state_from_checkpoint(ckpt) if use_ema else None
            if state is None:
                prefix = "net."
                state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"{checkpoint} does not match the teacher architecture: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.net = net
        self.checkpoint = checkpoint
        self.num_classes = num_classes if num_classes is not None else int(hparams.get("num_classes", 0))
        self.freeze()

    @property
    def network(self) -> nn.Module:
        return self.net

    def velocity(self, x, t, class_labels=None):
        labels = class_labels if self.num_classes > 0 else None
        return self.net(x, t, class_labels=labels)
