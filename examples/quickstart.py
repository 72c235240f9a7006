"""The Python API in a few lines: demo data, a fastai Learner with attention, maps of one batch.

    python examples/quickstart.py        # about a minute on a 2-core CPU
"""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.explain import figures as viz
from attnzoo.train.data import find_dataset, image_dataloaders
from attnzoo.train.demo import make_demo

# 1. data: the built-in synthetic shapes (object boxes known), as fastai DataLoaders
info = find_dataset(make_demo())
dls = image_dataloaders(info, img_size=64, bs=64)

# 2. a plain fastai Learner: resnet18 with Learn To Pay Attention reading layer1..layer3
learn = attnzoo.attention_learner(dls, "resnet18", attn="lpa-pc", pretrained=False)
learn.fit_one_cycle(2, 2e-3)

# 3. where it looks: attention_maps() after any forward
xb, yb = dls.valid.one_batch()
learn.model.eval()
with torch.no_grad():
    preds = learn.model(xb).argmax(1)
maps = learn.model.attention_maps()  # {site: [B, h, w]}
norm = dls.after_batch.normalize
images = viz.denormalize(xb[:4].cpu(), norm.mean.flatten().cpu(), norm.std.flatten().cpu())
labels = [dls.vocab[i] for i in yb[:4]]
fig = viz.attention_grid(images, {k: v[:4] for k, v in maps.items()}, labels, [dls.vocab[i] for i in preds[:4]])
print("wrote", viz.save_new_figure(fig, "quickstart_attention.png"))  # a new name if that one is taken
