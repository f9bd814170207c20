"""Samplers by name: each builds a coefficient table (samplers.table.Plan) from a scheduler_config.json.

The name picks the algorithm; the checkpoint's config supplies the noise schedule, the prediction type
and the algorithm's own options, read as diffusers' `<Scheduler>.from_config(config)` reads them.
(SD pipelines rewrite old configs, steps_offset → 1 and clip_sample → False; callers do that first.)
"""

from __future__ import annotations

from typing import Any

from sdmesh.services.samplers import ddim, dpm_solver, euler, pndm, table

SAMPLER_NAMES = ("ddim", "euler", "euler-ancestral", "dpm++2m", "dpm++2m-karras", "plms")


def _check(name: str) -> None:
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; valid names are {', '.join(SAMPLER_NAMES)}")


def default_sampler(scheduler_json: dict[str, Any]) -> str:
    """The sampler a checkpoint ships, from its scheduler config's `_class_name` (ddim if we don't know it)."""
    cls = scheduler_json.get("_class_name")
    if cls == "PNDMScheduler":
        return "plms"
    if cls == "EulerDiscreteScheduler":
        return "euler"  # its use_karras_sigmas is honoured by "euler" itself
    if cls == "EulerAncestralDiscreteScheduler":
        return "euler-ancestral"
    if cls == "DPMSolverMultistepScheduler":
        return "dpm++2m-karras" if scheduler_json.get("use_karras_sigmas") else "dpm++2m"
    return "ddim"


def _euler_config(name: str, scheduler_json: dict[str, Any]) -> euler.EulerConfig:
    if name == "euler-ancestral":  # EulerAncestralDiscreteScheduler has none of Euler's σ-spacing options
        scheduler_json = dict(
            scheduler_json,
            interpolation_type="linear",
            use_karras_sigmas=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
        )
    return euler.EulerConfig.from_json(scheduler_json)


def _dpm_config(name: str, scheduler_json: dict[str, Any]) -> dpm_solver.DPMSolverConfig:
    # DPM-Solver++(2M): the name fixes the algorithm, the order and the σ spacing.
    return dpm_solver.DPMSolverConfig.from_json(
        dict(
            scheduler_json,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=name == "dpm++2m-karras",
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
            use_lu_lambdas=False,
        )
    )


def _pndm_config(scheduler_json: dict[str, Any]) -> pndm.PNDMConfig:
    # PLMS is PNDM without the Runge–Kutta warm-up (what SD ships;
    # the warm-up's N + 9 evaluations exceed our plan rows).
    return pndm.PNDMConfig.from_json(dict(scheduler_json, skip_prk_steps=True))


def make_plan(
    name: str, scheduler_json: dict[str, Any], num_steps: int, *, eta: float = 0.0, first: int = 0
) -> table.Plan:
    """The named sampler's plan for a num_steps run, from row `first` on (img2img). eta is DDIM's only."""
    _check(name)
    if name == "ddim":
        return ddim.make_plan(ddim.DDIMConfig.from_json(scheduler_json), num_steps, eta=eta, first=first)
    if name in ("euler", "euler-ancestral"):
        return euler.make_plan(
            _euler_config(name, scheduler_json), num_steps, first=first, ancestral=name == "euler-ancestral"
        )
    if name in ("dpm++2m", "dpm++2m-karras"):
        return dpm_solver.make_plan(_dpm_config(name, scheduler_json), num_steps, first=first)
    return pndm.make_plan(_pndm_config(scheduler_json), num_steps, first=first)


def max_steps(name: str, scheduler_json: dict[str, Any]) -> int:
    """The most steps the named sampler allows with this config (all its timesteps inside training's range)."""
    _check(name)
    if name == "ddim":
        return ddim.max_steps(ddim.DDIMConfig.from_json(scheduler_json))
    if name in ("euler", "euler-ancestral"):
        return euler.max_steps(_euler_config(name, scheduler_json))
    if name in ("dpm++2m", "dpm++2m-karras"):
        return dpm_solver.max_steps(_dpm_config(name, scheduler_json))
    return pndm.max_steps(_pndm_config(scheduler_json))


def evaluations(name: str, num_steps: int) -> int:
    """UNet evaluations of a full num_steps run: PLMS evaluates the second timestep twice."""
    _check(name)
    if name == "plms":
        return num_steps + 1 if num_steps > 1 else 1
    return num_steps
