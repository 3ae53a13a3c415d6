"""A 2D denoiser as diffusers' `UNet2DModel` (`DIR/unet/`), weights mapped tensor by tensor.

Both backbones are diffusers' ADM-style UNet in another naming: the same residual blocks
(GroupNorm-SiLU-conv, the timestep embedding projected per block, skip convolutions), the same
attention (GroupNorm, q/k/v/out projections, residual), strided-conv downsampling, nearest +
conv upsampling, `num_res_blocks + 1` blocks per up level and the sinusoidal embedding with cos
first (`flip_sin_to_cos=True`, `freq_shift=0`). What differs is spelled in the config:

- medgen's blocks apply the embedding as FiLM scale/shift after an affine-free GroupNorm
  (`resnet_time_scale_shift="scale_shift"`; the norm gets weight 1 and bias 0) and compute every
  block's projection in one matmul (`UNet.film`, split here into the blocks' `time_emb_proj`);
  its middle block has attention only when the lowest level has (`add_attention`);
- MONAI's blocks add the projected embedding (`resnet_time_scale_shift="default"`) and its middle
  block always has attention.

3D has no such target: diffusers' only UNet over a depth axis, `UNet3DConditionModel`, is a video
network (2D convolutions per frame, temporal convolutions and attention, cross-attention to text
embeddings), not a 3D-convolution UNet (measured in tests/test_export.py). `convert_unet` is checked
against the source network's output at every export and in tests/test_export.py.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from medgen.errors import RunError

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def unet2d_config(config: dict[str, Any], sample_size: int) -> dict[str, Any]:
    """`UNet2DModel` keyword arguments for a medgen denoiser `config` (model/config.json's
    `params` with its `backbone`); RunError when diffusers cannot express it."""
    p, backbone = config["params"], config.get("backbone", "medgen")
    if int(p["spatial_dims"]) != 2:
        raise RunError("diffusers' UNet2DModel is 2D only; a 3D denoiser has no diffusers UNet class to load into")
    channels, attention = [int(c) for c in p["channels"]], [bool(a) for a in p["attention_levels"]]
    head = int(p["head_channels"])
    attended = [c for c, a in zip(channels, attention) if a] + ([channels[-1]] if backbone == "monai" else [])
    if any(c % head for c in attended):
        raise RunError(f"head_channels={head} does not divide the attention levels' channels {attended}: "
                       f"diffusers' attention splits channels into channels // head_channels heads of head_channels each")
    num_classes = int(p.get("num_classes") or 0)
    return dict(
        sample_size=sample_size, in_channels=int(p["in_channels"]), out_channels=int(p.get("out_channels") or p["in_channels"]),
        block_out_channels=channels, layers_per_block=int(p["num_res_blocks"]),
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        norm_num_groups=int(p["norm_groups"]), attn_norm_num_groups=int(p["norm_groups"]), norm_eps=1e-6,
        attention_head_dim=head, num_class_embeds=num_classes + 1 if num_classes else None,
        resnet_time_scale_shift="scale_shift" if backbone == "medgen" else "default",
        add_attention=backbone == "monai" or attention[-1], flip_sin_to_cos=True, freq_shift=0,
        time_embedding_type="positional", act_fn="silu", downsample_padding=1, center_input_sample=False,
    )


def _medgen_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """medgen `UNet` weights under diffusers' names."""
    from medgen.models.unet import ResBlock, SelfAttention

    src = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}  # medgen module name -> diffusers module name
    for i, level in enumerate(net.down):
        names |= {f"down.{i}.blocks.{j}": f"down_blocks.{i}.resnets.{j}" for j in range(len(level.blocks))}
        names |= {f"down.{i}.attns.{j}": f"down_blocks.{i}.attentions.{j}" for j in range(len(level.attns))}
    for i in range(len(net.downsamplers)):
        names[f"downsamplers.{i}.conv"] = f"down_blocks.{i}.downsamplers.0.conv"
    names |= {"mid_block1": "mid_block.resnets.0", "mid_attn": "mid_block.attentions.0", "mid_block2": "mid_block.resnets.1"}
    for i, level in enumerate(net.up):
        names |= {f"up.{i}.blocks.{j}": f"up_blocks.{i}.resnets.{j}" for j in range(len(level.blocks))}
        names |= {f"up.{i}.attns.{j}": f"up_blocks.{i}.attentions.{j}" for j in range(len(level.attns))}
    for i in range(len(net.upsamplers)):
        names[f"upsamplers.{i}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    names |= {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "class_embed": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    # one FiLM matmul for all blocks, in forward order (= module order) -> each block's time_emb_proj
    blocks = [name for name, m in net.named_modules() if isinstance(m, ResBlock)]
    films = zip(blocks, src["film.weight"].split(net._film_sizes), src["film.bias"].split(net._film_sizes))
    for block, w, b in films:
        d = names[block]
        out[f"{d}.time_emb_proj.weight"], out[f"{d}.time_emb_proj.bias"] = w, b
        cout = w.shape[0] // 2
        out[f"{d}.norm2.weight"], out[f"{d}.norm2.bias"] = torch.ones(cout), torch.zeros(cout)  # affine-free in medgen
        for part, new in (("norm1", "norm1"), ("conv1", "conv1"), ("conv2", "conv2"), ("skip", "conv_shortcut")):
            for kind in ("weight", "bias"):
                if f"{block}.{part}.{kind}" in src:
                    out[f"{d}.{new}.{kind}"] = src[f"{block}.{part}.{kind}"]
    for name, m in net.named_modules():
        if isinstance(m, SelfAttention):
            d = names[name]
            for kind in ("weight", "bias"):
                q, k, v = src[f"{name}.qkv.{kind}"].chunk(3)  # rows: all q heads, all k heads, all v heads
                out |= {f"{d}.to_q.{kind}": q, f"{d}.to_k.{kind}": k, f"{d}.to_v.{kind}": v,
                        f"{d}.group_norm.{kind}": src[f"{name}.norm.{kind}"], f"{d}.to_out.0.{kind}": src[f"{name}.proj.{kind}"]}
    for name in ("time_embed.0", "time_embed.2", "class_embed", "conv_in", "norm_out", "conv_out") + tuple(
            k for k in names if "samplers" in k):
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" in src:
                out[f"{names[name]}.{kind}"] = src[f"{name}.{kind}"]
    return out


# MONAI DiffusionModelUNet name -> diffusers UNet2DModel name (regular expressions, applied in order)
_MONAI_NAMES = [
    (r"^conv_in\.conv\.", "conv_in."), (r"^time_embed\.0\.", "time_embedding.linear_1."),
    (r"^time_embed\.2\.", "time_embedding.linear_2."), (r"^out\.0\.", "conv_norm_out."), (r"^out\.2\.conv\.", "conv_out."),
    (r"^middle_block\.resnet_1\.", "mid_block.resnets.0."), (r"^middle_block\.resnet_2\.", "mid_block.resnets.1."),
    (r"^middle_block\.attention\.", "mid_block.attentions.0."),
    (r"\.downsampler\.op\.conv\.", ".downsamplers.0.conv."), (r"\.upsampler\.postconv\.conv\.", ".upsamplers.0.conv."),
    (r"\.(conv1|conv2)\.conv\.", r".\1."), (r"\.skip_connection\.conv\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"(attentions\.\d+)\.attn\.out_proj\.", r"\1.to_out.0."),
    (r"(attentions\.\d+)\.attn\.(to_[qkv])\.", r"\1.\2."),
]


def _monai_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """MONAI `DiffusionModelUNet` weights (medgen's `MonaiUNet.net`) under diffusers' names."""
    out = {}
    for name, value in net.net.state_dict().items():
        for pattern, new in _MONAI_NAMES:
            name = re.sub(pattern, new, name)
        out[name] = value
    return out


def convert_unet(net: torch.nn.Module, config: dict[str, Any], sample_size: int):
    """diffusers `UNet2DModel` computing what `net` computes (float32, eval mode); RunError when
    diffusers cannot express it or a tensor finds no place (named)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet2d_config(config, sample_size))
    state = _medgen_state(net) if config.get("backbone", "medgen") == "medgen" else _monai_state(net)
    expected = unet.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise RunError(f"the denoiser does not map onto diffusers' UNet2DModel: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}, shapes differ {sorted(wrong)[:3]}")
    unet.load_state_dict({k: v.detach().float().contiguous() for k, v in state.items()}, strict=True)
    return unet.eval()
