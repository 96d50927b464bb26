"""Frozen teachers and guides behind one interface: ``velocity(x, t, class_labels) -> v``.

- ``NetworkTeacher``: a velocity network from a ``FlowMatchingModule`` checkpoint (EMA weights
  by default), or any network passed in with its weights.
- ``GMMTeacher``: the exact velocity of a Gaussian mixture fitted to a dataset (docs/design.md section 6):
  an instant, exact teacher; a mixture with fewer components or wider covariances is its guide.
- ``guided_velocity``: autoguidance and classifier-free guidance (docs/design.md section 1), for class
  labels or keyword conditioning (text embeddings; CFG's null is the empty prompt's embedding).

Teachers are frozen: eval mode, no grads, never in the optimizer, and their weights are not
copied into the distillation checkpoints (they are rebuilt from their own source).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmap_lit.interpolant import edm_inputs, eps_to_velocity, expand_like, x0_to_velocity


class Teacher(nn.Module):
    """A frozen velocity model. Subclasses implement ``velocity``."""

    num_classes: int = 0

    def freeze(self) -> Teacher:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Teacher:  # always stays in eval mode
        return super().train(False)

    def velocity(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        """``v(x, t)``; ``cond``: extra conditioning by keyword (text embeddings, ``batch["cond"]``),
        accepted by text-conditioned teachers only."""
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        return self.velocity(x, t, class_labels, **cond)

    @property
    def network(self) -> nn.Module | None:
        """The underlying network a student can be initialized from, if any."""
        return None


class ConvertedTeacher(Teacher):
    """A network of another parameterization, converted exactly to the velocity of docs/design.md section 1.

    ``prediction`` says what ``net`` returns:

    - ``"velocity"``: ``v = eps - x0`` at ``net(x_t, t, class_labels=...)`` (our own convention);
    - ``"eps"``: the noise, ``v = (eps_hat - x_t) / (1 - t)``, called as ``net(x_t, t, ...)``;
    - ``"x0"``: the clean data, ``v = (x_t - x0_hat) / t``, called as ``net(x_t, t, ...)``;
    - ``"edm"``: an EDM/EDM2 denoiser ``D(x_sigma; sigma)`` (x0-prediction with sigma conditioning),
      called as ``net(x_t / (1 - t), sigma, class_labels=...)`` with ``sigma = t / (1 - t)``,
      then ``v = (x_t - D) / t``.

    Divisions by ``t`` or ``1 - t`` clamp ``t`` to ``[T_MIN, T_MAX]`` (``flowmap_lit.interpolant``).
    Only a ``"velocity"`` network can initialize a student (``network``); for the others, give the
    student explicitly.

    Args:
        net: The network, with its weights loaded: called as net(x_t, t, class_labels=...), or for
            "edm" as net(x_t / (1 - t), sigma, class_labels=...).
        prediction: What net returns: "velocity" (v = eps - x0), "eps" (the noise), "x0" (the clean
            data) or "edm" (an EDM/EDM2 denoiser D(x_sigma; sigma), sigma = t / (1 - t)).
        num_classes: Classes of the network (label num_classes is its null label); 0:
            unconditional, no labels are passed.
    """

    PREDICTIONS = ("velocity", "eps", "x0", "edm")

    def __init__(
        self,
        net: nn.Module,
        prediction: str = "velocity",
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if prediction not in self.PREDICTIONS:
            raise ValueError(f"prediction must be one of {self.PREDICTIONS}, got {prediction!r}")
        self.net, self.prediction, self.num_classes = net, prediction, num_classes

    @property
    def network(self) -> nn.Module | None:
        return self.net if self.prediction == "velocity" else None

    def velocity(self, x, t, class_labels=None):
        labels = class_labels if self.num_classes > 0 else None
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if self.prediction == "edm":
            x_sigma, sigma = edm_inputs(x, t)
            return x0_to_velocity(self.net(x_sigma, sigma, class_labels=labels), x, t)
        out = self.net(x, t, class_labels=labels)
        if self.prediction == "eps":
            return eps_to_velocity(out, x, t)
        if self.prediction == "x0":
            return x0_to_velocity(out, x, t)
        return out


# A teacher trained on data scaled by ``data_scale`` (x_T = data_scale * x at t = 0), read in our space.


def teacher_time(t: Tensor, data_scale: float) -> Tensor:
    """The teacher's time of our ``t`` when its data is ``data_scale * x0``: ``a t / ((1 - t) + a t)``."""
    return t if data_scale == 1.0 else data_scale * t / ((1 - t) + data_scale * t)


