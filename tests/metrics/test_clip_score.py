"""The CLIP score (flowmap_lit.metrics.clip_score) on a tiny CLIP trained in the test to pair color images with
color names: matched pairs score above shuffled ones; the FewStepFID callback logs it per step count and the
evaluate command reports it, for text-conditioned samples scored against their prompts' text."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from flowmap_lit.callbacks import FewStepFID  # noqa: E402
from flowmap_lit.data import LatentDataModule, write_dataset  # noqa: E402
from flowmap_lit.metrics.clip_score import CLIPScore  # noqa: E402
from tests.helpers.cli import cli  # noqa: E402
from tests.helpers.clip import COLORS, color_images, tiny_clip  # noqa: E402

NAMES = list(COLORS)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_matched_pairs_score_higher_than_shuffled_ones(clip_dir):
    metric = CLIPScore(clip_dir, batch_size=3)
    images = color_images(NAMES)
    matched = metric.score(images, NAMES)
    for shift in (1, 2, 3):  # every derangement by rotation: each image against another color's name
        shuffled = metric.score(images, NAMES[shift:] + NAMES[:shift])
        assert matched.min() > shuffled.max() + 5, (matched, shuffled)
    # The score is CLIP's: 100 * max(cosine of the projected embeddings, 0), as CLIPModel's logits give it.
    with torch.no_grad():
        out = metric.model(input_ids=metric.tokens(NAMES), pixel_values=metric.preprocess(images))
    cos = out.logits_per_image.diagonal().double() / out.logits_per_image.new_tensor(1).mul(
        metric.model.logit_scale.exp()).double()
    torch.testing.assert_close(matched, 100 * cos.clamp_min(0), rtol=1e-4, atol=1e-4)
    # update/compute average over everything added; the FID-like interface gives the same with prompts set first.
    metric.update(images[:2], NAMES[:2])
    metric.update(images[2:], NAMES[2:])
    assert metric.compute() == pytest.approx(matched.mean().item(), rel=1e-6)
    metric.set_prompts(NAMES)
    metric.reset_fake()
    for part in images.split(3):
        metric.update_fake(part)
    assert metric.compute() == pytest.approx(matched.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="have no prompts"):
        metric.update_fake(images)
    # Gray images are scored as RGB; larger images are resized and center-cropped to CLIP's input.
    assert metric.preprocess(torch.zeros(2, 1, 40, 24)).shape == (2, 3, 16, 16)


def test_a_missing_clip_directory_says_how_to_download_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download openai/clip-vit-large-patch14 --local-dir "
                                                "models/clip-vit-large-patch14"):
        CLIPScore(tmp_path / "nowhere")


def write_color_dataset(root, n_train=8, n_val=4):
    """Latents 3 x 16 x 16 (random), one token of text embedding = the RGB color of the prompt, and the prompts."""
    rng = np.random.default_rng(0)
    splits, text, prompts = {}, {}, {}
    for split, n in (("train", n_train), ("val", n_val)):
        names = [NAMES[i % len(NAMES)] for i in range(n)]
        splits[split] = (rng.standard_normal((n, 3, 16, 16)).astype(np.float32), np.zeros(n, int))
        text[split] = (np.array([[COLORS[c]] for c in names], np.float32), None)
        prompts[split] = names
    write_dataset(str(root), splits, 0, samples_per_shard=4, text=text, prompts=prompts)
    return root


def paint(noise, cond, num_steps):
    """Samples that are the colors their prompts name (cond = the color) at 2+ steps, another prompt's at 1."""
    color = cond["encoder_hidden_states"][:, 0, :3]
    if num_steps == 1:
        color = color[:, [1, 2, 0]]  # a color the prompt does not name
    return color[:, :, None, None].expand_as(noise) + 0 * noise


class Painter(pl.LightningModule):
    num_classes = 0

    def __init__(self, prompts=True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.prompts = prompts

    def training_step(self, batch, batch_idx):
        if self.prompts:  # the prompts' text travels with the batch, on the module's device
            assert isinstance(batch["prompt"], list) and isinstance(batch["prompt"][0], str)
        return (self.w - 1) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, noise, labels=None, num_steps=1, cond=None, **kwargs):
        return paint(noise, cond, num_steps)


