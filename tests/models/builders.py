"""Real transformers / diffusers model classes from small configs (MiniLM with its real weights)."""

import torch

from benchmarks.models import SENTENCES, minilm_path  # real text and weights, as the benchmarks use


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    return model, lambda batch: {"input_ids": torch.randint(0, 256, (batch, 24)), "use_cache": False}, lambda out: out.logits


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=16)
    model = MistralForCausalLM(config).eval()
    return model, lambda batch: {"input_ids": torch.randint(0, 256, (batch, 24)), "use_cache": False}, lambda out: out.logits


def bert_minilm():
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(minilm_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def inputs(batch):
        encoded = tokenizer(SENTENCES[:batch], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        return dict(encoded)

    return model, inputs, lambda out: out.last_hidden_state


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(config).eval()
    return model, lambda batch: {"pixel_values": torch.randn(batch, 3, 32, 32)}, lambda out: out.logits


def unet2d_condition():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()

    def inputs(batch):
        return {"sample": torch.randn(batch, 4, 16, 16), "timestep": torch.tensor(10),
                "encoder_hidden_states": torch.randn(batch, 7, 32), "return_dict": False}

    return model, inputs, lambda out: out[0]


def dit():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=16, patch_size=2, num_embeds_ada_norm=1000).eval()

    def inputs(batch):
        return {"hidden_states": torch.randn(batch, 4, 16, 16), "timestep": torch.full((batch,), 10),
                "class_labels": torch.randint(0, 1000, (batch,)), "return_dict": False}

    return model, inputs, lambda out: out[0]


MODELS = {
    "llama": llama,
    "mistral": mistral,
    "bert_minilm": bert_minilm,
    "vit": vit,
    "unet2d_condition": unet2d_condition,
    "dit": dit,
}
