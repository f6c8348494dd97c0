"""A tiny convolutional vision tower that LLaVA can use like SigLIP.

Why: a ViT trained from scratch needs far more data and steps than the embedded default has
(on the synthetic set it stays at chance for presence after thousands of CPU steps), while a
small CNN learns lesion features in a few hundred. The tower emits patch tokens
(B, grid*grid, hidden) with learned position embeddings, like a ViT, so LLaVA's projector,
the processor's image-token count and the vision-relevance reward see the same layout.

Two classic CNN tricks make a small lesion findable from every token, not just the 1-4 tokens
it covers: CoordConv (pixel x/y as extra input channels, so features can encode where they
fire) and a global max-pool over the grid added to every token (the max of "lesion here x
x-coordinate" is the lesion's extent, i.e. a box regressor for free).

A third makes "where is the lesion" readable from every token too: a detector pool. A learned
objectness logit per patch (warmed up to point at the first box in reading order) weights a
softmax pool of the patch tokens, and the pooled token is added to every token. After the
warm-up it carries the first lesion's box-edge code (:mod:`unveil.models.coord_features`),
so the language model can copy the box without first learning to attend to one patch of 64.

``slot_tokens=K`` (0 here; ``conf/model/tiny_llava.yaml`` sets 2): K more detector pools, one
per box in reading order, each emitted as its own token after the patch tokens (like a ViT's CLS
token, but at the end). Added to every token, a second box's code gets mixed up with the first
(tried: IoU fell); as a token at a fixed position, the language model can read "box k" from
"slot k".

Registered with transformers' Auto classes on import, so ``save_pretrained`` /
``from_pretrained`` of the whole LLaVA work offline without ``trust_remote_code``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling


class ConvVisionConfig(PretrainedConfig):
    model_type = "unveil_conv_vision"

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        num_channels: int = 3,
        hidden_size: int = 96,
        widths: tuple[int, ...] = (32, 48, 64),
        num_hidden_layers: int = 1,
        num_attention_heads: int = 4,
        detector_pool: bool = True,
        slot_tokens: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.hidden_size, self.widths = hidden_size, list(widths)
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.detector_pool = detector_pool
        self.slot_tokens = int(slot_tokens)
        if self.slot_tokens < 0:
            raise ValueError(f"slot_tokens must be >= 0, got {slot_tokens}")


class ConvVisionModel(PreTrainedModel):
    config_class = ConvVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "conv_vision"
    # No HF attention kernels inside: any attn_implementation LLaVA asks for is fine.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: ConvVisionConfig):
        super().__init__(config)
        grid = config.image_size // config.patch_size
        n_down = config.patch_size.bit_length() - 1  # stride-2 stages to go from pixels to the patch grid
        if 2**n_down != config.patch_size:
            raise ValueError(f"patch_size must be a power of two, got {config.patch_size}")
        layers, c_in = (
            [nn.Conv2d(config.num_channels + 2, config.widths[0], 3, padding=1), nn.GELU()],
            config.widths[0],
        )
        for i in range(n_down):
            c_out = config.widths[min(i + 1, len(config.widths) - 1)] if i < n_down - 1 else config.hidden_size
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            c_in = c_out
        self.stem = nn.Sequential(*layers)
        self.position_embedding = nn.Parameter(torch.zeros(1, grid * grid, config.hidden_size))
        self.global_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.hidden_size,
                config.num_attention_heads,
                2 * config.hidden_size,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)
        if config.detector_pool:
            self.objectness = nn.Linear(config.hidden_size, 1)
            self.pool_proj = nn.Linear(config.hidden_size, config.hidden_size)
        if config.slot_tokens:
            self.slot_objectness = nn.Linear(config.hidden_size, config.slot_tokens)
            self.slot_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.slot_embedding = nn.Parameter(torch.zeros(1, config.slot_tokens, config.hidden_size))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif module is self:
            nn.init.normal_(self.position_embedding, std=0.02)
            if self.config.detector_pool:  # the pooled token starts as a plain copy
                nn.init.eye_(self.pool_proj.weight)
                nn.init.zeros_(self.pool_proj.bias)
            if self.config.slot_tokens:  # a slot token starts as its pooled token plus "which slot"
                nn.init.eye_(self.slot_proj.weight)
                nn.init.zeros_(self.slot_proj.bias)
                nn.init.normal_(self.slot_embedding, std=0.02)

    def encode(self, pixel_values: torch.Tensor):
        """Patch tokens before the pool, per-layer states, objectness logits (B, N) and pooled token (B, C)."""
        px = pixel_values.to(self.stem[0].weight.dtype)
        b, _, h, w = px.shape
        ys = torch.linspace(-1, 1, h, device=px.device, dtype=px.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=px.device, dtype=px.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = self.stem(torch.cat([px, xs, ys], dim=1))  # (B, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, C), row-major patches
        x = x + self.position_embedding + self.global_proj(x.amax(dim=1, keepdim=True))
        states = [x]
        for layer in self.encoder:
            x = layer(x)
            states.append(x)
        x = self.norm(x)
        states[-1] = x
        if not self.config.detector_pool:
            return x, states, None, x.mean(1)
        logits = self.objectness(x).squeeze(-1)
        pooled = torch.einsum("bn,bnc->bc", logits.softmax(-1), x)
        return x, states, logits, pooled

    def slots(self, x: torch.Tensor):
        """Per-slot objectness logits (B, K, N) and pooled tokens (B, K, C) from the normed patch tokens."""
        logits = self.slot_objectness(x).transpose(1, 2)
        return logits, torch.einsum("bkn,bnc->bkc", logits.softmax(-1), x)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        x, states, logits, pooled = self.encode(pixel_values)
        patches = x
        if logits is not None:
            x = x + self.pool_proj(pooled).unsqueeze(1)
        if self.config.slot_tokens:
            _, slot_pooled = self.slots(patches)
            x = torch.cat([x, self.slot_proj(slot_pooled) + self.slot_embedding], dim=1)
        states[-1] = x
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=tuple(states))


AutoConfig.register(ConvVisionConfig.model_type, ConvVisionConfig, exist_ok=True)
AutoModel.register(ConvVisionConfig, ConvVisionModel, exist_ok=True)