def test_the_few_step_callback_logs_the_clip_score_per_step_count(clip_dir, tmp_path):
    root = write_color_dataset(tmp_path / "colors")
    callback = FewStepFID(feature=[], clip=str(clip_dir), step_counts=[1, 2], num_samples=8, num_prompts=4,
                          teacher_steps=None, print_table=False, batch_size=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    dm = LatentDataModule(str(root), batch_size=4, num_workers=0, normalize=False)
    trainer.fit(Painter(), datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("clip_score/")}
    assert set(logged) == {"clip_score/1step", "clip_score/2step"}
    # The right colors (2 steps) score what the metric gives the prompts' images; the wrong ones (1 step) less.
    expected = CLIPScore(clip_dir).score(color_images([NAMES[i % 4] for i in range(8)]),
                                         [NAMES[i % 4] for i in range(8)]).mean().item()
    assert logged["clip_score/2step"] == pytest.approx(expected, rel=1e-5)
    assert logged["clip_score/1step"] < logged["clip_score/2step"] - 5
    assert [r["steps"] for r in callback.results] == [1, 2]

    plain = tmp_path / "plain"  # text embeddings without the prompts' text: a clear error
    latents = (np.zeros((4, 3, 16, 16), np.float32), np.zeros(4, int))
    embeddings = (np.zeros((4, 1, 3), np.float32), None)
    write_dataset(str(plain), {"train": latents, "val": latents}, 0, text={"train": embeddings, "val": embeddings})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, val_check_interval=1, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[FewStepFID(feature=[], clip=str(clip_dir),
                                                                           step_counts=[1], num_samples=4,
                                                                           teacher_steps=None)])
    with pytest.raises(ValueError, match="needs the prompts' text"):
        trainer.fit(Painter(prompts=False), datamodule=LatentDataModule(str(plain), batch_size=4, num_workers=0))
    with pytest.raises(ValueError, match="nothing to measure"):
        FewStepFID(feature=[])


class PainterCheckpoint(torch.nn.Module):
    """What load_module gives the evaluate command: a text-conditioned sampler with its data info."""

    num_classes = 0
    data_info = {"shape": [3, 16, 16], "num_classes": 0, "normalize": False, "mean": [], "std": []}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.w.device

    def sample(self, noise, labels=None, num_steps=1, cond=None, **kwargs):
        return paint(noise, cond, num_steps)


def test_evaluate_reports_the_clip_score_of_text_checkpoints(clip_dir, tmp_path, monkeypatch):
    import flowmap_lit.commands.evaluate as evaluate

    root = write_color_dataset(tmp_path / "colors")
    monkeypatch.setattr(evaluate, "load_module", lambda *args, **kwargs: PainterCheckpoint())
    rows = cli("evaluate", "--ckpt", tmp_path / "painter.ckpt", "--data", root, "--no-fid", "--clip", clip_dir,
               "--steps", "1", "2", "--num", "8", "--num-prompts", "4", "--batch-size", "3",
               "--json", tmp_path / "eval.json")
    assert [r["steps"] for r in rows] == [1, 2] and json.loads((tmp_path / "eval.json").read_text()) == rows
    expected = CLIPScore(clip_dir).score(color_images(NAMES * 2), NAMES * 2).mean().item()
    assert rows[1]["clip_score"] == pytest.approx(expected, rel=1e-5)
    assert rows[0]["clip_score"] < rows[1]["clip_score"] - 5
    with pytest.raises(SystemExit):  # the CLIP score of a dataset without text
        write_dataset(str(tmp_path / "plain"), {"train": (np.zeros((4, 3, 16, 16), np.float32), np.zeros(4, int))}, 0)
        cli("evaluate", "--ckpt", tmp_path / "painter.ckpt", "--data", tmp_path / "plain", "--no-fid", "--clip",
            clip_dir, "--num", "4")
