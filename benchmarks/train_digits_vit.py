"""Train the small ViT classifier that benchmarks/token_skip.py measures (real data, real weights).

    python -m benchmarks.train_digits_vit   # ~7 minutes on one CPU core, writes the weights

scikit-learn's ``load_digits`` (1797 8x8 grey images, 10 classes), upsampled to 32x32 so that
a patch size of 4 gives 64 patches (+ [CLS] = 65 tokens). A fixed split keeps the last 360
images (20%) for the test set. ``transformers.ViTForImageClassification`` with 4 blocks of
width 64; the weights (fp32, ~0.9 MB) are committed in ``benchmarks/weights/digits_vit.pt``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_vit.pt"
TEST_SIZE = 360


def config():
    from transformers import ViTConfig

    return ViTConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=128, num_labels=10,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = (images - 0.3) / 0.4  # roughly zero mean, unit spread
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order], torch.tensor(digits.target)[order]


def train_set() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _images()
    return images[:-TEST_SIZE], labels[:-TEST_SIZE]


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _images()
    return images[-TEST_SIZE:], labels[-TEST_SIZE:]


def load_model():
    from transformers import ViTForImageClassification

    model = ViTForImageClassification(config())
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


def train(epochs: int = 35, batch: int = 32) -> None:
    from transformers import ViTForImageClassification

    # One thread: on the shared 2-core machine two OpenMP threads spin against the other work
    # and a step takes ~50x longer (measured: 0.4 s vs 30 s per step).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ViTForImageClassification(config())
    images, labels = train_set()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps = epochs * ((len(images) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images))
        for i in range(0, len(images), batch):
            x, y = images[order[i : i + batch]], labels[order[i : i + batch]]
            # shifts of up to 2 pixels: the digits are small, augmentation keeps the ViT from memorising
            x = torch.roll(x, shifts=(int(torch.randint(-2, 3, ())), int(torch.randint(-2, 3, ()))), dims=(2, 3))
            loss = F.cross_entropy(model(pixel_values=x).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test top-1 {accuracy(model):.2f}% "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
    WEIGHTS.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), WEIGHTS)
    print(f"wrote {WEIGHTS} ({WEIGHTS.stat().st_size / 1e6:.1f} MB)")


def accuracy(model) -> float:
    images, labels = test_set()
    model.eval()
    with torch.no_grad():
        predictions = model(pixel_values=images).logits.argmax(-1)
    return float((predictions == labels).float().mean() * 100)


if __name__ == "__main__":
    train(*(int(a) for a in sys.argv[1:2]))
