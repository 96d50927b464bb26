"""Exact teachers: the velocity of a Gaussian or a Gaussian mixture fitted to a dataset
(docs/design.md section 6). An instant, exact teacher; a mixture with fewer components or wider
covariances is its guide."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flowmap_lit.data import read_split
from flowmap_lit.teachers.analytic import GaussianData, GaussianMixture
from flowmap_lit.teachers.base import Teacher


class MixtureTeacher(Teacher):
    """The exact velocity of a given ``GaussianMixture`` (docs/design.md section 6).

    Args:
        mixture: The Gaussian mixture (flowmap_lit.teachers.GaussianMixture) of the data; its
            classes are the teacher's.
    """

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.gmm = mixture
        self.num_classes = mixture.num_classes
        self.freeze()

    def velocity(self, x, t, class_labels=None):
        return self.gmm.velocity(x, t, class_labels)

    def sample(self, n: int, class_labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of the data distribution the teacher transports to."""
        return self.gmm.sample(n, class_labels, generator)


class GaussianTeacher(Teacher):
    """Gaussian data ``N(mu, diag(c^2))``: closed-form velocity AND flow map (docs/design.md section 6),
    the reference the flow-map diagnostics (``flowmap_lit.diagnostics``) use exactly.

    Args:
        data: The Gaussian data distribution (flowmap_lit.teachers.GaussianData); unconditional.
    """

    def __init__(self, data: GaussianData) -> None:
        super().__init__()
        self.data = data
        self.freeze()

    def velocity(self, x, t, class_labels=None):
        return self.data.velocity(x, t)

    def flow_map(self, x: Tensor, t: Tensor, s: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The exact ODE solution from ``x`` at ``t`` read at ``s``."""
        return self.data.flow_map(x, t, s)


class GMMTeacher(MixtureTeacher):
    """Exact velocity of a full-covariance Gaussian mixture fitted to a dataset's training split.

    With ``per_class=True`` the mixture has ``num_components`` components per class and is
    class-conditional (the null label mixes all classes, so CFG works too). The fit is
    deterministic given ``seed``; it is redone at construction (a second or two for the digits).

    Args:
        data_root: Dataset directory (shards and stats.json) whose split is fitted, standardized
            per channel with its stats.json like the training data (LatentDataModule, normalize:
            true).
        num_components: Full-covariance components of the mixture (per class with per_class), >= 1.
        per_class: Fit num_components per class: a class-conditional mixture; false: one
            unconditional mixture of the whole split.
        covariance_scale: Multiplies every component's covariance (> 0); above 1 widens the
            components, which makes a weaker model for autoguidance.
        reg_covar: Added to the covariance diagonals in the fit (in the standardized units), >= 0.
        split: The dataset split that is fitted.
        seed: Seed of the EM initialization (scikit-learn's random_state): the fit is deterministic
            given it.
        prepare_digits_if_missing: When data_root has no stats.json and its directory is named after
            a built-in dataset ("digits", "shapes"), write that dataset there first; otherwise a
            missing dataset is an error.
    """

    def __init__(
        self,
        data_root: str = "data/digits",
        num_components: int = 2,
        per_class: bool = True,
        covariance_scale: float = 1.0,
        reg_covar: float = 1e-3,
        split: str = "train",
        seed: int = 0,
        prepare_digits_if_missing: bool = True,
    ) -> None:
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if covariance_scale <= 0:
            raise ValueError(f"covariance_scale must be > 0 (> 1 widens the components for a weaker guide), "
                             f"got {covariance_scale}")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
        root = Path(data_root)
        if not (root / "stats.json").is_file():
            from flowmap_lit.data.prepare import BUILTIN_DATASETS

            if not (prepare_digits_if_missing and root.name in BUILTIN_DATASETS):
                raise FileNotFoundError(
                    f"GMMTeacher: no dataset at {data_root} ({root / 'stats.json'} is missing). Fix data_root, or "
                    "make the dataset first (python -m flowmap_lit prepare ... --out DIR); only a directory "
                    f"named after a built-in dataset ({', '.join(sorted(BUILTIN_DATASETS))}) is prepared automatically")
            BUILTIN_DATASETS[root.name][0](str(root))
        x, y = read_split(str(root), split)
        super().__init__(GaussianMixture.fit(x, y if per_class else None, num_components, x.shape[1:],
                                             covariance_scale=covariance_scale, reg_covar=reg_covar, seed=seed))