def our_time(t_teacher: Tensor, data_scale: float) -> Tensor:
    """Inverse of :func:`teacher_time`: ``t = t_T / (a (1 - t_T) + t_T)``."""
    return t_teacher if data_scale == 1.0 else t_teacher / (data_scale * (1 - t_teacher) + t_teacher)


def teacher_space(x_t: Tensor, t: Tensor, data_scale: float) -> tuple[Tensor, Tensor]:
    """``(x_T, t_T)``: our ``x_t`` as the noisy sample of a teacher trained on ``a * x0``.

    The noise is not scaled, so with ``k = (1 - t) + a t``: ``x_T = a x_t / k`` at ``t_T = a t / k``
    (then ``x_T = (1 - t_T) a x0 + t_T eps``). Exact for a scalar ``a``.
    """
    if data_scale == 1.0:
        return x_t, t
    return x_t * expand_like(data_scale / ((1 - t) + data_scale * t), x_t), teacher_time(t, data_scale)


def velocity_from_teacher_space(v_T: Tensor, x_T: Tensor, t_T: Tensor, data_scale: float) -> Tensor:
    """Our ``v = eps - x0`` from the teacher's ``v_T = eps - a x0`` at ``(x_T, t_T)``:
    ``a x0_hat = x_T - t_T v_T``, ``eps_hat = x_T + (1 - t_T) v_T``, ``v = eps_hat - a x0_hat / a``."""
    if data_scale == 1.0:
        return v_T
    tt = expand_like(t_T, x_T)
    return (x_T + (1 - tt) * v_T) - (x_T - tt * v_T) / data_scale


def guided_velocity(teacher: Teacher, guide: Teacher | None, x: Tensor, t: Tensor,
                    class_labels: Tensor | None, lam: Tensor | None, kind: str,
                    cond: dict[str, Tensor] | None = None, null_cond: dict[str, Tensor] | None = None) -> Tensor:
    """``lam * v_teacher + (1 - lam) * v_guide`` (docs/design.md section 1), computed without grad.

    ``kind``: ``"autoguidance"`` (guide = the weaker model, same label and ``cond``), ``"cfg"``
    (guide = the teacher with the null label ``num_classes``, or, for text conditioning, with
    ``null_cond``: the empty prompt's embeddings, one per key without batch dimension; zeros when
    None), or ``"none"`` (the teacher alone). ``cond``: keyword conditioning of the teacher
    (``batch["cond"]``, e.g. ``encoder_hidden_states``); None for class/unconditional teachers.
    """
    kw = cond or {}
    with torch.no_grad():
        if kind == "none" or lam is None:
            return teacher.velocity(x, t, class_labels, **kw).float()
        lam_b = lam.float().reshape(-1, *([1] * (x.ndim - 1)))
        if kind == "autoguidance":
            if guide is None:
                raise ValueError("guidance 'autoguidance' needs a guide model")
            v_t, v_g = teacher.velocity(x, t, class_labels, **kw), guide.velocity(x, t, class_labels, **kw)
        elif kind == "cfg" and cond:
            both = {k: torch.cat([v, null_condition(null_cond, k, v)]) for k, v in cond.items()}
            labels = None if class_labels is None else torch.cat([class_labels, class_labels])
            v = teacher.velocity(torch.cat([x, x]), torch.cat([t, t]), labels, **both)
            v_t, v_g = v.chunk(2)
        elif kind == "cfg":
            if teacher.num_classes == 0 or class_labels is None:
                raise ValueError("classifier-free guidance needs a class-conditional teacher and labels "
                                 "(or text conditioning, batch['cond'])")
            null = torch.full_like(class_labels, teacher.num_classes)
            v = teacher.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
            v_t, v_g = v.chunk(2)
        else:
            raise ValueError(f"unknown guidance {kind!r}; use 'autoguidance', 'cfg' or 'none'")
        return lam_b * v_t.float() + (1 - lam_b) * v_g.float()


def null_condition(null_cond: dict[str, Tensor] | None, key: str, like: Tensor) -> Tensor:
    """The null (empty-prompt) value of conditioning ``key``, broadcast to the batch of ``like``;
    zeros when ``null_cond`` has none (a dataset without a stored empty-prompt embedding)."""
    if null_cond is None or key not in null_cond:
        return torch.zeros_like(like)
    null = null_cond[key].to(device=like.device, dtype=like.dtype)
    if tuple(null.shape) != tuple(like.shape[1:]):
        raise ValueError(f"null condition {key!r} has shape {tuple(null.shape)}, the batch has {tuple(like.shape[1:])}")
    return null.expand_as(like)
