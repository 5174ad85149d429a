"""Single-file checkpoints: write a diffusers Stable Diffusion 1.x folder as one `.safetensors`
file in the original (LDM, A1111/Civitai) layout, the form `from_single_file` reads.

Operators bring such files; sdgate needs to make one only to prove, with its own tiny models, that
a single file renders exactly what its folder renders. The key layout is derived from the
model's own config, so any SD 1.x-shaped UNet/VAE converts, not just the standard sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def _unet_prefixes(config: dict) -> List[Tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every block of a UNet2DConditionModel config."""
    layers = config["layers_per_block"]
    stride = layers + 1  # LDM numbers the blocks of one level consecutively: resnets, then a resampler
    pairs = [("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    levels = len(config["down_block_types"])
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * stride + j}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * stride + j}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * stride}.0.op."))
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(layers + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * stride + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * stride + j}.1."))
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * stride + layers}."
                                                      f"{2 if has_attention else 1}."))
    return pairs


def unet_to_ldm(state: Dict[str, object], config: dict) -> Dict[str, object]:
    prefixes = _unet_prefixes(config)
    out = {}
    for key, value in state.items():
        new = key
        for hf, ldm in prefixes:
            if key.startswith(hf):
                rest = key[len(hf):]
                if ".resnets." in hf or hf.startswith("mid_block.resnets"):
                    for hf_part, ldm_part in _UNET_RESNET:
                        if rest.startswith(hf_part + "."):
                            rest = ldm_part + rest[len(hf_part):]
                            break
                new = ldm + rest
                break
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(state: Dict[str, object], config: dict) -> Dict[str, object]:
    levels = len(config["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    for i in range(levels):
        for j in range(config["layers_per_block"] + 1):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    out = {}
    for key, value in state.items():
        new = key
        for hf, ldm in pairs:
            if key.startswith(hf):
                rest = key[len(hf):]
                if "attentions" in hf:
                    for hf_part, ldm_part in _VAE_ATTENTION:
                        if rest.startswith(hf_part):
                            rest = ldm_part + rest[len(hf_part):]
                            break
                    if rest.endswith("weight") and getattr(value, "ndim", 0) == 2:
                        value = value.reshape(*value.shape, 1, 1)  # LDM's attention uses 1x1 convolutions
                new = ldm + rest.replace("conv_shortcut", "nin_shortcut")
                break
        else:
            new = key.replace("conv_shortcut", "nin_shortcut")
        out[VAE_PREFIX + new] = value
    return out


def export_single_file(folder: Path, target: Path) -> Path:
    """Write the UNet, VAE and text encoder of the diffusers folder as one LDM-layout safetensors file."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)

    def weights(component: str) -> Dict[str, object]:
        files = sorted((folder / component).glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{folder / component} must hold exactly one .safetensors file, found {len(files)}")
        return load_file(str(files[0]))

    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    state: Dict[str, object] = {}
    state.update(unet_to_ldm(weights("unet"), config("unet")))
    state.update(vae_to_ldm(weights("vae"), config("vae")))
    # transformers 5 saves CLIPTextModel without its `text_model.` level; SD files always have it.
    state.update({TEXT_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v
                  for k, v in weights("text_encoder").items()})
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target
