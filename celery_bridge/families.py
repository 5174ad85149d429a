"""Model families: what a request may ask of a model, by the kind of pipeline behind it.

A catalogue entry's family (`sd1`, `sd2`, `sdxl`, `sd3`, `flux`) is detected from its
`model_index.json` (or set in the catalogue, as a hub id must be). The family says which sdgate
scheduler names apply and which diffusers class each means, the defaults a request gets, whether a
negative prompt means anything (FLUX.1's guidance is distilled: it has none, and a request that
sends one is refused rather than silently rendered without it), whether a guidance scale does
(FLUX.1 schnell is timestep-distilled: its transformer has no guidance input, so its requests are
keyed and rendered at guidance 0 whatever they send, in 4 steps by default; FLUX.1 dev's
transformer takes the guidance as an input, 28 steps at 3.5), whether its latents are packed
(FLUX.1's 2x2 patches), and whether the continuous loop can step it. The gateway checks a request
against its model's family before queueing it; the worker checks again for direct senders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

from client.protocol import GenerationRequest, InvalidRequest

FAMILY_NAMES = ("sd1", "sd2", "sdxl", "sd3", "flux")
# The UNet families' schedulers: sdgate's names for the diffusers classes (None: the model's own).
UNET_SCHEDULERS = {"default": None, "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
                   "lms": "LMSDiscreteScheduler"}
# Flow matching (SD 3.5, FLUX.1): the noise-prediction schedulers above do not apply.
FLOW_SCHEDULERS = {"default": None, "euler": "FlowMatchEulerDiscreteScheduler"}


@dataclass(frozen=True)
class Family:
    """What requests to one family's models may ask, and how its pipeline is driven."""

    name: str
    pipelines: Tuple[str, ...]  # diffusers pipeline classes of its text-to-image models
    schedulers: Dict[str, Optional[str]]
    side: int  # default width and height
    steps: int
    guidance: float
    negative_prompt: bool  # whether a negative prompt changes the image
    packed_latents: bool = False  # latents as (batch, patches, channels x 4), unpacked for previews
    continuous: bool = False  # the step-level loop can run it (celery_bridge/continuous.py)
    guidance_applies: bool = True  # False: the weights take no guidance (FLUX.1 schnell); requests get 0
    variant: Optional[str] = None  # FLUX.1: "dev" or "schnell", read from the transformer's config

    def check(self, request: GenerationRequest) -> None:
        """InvalidRequest naming the field when `request` asks what this family cannot do."""
        if request.scheduler is not None and request.scheduler not in self.schedulers:
            raise InvalidRequest("scheduler", f"{request.scheduler!r} does not apply to {self.name} models "
                                 f"(they take {', '.join(self.schedulers)}); leave it out for the model's own")
        if request.negative_prompt and not self.negative_prompt:
            raise InvalidRequest("negative_prompt", f"{self.name} models have no negative prompt (their guidance is "
                                 "distilled); describe what you want in the prompt, and leave this out")


FAMILIES: Dict[str, Family] = {family.name: family for family in (
    Family("sd1", ("StableDiffusionPipeline",), UNET_SCHEDULERS, 512, 25, 7.5, True, continuous=True),
    Family("sd2", ("StableDiffusionPipeline",), UNET_SCHEDULERS, 768, 25, 7.5, True, continuous=True),
    Family("sdxl", ("StableDiffusionXLPipeline",), UNET_SCHEDULERS, 1024, 30, 5.0, True, continuous=True),
    Family("sd3", ("StableDiffusion3Pipeline",), FLOW_SCHEDULERS, 1024, 28, 4.5, True),
    Family("flux", ("FluxPipeline",), FLOW_SCHEDULERS, 1024, 28, 3.5, False, packed_latents=True),
)}


FLUX_DEV = replace(FAMILIES["flux"], variant="dev")
FLUX_SCHNELL = replace(FAMILIES["flux"], steps=4, guidance=0.0, guidance_applies=False, variant="schnell")


def rules_for(name: str, folder: Optional[Path]) -> Family:
    """The rules for a model of family `name` whose weights or configs are in `folder` (None: not
    readable here, as a hub id's): FLUX.1 by its transformer's `guidance_embeds`, schnell without
    them, dev with them or when the folder cannot say."""
    if name != "flux":
        return FAMILIES[name]
    try:
        transformer = json.loads((Path(folder).expanduser() / "transformer" / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return FLUX_DEV
    return FLUX_DEV if transformer.get("guidance_embeds", False) else FLUX_SCHNELL


def family_of_folder(folder: Path) -> Optional[str]:
    """The family of a diffusers folder from its model_index.json (SD 2.x by its 1024-wide text
    conditioning); None when the folder has none, or names a pipeline no family has."""
    try:
        index = json.loads((Path(folder).expanduser() / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    pipeline = str(index.get("_class_name"))
    if pipeline == "StableDiffusionPipeline":
        try:
            unet = json.loads((Path(folder).expanduser() / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            unet = {}
        return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"
    return next((name for name, family in FAMILIES.items() if pipeline in family.pipelines), None)
