"""Learn To Pay Attention's CIFAR-100 recipe (VGG-att3-concat-pc) with attnzoo, for CIFAR-100 as an image folder.

    python examples/paper_recipe_cifar100.py /path/to/cifar100   # train/<class>/*.png + test/<class>/*.png

Jetley et al. (ICLR 2018) train VGG with three attention estimators (taps at layers 7, 10, 13: timm's
vgg16_bn features.22, .32, .42), parametrised compatibility and concatenated g_a, from scratch with SGD
(momentum 0.9, weight decay 5e-4, batch 128), the learning rate halved every 25 epochs, 300 epochs.
Paper: 30.62% top-1 error for plain VGG, 22.97% for VGG-att3-concat-pc.

Differences from the paper's network: timm's vgg16_bn keeps all five max-pools and its fc layers are
convolutions, so at 32x32 the taps are 8x8, 4x4 and 2x2 (the paper removes pools to keep larger maps).
Use --img-size 64 to get 16x16, 8x8 and 4x4 taps at four times the cost.
"""

from __future__ import annotations

import argparse
from functools import partial

from fastai.callback.schedule import ParamScheduler
from fastai.optimizer import SGD

import attnzoo
from attnzoo.train.data import find_dataset, image_dataloaders


def halve_every(step: int, total: int, lr0: float = 0.1):
    """lr(pos) for fastai's ParamScheduler (pos runs 0..1 over the fit): lr0, halved every `step` epochs."""

    def schedule(pos: float) -> float:
        return lr0 * 0.5 ** int(pos * total // step)

    return schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--attn", default="lpa-pc", help="lpa-pc (paper's best), lpa-dp, or none for the baseline")
    args = ap.parse_args()

    info = find_dataset(args.data)
    # CIFAR statistics rather than ImageNet's: the network is trained from scratch
    dls = image_dataloaders(info, img_size=args.img_size, bs=128, mean=(0.507, 0.487, 0.441),
                            std=(0.267, 0.256, 0.276))
    learn = attnzoo.attention_learner(dls, "vgg16_bn", attn=args.attn, pretrained=False,
                                      opt_func=partial(SGD, mom=0.9), wd=5e-4)
    learn.fit(args.epochs, cbs=ParamScheduler({"lr": halve_every(25, args.epochs)}))
    print("final valid accuracy:", float(learn.recorder.values[-1][-1]))


if __name__ == "__main__":
    main()
