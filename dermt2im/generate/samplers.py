"""Sampler registry: names used in configs and manifests -> diffusers schedulers.

A scheduler is small, stateless between runs (``set_timesteps`` resets it) and built from the
pipeline's own scheduler config, so switching sampler is swapping ``pipe.scheduler`` for a cached
instance: the UNet, VAE and text encoder are never touched or reloaded.

Names follow the AUTOMATIC1111 WebUI the paper used (Table III: Euler, Euler a, PLMS).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from dermt2im.core.errors import DermT2imError
from dermt2im.core.specs import SAMPLER_NAMES

if TYPE_CHECKING:  # diffusers is imported by the factories, so planning stays light
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


class UnknownSamplerError(DermT2imError, ValueError, KeyError):
    """A sampler name that is not in ``SAMPLERS``. Both a ValueError and a KeyError."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class _Registry(dict):
    def __missing__(self, name: str):
        raise UnknownSamplerError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(self))}")


def _euler(config: Mapping[str, Any]) -> SchedulerMixin:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(dict(config))


def _euler_a(config: Mapping[str, Any]) -> SchedulerMixin:
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler.from_config(dict(config))


def _plms(config: Mapping[str, Any]) -> SchedulerMixin:
    from diffusers import PNDMScheduler

    # PLMS as A1111 / the original LDM code runs it: linear multistep without the Runge-Kutta warm-up.
    return PNDMScheduler.from_config(dict(config), skip_prk_steps=True)


def _ddim(config: Mapping[str, Any]) -> SchedulerMixin:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(config))


def _dpmpp_2m(config: Mapping[str, Any]) -> SchedulerMixin:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(dict(config), algorithm_type="dpmsolver++", solver_order=2)


SAMPLERS: dict[str, Callable[[Mapping[str, Any]], SchedulerMixin]] = _Registry(
    euler=_euler,
    euler_a=_euler_a,
    plms=_plms,
    ddim=_ddim,
    dpmpp_2m=_dpmpp_2m,
)


def check_sampler_names(names: tuple[str, ...] | list[str]) -> None:
    """Raise ``UnknownSamplerError`` naming every unknown sampler (used before planning)."""
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise UnknownSamplerError(
            f"unknown sampler(s) {', '.join(map(repr, unknown))}; known samplers: {', '.join(sorted(SAMPLERS))}"
        )
    if not names:
        raise ValueError("generate.samplers is empty; name at least one of: " + ", ".join(sorted(SAMPLERS)))


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    return SAMPLERS[name](config)


class SamplerSwitch:
    """Swaps ``pipe.scheduler`` between cached per-sampler instances built from one base config.

    The base config is the pipeline's scheduler config at construction time, so switching
    euler -> plms -> euler never drifts (each scheduler is built from the same original config).
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.base_config = dict(pipe.scheduler.config)
        self._cache: dict[str, SchedulerMixin] = {}
        self.current: str | None = None

    def scheduler(self, name: str) -> SchedulerMixin:
        if name not in self._cache:
            self._cache[name] = make_scheduler(name, self.base_config)
        return self._cache[name]

    def use(self, name: str) -> SchedulerMixin:
        sched = self.scheduler(name)
        if self.pipe.scheduler is not sched:
            self.pipe.scheduler = sched
        self.current = name
        return sched


assert tuple(sorted(SAMPLERS)) == tuple(sorted(SAMPLER_NAMES)), "core.specs.SAMPLER_NAMES lists every sampler"
