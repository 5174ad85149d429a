"""Single-file checkpoints: write a diffusers Stable Diffusion 1.x or SDXL folder as one
`.safetensors` file in the original (LDM, A1111/Civitai) layout, the form `from_single_file` reads.

Operators bring such files; sdgate needs to make one only to prove, with its own tiny models, that
a single file renders exactly what its folder renders. The key layout is derived from the
model's own config, so any SD 1.x- or SDXL-shaped UNet/VAE converts, not just the standard sizes.
SDXL's second text encoder is stored as OpenCLIP stores it (fused q/k/v, `resblocks`, a transposed
projection), as in Stability's files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")  # CLIP-L, OpenCLIP-G
_OPENCLIP_LAYER = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
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
             ("mid_block.resnets.1.", "middle_block.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]  # SDXL
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


def _with_text_model(state: Dict[str, object]) -> Dict[str, object]:
    """A CLIP text encoder's weights under `text_model.` (transformers 5 saves CLIPTextModel without
    that level; SD files always have it)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state.items()}


def clip_to_openclip(state: Dict[str, object]) -> Dict[str, object]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's names, as SDXL files hold the second encoder."""
    import torch

    out: Dict[str, object] = {}
    fused: Dict[Tuple[str, str], Dict[str, object]] = {}
    for key, value in _with_text_model(state).items():
        layer = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies from the right
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif layer is not None:
            index, rest = layer.groups()
            qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qkv is not None:
                fused.setdefault((index, qkv[2]), {})[qkv[1]] = value
                continue
            for hf, openclip in _OPENCLIP_LAYER:
                rest = rest.replace(hf, openclip)
            out[f"transformer.resblocks.{index}.{rest}"] = value
        elif not key.endswith("position_ids"):
            raise ValueError(f"no OpenCLIP name for text encoder weight {key!r}")
    for (index, kind), parts in fused.items():
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def export_single_file(folder: Path, target: Path) -> Path:
    """Write the UNet, VAE and text encoder(s) of the diffusers folder (SD 1.x or SDXL) as one
    LDM-layout safetensors file."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)

    def weights(component: str) -> Dict[str, object]:
        files = sorted((folder / component).glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{folder / component} must hold exactly one .safetensors file, found {len(files)}")
        return load_file(str(files[0]))

    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    pipeline = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    state: Dict[str, object] = {}
    state.update(unet_to_ldm(weights("unet"), config("unet")))
    state.update(vae_to_ldm(weights("vae"), config("vae")))
    if pipeline == "StableDiffusionPipeline":
        state.update({TEXT_PREFIX + k: v for k, v in _with_text_model(weights("text_encoder")).items()})
    elif pipeline == "StableDiffusionXLPipeline":
        clip, openclip = SDXL_TEXT_PREFIXES
        state.update({clip + k: v for k, v in _with_text_model(weights("text_encoder")).items()})
        state.update({openclip + k: v for k, v in clip_to_openclip(weights("text_encoder_2")).items()})
    else:
        raise ValueError(f"{folder} holds a {pipeline}; single files are written for Stable Diffusion 1.x and SDXL")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target
