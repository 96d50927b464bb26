"""The FewStepFID callback (flowmap_lit.callbacks.FewStepFID): a missing digits classifier is trained on the
data module's data at setup, before the first validation. (The callback's FID rows and their logs: the
quickstart fit of tests/commands/test_fit.py.)"""

from types import SimpleNamespace

import flowmap_lit.metrics as metrics
from flowmap_lit.callbacks import FewStepFID


def test_a_missing_digits_classifier_is_trained_at_setup_and_kept(digits_classifier, tmp_path, monkeypatch,
                                                                  lightning_log):
    real, calls = metrics.train_digits_classifier, []

    def one_epoch(root, path, **kwargs):  # the training is the package's: 1 epoch instead of 40
        calls.append((str(root), str(path)))
        return real(root, path, epochs=1)

    monkeypatch.setattr(metrics, "train_digits_classifier", one_epoch)
    path = tmp_path / "classifier.pt"
    callback = FewStepFID(feature="digits", feature_path=str(path), train_if_missing=True)
    barriers = []
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(root=str(digits_classifier["root"])),
                              strategy=SimpleNamespace(barrier=barriers.append))
    callback.setup(trainer, None, "fit")
    assert calls == [(str(digits_classifier["root"]), str(path))] and path.is_file()
    assert "trained the digits FID feature network" in lightning_log() and barriers == ["fid_classifier"]
    callback.setup(trainer, None, "fit")  # there now: not trained again
    assert len(calls) == 1
