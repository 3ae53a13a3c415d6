"""Denoising UNet for 2D images and 3D volumes (one code path through `spatial_dims`).

Architecture: ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"):
residual blocks with GroupNorm, the timestep (and class) embedding applied as FiLM scale/shift
after the second norm (`h = GN(h) * (1 + scale) + shift`), self-attention at chosen levels,
skip connections concatenated on the way up. The level layout (channel change in the first
block of a level, strided-conv downsampling, nearest+conv upsampling, `num_res_blocks + 1`
blocks per up level) follows MONAI's `DiffusionModelUNet` so that both reach the same parameter
count at the same channel plan; `build_denoiser(..., backbone="monai")` selects MONAI's network
as the reference.

Why our own network (measured in eval/bench_diffusion.py on an H200, numbers in eval/RESULTS.md):
- GroupNorm runs in the activation dtype (bf16 under autocast; the kernel still accumulates the
  statistics in fp32) instead of autocast's fp32 upcast: half the bytes for every norm, and
  about 25% less peak memory than MONAI's network at the same plan;
- all per-block FiLM projections are one matmul per step instead of two small kernels per block;
- attention goes through `scaled_dot_product_attention` (flash / memory-efficient kernels) and,
  in channels-last memory, reads its tokens `(B, N, C)` as a free view;
- no Python-side shape checks or data-dependent control flow, so `torch.compile` captures the
  whole forward in one graph. Compiled, the network runs best in channels-last(-3d) memory
  (`set_channels_last(True)`): cuDNN's implicit-GEMM convolutions are ~40% faster there and
  inductor's fused GroupNorm+FiLM+SiLU kernels read any layout. In eager mode PyTorch's CUDA
  GroupNorm (<= 2.11) copies channels-last inputs to contiguous, so eager keeps channels-first.

Class conditioning: an embedding table with `num_classes + 1` rows; row `num_classes` is the
learned null class used for classifier-free guidance (Ho & Salimans 2021). Labels < 0 (unknown)
map to the null class too.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medgen.models.layers import GroupNorm

__all__ = ["UNet", "build_denoiser", "MonaiUNet", "timestep_embedding", "denoiser_from_config"]


def _conv(spatial_dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return conv(cin, cout, kernel, stride=stride, padding=kernel // 2)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of timesteps `t` (B,) -> (B, dim), float32.

    Same layout as ADM / diffusers with `flip_sin_to_cos=True`: [cos(t w_k), sin(t w_k)],
    w_k = max_period^(-k / (dim/2)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, GN with FiLM(scale, shift), SiLU, dropout, conv (zero init)."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.cout = cout
        self.norm1 = GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = _conv(spatial_dims, cin, cout)
        # No affine here: the FiLM scale/shift from the embedding replaces it (ADM's
        # "scale-shift norm").
        self.norm2 = GroupNorm(groups, cout, eps=1e-6, affine=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _zero(_conv(spatial_dims, cout, cout))
        self.skip = _conv(spatial_dims, cin, cout, kernel=1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        # film: (B, 2*cout) -> scale, shift broadcast over the spatial axes
        h = self.conv1(F.silu(self.norm1(x)))
        film = film.view(film.shape[0], 2 * self.cout, *([1] * (h.ndim - 2))).to(h.dtype)
        scale, shift = film.chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), scale + 1.0)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all voxels through `scaled_dot_product_attention`."""

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        spatial = x.shape[2:]
        # (B, C, *S) -> (B, N, C): a view when x is channels-last
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        N = tokens.shape[1]
        qkv = self.qkv(tokens).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, C/heads)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)
        # (B, N, C) -> (B, C, *S): channels-last strides, no copy
        return x + out.transpose(1, 2).reshape(B, C, *spatial)


