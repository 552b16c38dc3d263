"""The demo's offline ViT: a small timm ViT trained in seconds on scikit-learn's digits.

No pretrained ViT weights can be downloaded offline, and a random ViT's
attention is an almost uniform map that shows nothing.  The 1,797 8x8
handwritten digits that ship inside scikit-learn are enough to train a tiny
ViT (2x2-pixel patches, so a 4x4 grid + CLS; 3 layers of 4 heads) to
about 95% test accuracy in 10 to 40 seconds on one CPU core (11 s idle, 33 to
40 s on a shared, busy one); its attention then has
real structure (the CLS token looks at the strokes that tell digits apart).
One-pixel patches (an 8x8 grid) learn too slowly for a demo.  Training runs
on one thread: on a shared two-core machine, torch's second thread makes
small matrix products ten times slower.  Used by ``visualizer demo`` when the ViT-S/16
weights are not in the Hugging Face cache.
"""
import time
from typing import Any, Dict

DIGITS_CONFIG = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32,
                     depth=3, num_heads=4, mlp_ratio=2.0)
BATCH = 64


def load_digits():
    """Return ``(images (N, 8, 8) float32 in [0, 1], labels (N,) int64)`` from scikit-learn."""
    import numpy as np
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel values 0..16
    return images, digits.target.astype(np.int64)


def train_digits_vit(seconds: float = 40.0, epochs: int = 20, seed: int = 0) -> Dict[str, Any]:
    """Train the digits ViT; return ``{'model', 'images', 'labels', 'test', 'accuracy', 'seconds'}``.

    ``test`` holds the indices of the held-out fifth of the images, on which
    ``accuracy`` is measured.  Training stops after ``epochs`` or once
    ``seconds`` have passed, whichever comes first; the seed makes it repeatable
    up to that time limit.
    """
    import numpy as np
    import timm
    import torch

    images, labels = load_digits()
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(images))
    cut = len(images) * 4 // 5
    train, test = order[:cut], order[cut:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(np, timm, torch, images, labels, train, test, seconds, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(np, timm, torch, images, labels, train, test, seconds, epochs, seed):
    x = torch.from_numpy((images - 0.5) / 0.5).unsqueeze(1)  # (N, 1, 8, 8), as the model sees it
    y = torch.from_numpy(labels)
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(**DIGITS_CONFIG)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * int(np.ceil(len(train) / BATCH))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    started = time.time()
    generator = torch.Generator().manual_seed(seed)
    done = False
    for _ in range(epochs):
        model.train()
        perm = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(perm), BATCH):
            batch = perm[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if time.time() - started > seconds:
                done = True
                break
        if done:
            break
    model.eval()
    with torch.no_grad():
        predicted = model(x[torch.from_numpy(test)]).argmax(-1).numpy()
    return {"model": model, "images": images, "inputs": x, "labels": labels, "test": test,
            "accuracy": float(np.mean(predicted == labels[test])),
            "seconds": time.time() - started}
