"""Train the small diffusion models that ``benchmarks.step_cache`` measures caching error on.

    python -m benchmarks.train_diffusion [--model unet|dit|both] [--steps N] [--threads N]

Random weights say nothing about how much a step cache changes the images, so the step cache is
measured on real (if small) denoisers: a ``diffusers.UNet2DModel`` and a class-conditional
``diffusers.DiTTransformer2DModel`` trained as DDPMs (epsilon prediction, 1000-step linear
schedule, ``DDPMScheduler.add_noise``) on scikit-learn's bundled ``load_digits`` images: 1797
8x8 greyscale digits, upsampled to 16x16 and scaled to [-1, 1]. A few minutes of CPU each.

The weights are saved in fp16 with ``save_pretrained`` under ``benchmarks/weights/`` (a few MB;
``from_pretrained(..., torch_dtype=torch.float32)`` loads them back as fp32).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTS = Path(__file__).resolve().parent / "weights"
IMAGE_SIZE = 16
NUM_CLASSES = 10


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 16, 16] in [-1, 1], labels [N])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


def build_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=8,
        num_attention_heads=2,
        attention_head_dim=32,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_num_groups=1,
    )


def denoiser_call(model, noisy: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if type(model).__name__ == "DiTTransformer2DModel":
        return model(noisy, timestep=t, class_labels=labels).sample
    return model(noisy, t).sample


def train(model, steps: int, batch: int, lr: float, seed: int = 0) -> list[float]:
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(seed)
    images, labels = digits_dataset()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item())
    )
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch,), generator=generator)
        clean, label = images[index], labels[index]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, t)
        loss = F.mse_loss(denoiser_call(model, noisy, t, label), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step:5d}  loss {recent:.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("unet", "dit", "both"), default="both")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="the CPU is shared: keep this small")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builders = {"unet": (build_unet, 2e-3), "dit": (build_dit, 1e-3)}
    for name in ("unet", "dit") if args.model == "both" else (args.model,):
        build, lr = builders[name]
        model = build()
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f}M parameters, {args.steps} steps of batch {args.batch}")
        losses = train(model, args.steps, args.batch, lr)
        out = WEIGHTS / f"digits_{name}"
        model.to(torch.float16).save_pretrained(out)
        print(f"{name}: final loss {sum(losses[-200:]) / 200:.4f}, saved to {out}")


if __name__ == "__main__":
    main()
