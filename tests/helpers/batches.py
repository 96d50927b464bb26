"""``BatchRecorder``: a callback (named by class path in test configs) that records what each training step was
given: the keys of its batch, and how many data-free states the module drew."""

from lightning.pytorch.callbacks import Callback


class BatchRecorder(Callback):
    """Records the sorted keys of every training batch (``keys``) and counts the module's calls of
    ``trajectory_states`` (``state_calls``: data-free noisy points drawn from noise)."""

    def __init__(self) -> None:
        self.keys: list[list[str]] = []
        self.state_calls = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        states = pl_module.trajectory_states

        def counted(*args, **kwargs):
            self.state_calls += 1
            return states(*args, **kwargs)

        pl_module.trajectory_states = counted

    def on_fit_end(self, trainer, pl_module) -> None:
        pl_module.__dict__.pop("trajectory_states", None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.append(sorted(batch))