class Downsample(nn.Module):
    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.conv = _conv(spatial_dims, channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.conv = _conv(spatial_dims, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Res blocks (each optionally followed by attention) of one resolution level."""

    def __init__(self, blocks: Sequence[ResBlock], attns: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class UNet(nn.Module):
    """ADM-style denoiser `eps/v/x0 = f(x_t, t, label)` for `spatial_dims` 2 or 3.

    Args (all keyword, all saved in `self.config` so the network rebuilds from JSON):
        spatial_dims: 2 or 3.
        in_channels / out_channels: image or latent channels (out defaults to in).
        channels: channels per resolution level; each level after the first halves the size.
        num_res_blocks: residual blocks per down level (up levels get one more, for the skips).
        attention_levels: per level, whether each block is followed by self-attention. The
            middle block always has attention when the lowest level has.
        head_channels: channels per attention head.
        norm_groups: GroupNorm groups (must divide every entry of `channels`).
        num_classes: 0 for unconditional; else class-conditional with a learned null class.
        dropout: dropout inside the residual blocks.
        gradient_checkpointing: recompute each block in the backward pass (less memory).
        channels_last: run activations in channels-last(-3d) memory (best under
            `torch.compile` on GPU; see the module docstring).
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int = 2,
        attention_levels: Sequence[bool] = (False, False, True, True),
        head_channels: int = 64,
        norm_groups: int = 32,
        num_classes: int = 0,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        attention_levels = [bool(a) for a in attention_levels]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(attention_levels) != len(channels):
            raise ValueError(f"attention_levels {attention_levels} must have one entry per level of channels {channels}")
        if any(c % norm_groups for c in channels):
            raise ValueError(f"norm_groups={norm_groups} must divide every entry of channels {channels}")
        out_channels = out_channels or in_channels
        self.config: dict[str, Any] = dict(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=channels,
            num_res_blocks=num_res_blocks, attention_levels=attention_levels, head_channels=head_channels,
            norm_groups=norm_groups, num_classes=num_classes, dropout=dropout,
            gradient_checkpointing=gradient_checkpointing, channels_last=channels_last,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.null_label = num_classes  # index of the learned null class
        self.gradient_checkpointing = gradient_checkpointing
        self.downsample_levels = len(channels) - 1

        ch0 = channels[0]
        emb_dim = 4 * ch0
        self.time_dim = ch0
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, cout, norm_groups, dropout)

        def attn(c: int, on: bool) -> nn.Module:
            return SelfAttention(c, head_channels, norm_groups) if on else nn.Identity()

        self.conv_in = _conv(spatial_dims, in_channels, ch0)
        # down: level i turns channels[i-1] into channels[i] in its first block
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [ch0]
        cin = ch0
        for i, c in enumerate(channels):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res(cin, c))
                attns.append(attn(c, attention_levels[i]))
                cin = c
                skip_channels.append(c)
            self.down.append(Level(blocks, attns))
            if i < len(channels) - 1:
                self.downsamplers.append(Downsample(spatial_dims, c))
                skip_channels.append(c)
        # middle
        self.mid_block1 = res(cin, cin)
        self.mid_attn = attn(cin, attention_levels[-1])
        self.mid_block2 = res(cin, cin)
        # up: num_res_blocks + 1 blocks per level, each eating one skip
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(cin + skip_channels.pop(), c))
                attns.append(attn(c, attention_levels[i]))
                cin = c
            self.up.append(Level(blocks, attns))
            if i > 0:
                self.upsamplers.append(Upsample(spatial_dims, c))
        self.norm_out = GroupNorm(norm_groups, ch0, eps=1e-6)
        self.conv_out = _zero(_conv(spatial_dims, ch0, out_channels))

        # One matmul for all FiLM projections (fewer small kernels than one per block).
        res_blocks = [m for m in self.modules() if isinstance(m, ResBlock)]  # forward order
        self._film_sizes = [2 * b.cout for b in res_blocks]
        self.film = nn.Linear(emb_dim, sum(self._film_sizes))
        self.set_channels_last(channels_last)

    def set_channels_last(self, enabled: bool = True) -> "UNet":
        """Run activations in channels-last(-3d) memory (or not).

        Only the activations change layout: convolutions follow their input's layout, and the
        weights stay contiguous so checkpoints (safetensors) never see strided tensors.
        """
        self.channels_last = bool(enabled)
        self.config["channels_last"] = self.channels_last
        return self

    def compile_blocks(self, **options: Any) -> "UNet":
        """Regional compilation: `torch.compile` each residual block and attention layer in place
        (`nn.Module.compile`; weights and state_dict keys unchanged) instead of the whole network.

        Dynamo treats module parameters as graph inputs, so every block of one class and input
        signature reuses one compiled graph: the warm-up compiles a few small graphs instead of
        one graph of the whole UNet (measured in eval/bench_compile.py, eval/RESULTS.md). The
        glue between blocks (embedding, skips, up/downsampling) stays eager.
        """
        for m in self.modules():
            if isinstance(m, (ResBlock, SelfAttention)):
                m.compile(**options)
        return self

    # ------------------------------------------------------------------ forward
    def embed(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Timestep (+ class) embedding (B, 4*channels[0])."""
        emb = self.time_embed(timestep_embedding(t, self.time_dim).to(self.time_embed[0].weight.dtype))
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full((t.shape[0],), self.null_label, dtype=torch.long, device=t.device)
            labels = torch.where((labels < 0) | (labels >= self.num_classes), self.null_label, labels.long())
            emb = emb + self.class_embed(labels)
        return emb

    def _res(self, block: ResBlock, h: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, film, use_reentrant=False)
        return block(h, film)

    def _attn(self, attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if isinstance(attn, nn.Identity):
            return h
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(attn, h, use_reentrant=False)
        return attn(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, *S) noisy input, t (B,) timesteps (int or float), labels (B,) or None -> (B, C_out, *S)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, labels)
        films = iter(self.film(F.silu(emb)).split(self._film_sizes, dim=1))
        if self.channels_last:
            x = x.contiguous(memory_format=_memory_format(self.spatial_dims))
        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                h = self._attn(attn, self._res(block, h, next(films)))
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
                skips.append(h)
        h = self._res(self.mid_block1, h, next(films))
        h = self._attn(self.mid_attn, h)
        h = self._res(self.mid_block2, h, next(films))
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns):
                h = torch.cat([h, skips.pop()], dim=1)
                h = self._attn(attn, self._res(block, h, next(films)))
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.contiguous()


class MonaiUNet(nn.Module):
    """MONAI `DiffusionModelUNet` behind the same `forward(x, t, labels)` (the reference backbone)."""

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (64, 128, 256, 512),
        num_res_blocks: int = 2,
        attention_levels: Sequence[bool] = (False, False, True, True),
        head_channels: int = 64,
        norm_groups: int = 32,
        num_classes: int = 0,
        use_flash_attention: bool = True,
        **_: Any,
    ):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        out_channels = out_channels or in_channels
        channels = [int(c) for c in channels]
        attention_levels = [bool(a) for a in attention_levels]
        self.config: dict[str, Any] = dict(
            backbone="monai", spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            channels=channels, num_res_blocks=num_res_blocks, attention_levels=attention_levels,
            head_channels=head_channels, norm_groups=norm_groups, num_classes=num_classes,
            use_flash_attention=use_flash_attention,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.null_label = num_classes
        self.downsample_levels = len(channels) - 1
        self.net = DiffusionModelUNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=channels,
            num_res_blocks=num_res_blocks, attention_levels=attention_levels, num_head_channels=head_channels,
            norm_num_groups=norm_groups, num_class_embeds=(num_classes + 1) if num_classes > 0 else None,
            use_flash_attention=use_flash_attention,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.num_classes > 0:
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            labels = torch.where((labels < 0) | (labels >= self.num_classes), self.null_label, labels.long())
            return self.net(x, t, class_labels=labels)
        return self.net(x, t)


def build_denoiser(backbone: str = "medgen", **kwargs: Any) -> nn.Module:
    """`backbone="medgen"` (ours) or `"monai"` (MONAI DiffusionModelUNet, the reference)."""
    if backbone in ("medgen", "adm", "unet"):
        kwargs.pop("use_flash_attention", None)
        return UNet(**kwargs)
    if backbone == "monai":
        for k in ("dropout", "gradient_checkpointing", "channels_last"):
            kwargs.pop(k, None)
        return MonaiUNet(**kwargs)
    raise ValueError(f"model.backbone must be 'medgen' or 'monai', got {backbone!r}")


def denoiser_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a denoiser from its saved `config` dict (as written to `model/config.json`)."""
    config = dict(config)
    return build_denoiser(config.pop("backbone", "medgen"), **config)
