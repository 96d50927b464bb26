"""FID (and FD_DINOv2) across step counts (``fid/{k}step``, ``fd_dinov2/{k}step``) as a callback,
with a distance-versus-steps plot; on text data with stored prompt text also the CLIP score of the
samples against their prompts (``clip_score/{k}step``).

At every validation (and, if the last validation was not at the final step, at the end of fit)
each rank generates its contiguous share of ``num_samples`` with the EMA student at every step
count in ``step_counts``; sample ``i`` has the same noise and label whatever the number of ranks
(``flowmap_lit.metrics.few_step``), and the metrics' float64 feature sums are all-reduced, so
1 and N processes give the same numbers. Latent samples are un-normalized and decoded once by a
local VAE (``vae``) for every feature network. Reference statistics of the data are computed
with the same pipeline once and cached next to the shards (``flowmap_lit.metrics.fid``; or ahead
of time by ``python -m flowmap_lit reference``).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from flowmap_lit.callbacks.ema import evaluation_mode
from flowmap_lit.callbacks.flowmap_error import format_table, log_at_fit_end

DISPLAY = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "clip_score": "CLIP score"}


def _as_list(value, n: int | None = None) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return items * n if n is not None and len(items) == 1 else items


class FewStepFID(pl.Callback):
    """Fréchet distances of k-step samples to the data, for each k in ``step_counts``.

    ``feature``: one kind or a list of kinds, each with its weights in ``feature_path`` (one path
    per kind): ``"digits"`` (a small classifier trained on the digits, made by ``python -m
    flowmap_lit classifier``), ``"inception"`` (Inception-v3 pool features, FID;
    local weights file) or ``"dinov2"`` (DINOv2 class token, FD_DINOv2; local transformers
    directory). Samples are mapped to images by the data module's ``denormalize`` and, for latent
    data, by the diffusers ``AutoencoderKL`` in the local directory ``vae`` (stored latents =
    ``(z - vae_shift_factor) * vae_scaling_factor``); the digits are their own images. On a text
    dataset sample ``i`` is conditioned on the stored embeddings of validation sample
    ``i % num_prompts``, and the reference is the training split's decoded latents. With ``clip``
    (text data that stores the prompts' text) the decoded samples are also scored against their
    prompts' text (``flowmap_lit.metrics.clip_score``; ``feature: []`` leaves the CLIP score alone,
    e.g. on prompts-only data, which has no latents to take a reference from).

    Args:
        feature: The feature network kind, or a list of kinds: "digits" (a small digits classifier,
            made by python -m flowmap_lit classifier), "inception" (Inception-v3 pool features: FID)
            or "dinov2" (DINOv2 class token: FD_DINOv2); "digits" and "inception" both give FID, so
            not both; [] for none (then clip must be set).
        feature_path: Weights of each feature network, one per kind (a single kind takes a single
            path): the digits classifier file, the Inception-v3 weights file or the DINOv2
            transformers directory.
        step_counts: Sampler step counts k (each logged as fid/{k}step or fd_dinov2/{k}step).
        num_samples: Generated samples per step count, over all ranks.
        reference_split: Data split whose statistics are the reference (computed once and cached
            next to the shards).
        reference_samples: Use the first this many samples of the reference split; None: all.
        batch_size: Samples per network call.
        seed: Noise seed: sample i's noise and label depend on (seed, i) only, whatever the number
            of ranks.
        guidance: Guidance scale lam passed to sample(); None: the module's own (eval_guidance).
        print_table: Print the table at the end of fit, and after validate.
        train_if_missing: With "digits": train the classifier (about 10 s) when feature_path is
            missing.
        teacher_steps: Also the teacher's distances (its ODE from the same noise, with this many
            Heun steps), computed once and shown with the table; None or 0: skip.
        vae: Local directory of a diffusers AutoencoderKL that decodes latent samples (and the
            reference data) into images; None: the samples are images.
        vae_scaling_factor: How the stored latents were scaled: stored = (z - vae_shift_factor) *
            vae_scaling_factor (flowmap_lit.metrics.decode).
        vae_shift_factor: How the stored latents were shifted (see vae_scaling_factor).
        vae_batch_size: Latents per decoder call.
        num_prompts: Text data: sample i is conditioned on the stored embeddings of validation
            sample i % num_prompts (at most num_samples prompts).
        clip: Text data: a local transformers CLIP directory (e.g. openai/clip-vit-large-patch14); the
            decoded samples are also scored against the text of their prompts (CLIP score, logged as
            clip_score/{k}step). The dataset must store the prompts' text. None: no CLIP score.
        clip_batch_size: Images per CLIP call.
    """

    def __init__(
        self,
        feature: str | list[str] = "digits",
        feature_path: str | None | list[str | None] = "data/digits/classifier.pt",
        step_counts: list[int] = [1, 2, 4, 8],  # noqa: B006 (read, never mutated; --help shows it)
        num_samples: int = 2000,
        reference_split: str = "train",
        reference_samples: int | None = None,
        batch_size: int = 500,
        seed: int = 0,
        guidance: float | None = None,
        print_table: bool = True,
        train_if_missing: bool = False,
        teacher_steps: int | None = 64,
        vae: str | None = None,
        vae_scaling_factor: float = 1.0,
        vae_shift_factor: float = 0.0,
        vae_batch_size: int = 32,
        num_prompts: int = 1000,
        clip: str | None = None,
        clip_batch_size: int = 64,
    ) -> None:
        from flowmap_lit.metrics.features import FEATURE_KINDS, METRIC_NAMES

        self.features = _as_list(feature)
        self.feature_paths = _as_list(feature_path, len(self.features))
        if len(self.feature_paths) != len(self.features):
            raise ValueError(f"FewStepFID: {len(self.features)} feature kinds but {len(self.feature_paths)} "
                             "feature paths; give one path per kind")
        unknown = [k for k in self.features if k not in FEATURE_KINDS]
        if unknown:
            raise ValueError(f"FewStepFID: unknown feature kind(s) {unknown}; expected {FEATURE_KINDS}")
        self.metric_names = [METRIC_NAMES[k] for k in self.features]
        if len(set(self.metric_names)) != len(self.metric_names):
            raise ValueError(f"FewStepFID: feature kinds {self.features} give the same metric twice "
                             f"({self.metric_names}); use one of digits/inception")
        self.clip, self.clip_batch_size = clip, clip_batch_size
        if clip is not None:
            self.metric_names.append("clip_score")
        if not self.metric_names:
            raise ValueError("FewStepFID: nothing to measure: give a feature kind or a CLIP directory (clip)")
        # the first one, for callers
        self.feature = self.features[0] if self.features else None
        self.feature_path = self.feature_paths[0] if self.feature_paths else None
        self.step_counts = list(step_counts)
        self.num_samples = num_samples
        self.reference_split, self.reference_samples = reference_split, reference_samples
        self.batch_size = batch_size
        self.seed = seed
        self.guidance = guidance
        self.print_table = print_table
        self.train_if_missing = train_if_missing
        self.teacher_steps = teacher_steps
        self.vae, self.vae_scaling_factor, self.vae_shift_factor = vae, vae_scaling_factor, vae_shift_factor
        self.vae_batch_size = vae_batch_size
        self.num_prompts = num_prompts
        self.teacher_distances: dict[str, float] | None = None
        self.metrics: dict | None = None
        self.decoder = None
        self.results: list[dict] = []
        self._last_step = -1

    @property
    def teacher_fid(self) -> float | None:
        """The teacher's distance under the first feature network (None until computed)."""
        return None if self.teacher_distances is None else self.teacher_distances[self.metric_names[0]]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Here, not in a validation hook: validation runs without grad and the classifier must train.
        for kind, path in zip(self.features, self.feature_paths):
            if self.train_if_missing and kind == "digits" and not Path(path).is_file():
                if trainer.is_global_zero:
                    from flowmap_lit.metrics import train_digits_classifier

                    result = train_digits_classifier(trainer.datamodule.root, path)
                    rank_zero_info(f"trained the digits FID feature network: held-out accuracy "
                                   f"{100 * result['accuracy']:.2f}% -> {path}")
                trainer.strategy.barrier("fid_classifier")

    def setup_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.metrics is not None:
            return
        from flowmap_lit.metrics import FID, build_feature_extractor, dataset_reference_stats
        from flowmap_lit.metrics.features import DecodedFeatures

        dm, device = trainer.datamodule, pl_module.device
        if self.vae is not None:
            from flowmap_lit.metrics.decode import LatentDecoder

            self.decoder = LatentDecoder(self.vae, self.vae_scaling_factor, self.vae_shift_factor,
                                         self.vae_batch_size).to(device)
        self.metrics = {}
        for kind, path, name in zip(self.features, self.feature_paths, self.metric_names):
            extractor = build_feature_extractor(kind, path).to(device)
            reference_net = DecodedFeatures(extractor, self.decoder) if self.decoder is not None else extractor

            def stats(reference_net=reference_net):  # called within this iteration
                return dataset_reference_stats(dm.root, self.reference_split, reference_net, device=device,
                                               num_samples=self.reference_samples)

            if trainer.is_global_zero:  # rank 0 computes and caches; the others then read the cache
                reference = stats()
            trainer.strategy.barrier("fid_reference")
            if not trainer.is_global_zero:
                reference = stats()
            self.metrics[name] = FID(extractor).to(device)
            self.metrics[name].set_reference(reference)
        if self.clip is not None:
            from flowmap_lit.metrics.clip_score import CLIPScore

            self.metrics["clip_score"] = CLIPScore(self.clip, self.clip_batch_size).to(device)

    def to_images(self, dm):
        if self.decoder is None:
            return dm.denormalize
        return lambda x: self.decoder(dm.denormalize(x))

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict]:
        from flowmap_lit.metrics.few_step import (
            prompt_cond,
            prompt_texts,
            rank_share,
            sampler_distances,
            seeded_noise,
            text_prompts_with_text,
        )

        self.setup_metrics(trainer, pl_module)
        dm = trainer.datamodule
        share = rank_share(self.num_samples, trainer.global_rank, trainer.world_size)
        noise, labels = seeded_noise(share, self.num_samples, tuple(dm.shape), self.seed,
                                     getattr(pl_module, "num_classes", 0))
        noise = noise.to(pl_module.device)
        labels = labels.to(pl_module.device) if labels is not None else None
        kwargs = {} if self.guidance is None else {"guidance": self.guidance}
        prompts, texts = text_prompts_with_text(dm, min(self.num_prompts, self.num_samples))
        cond = prompt_cond(prompts, share, pl_module.device)
        if "clip_score" in self.metrics:
            if texts is None:
                raise ValueError(f"FewStepFID: the CLIP score (clip=...) needs the prompts' text, and {dm.root} "
                                 "stores none; write the dataset with it (write_dataset(..., prompts=...), a prompt "
                                 "array for prepare text-array, or prepare text-prompts)")
            self.metrics["clip_score"].set_prompts(prompt_texts(texts, share))
        to_images = self.to_images(dm)
        with evaluation_mode(trainer, pl_module):
            rows = [{"steps": k, **sampler_distances(self.metrics, pl_module.sample, noise, labels, self.batch_size,
                                                     to_images, cond, num_steps=k, **kwargs)}
                    for k in self.step_counts]
            if self.teacher_steps and self.teacher_distances is None and hasattr(pl_module, "teacher_sample"):
                self.teacher_distances = sampler_distances(self.metrics, pl_module.teacher_sample, noise, labels,
                                                           self.batch_size, to_images, cond,
                                                           num_steps=self.teacher_steps, **kwargs)
        self._last_step = trainer.global_step
        return rows

    def _log(self, trainer, pl_module, rows) -> None:
        for row in rows:
            for name in self.metric_names:
                pl_module.log(f"{name}/{row['steps']}step", row[name], rank_zero_only=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and experiment is not None and hasattr(experiment, "add_figure"):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            for name in self.metric_names:
                fig, ax = plt.subplots(figsize=(4, 3))
                ax.plot([r["steps"] for r in rows], [r[name] for r in rows], "o-")
                ax.set(xscale="log", xticks=self.step_counts, xticklabels=self.step_counts, xlabel="steps",
                       ylabel=DISPLAY[name])
                fig.tight_layout()
                experiment.add_figure(f"{name}/versus_steps", fig, trainer.global_step)
                plt.close(fig)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.results = self.evaluate(trainer, pl_module)
        if trainer.state.fn == "fit":
            self._log(trainer, pl_module, self.results)
        elif self.print_table:
            self._print(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._last_step != trainer.global_step:  # a validation at the final step already evaluated and logged it
            self.results = self.evaluate(trainer, pl_module)
            log_at_fit_end(trainer, {f"{name}/{row['steps']}step": row[name]
                                     for row in self.results for name in self.metric_names})
        if self.print_table:
            self._print(trainer)

    def _print(self, trainer) -> None:
        if trainer.is_global_zero:
            teacher = "" if self.teacher_distances is None else (
                f"\nteacher, {self.teacher_steps}-step Heun ODE: "
                + ", ".join(f"{DISPLAY[name]} {value:.4g}" for name, value in self.teacher_distances.items()))
            names = " and ".join(DISPLAY[n] for n in self.metric_names)
            features = f"{', '.join(self.features)} features, " if self.features else ""
            rank_zero_info(f"\n{names} ({features}"
                           f"{self.num_samples} samples, reference: {self.reference_split} split) at step "
                           f"{trainer.global_step}:\n" + format_table(self.results, ["steps", *self.metric_names])
                           + teacher)
