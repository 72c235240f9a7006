"""Coverage of timm's model families: the cheapest model of each, with a gate and a readout at their default
sites, built, a forward and a backward; the maps must be [B, h, w] on each site's grid.

A family is the module a timm model is defined in (``timm.list_modules()``); its cheapest model is the one with
the fewest parameters, counted on the meta device (no memory, no weights). Each model runs at ``--img-size`` when
it can (ViTs with a fixed grid are built for it), else at 112 (patches of 14 px), else at its own default
size. A model over ``--max-params`` is skipped, and one taking longer than ``--timeout`` seconds is stopped;
both are said so. The ``levels`` column compares each feature level's map, as attnzoo reads it, with timm's own
``forward_intermediates(output_fmt="NCHW")`` (equal / levels; a level may differ where timm normalises it).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/backbones.py            # every family, minutes
    python benchmarks/backbones.py --families resnet swin_transformer        # some of them
"""

from __future__ import annotations

import argparse
import signal
import time
import warnings
from typing import Any

import common

GATE, READOUT = "softmask-sigmoid", "lpa-pc"


def cheapest(family: str) -> tuple[str, int] | None:
    """The model of ``family`` with the fewest parameters (built on the meta device), and its count."""
    import timm
    import torch

    best = None
    for name in timm.list_models(module=family):
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # a model that cannot be built as registered is not the family's cheapest
            continue
        if best is None or n < best[1]:
            best = (name, n)
    return best


class Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Timeout


def try_attention(name: str, attn: str, img_size: int) -> str:
    """"ok", or the first line of why not."""
    import torch

    import attnzoo

    model = attnzoo.create_model(name, attn, num_classes=3, img_size=img_size)
    model.train()
    logits = model(torch.randn(2, 3, img_size, img_size))
    maps = model.attention_maps()
    for site in model.sites:
        want = (2, *model.site_info[site].size)
        if site not in maps or tuple(maps[site].shape) != want:
            got = tuple(maps[site].shape) if site in maps else "no map"
            return f"map at '{site}' is {got}, not {want}"
        if not torch.isfinite(maps[site]).all():
            return f"map at '{site}' is not finite"
    logits.square().mean().backward()
    for label, module in model.named_attention_modules():
        if not any(p.grad is not None for p in module.parameters()):
            return f"{label} got no gradient"
    return "ok"


def level_check(name: str, img_size: int) -> str:
    """How many feature levels attnzoo reads exactly as timm's forward_intermediates gives them (NCHW)."""
    import timm
    import torch

    from attnzoo.model.sites import introspect, to_map

    info = introspect(name, img_size)
    model = timm.create_model(name, num_classes=3, **dict(info.timm_kwargs)).eval()
    levels = [info.site(n) for n in info.levels]
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def keep(site: Any) -> Any:
        def hook(_m: Any, _i: Any, out: Any) -> None:
            seen[site.name] = to_map(site, out)

        return hook

    for s in levels:
        modules[s.module].register_forward_hook(keep(s))
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        model.forward_features(x)
        try:
            theirs = model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")
        except Exception as e:
            return f"n/a ({type(e).__name__})"
    if len(theirs) != len(levels):
        return f"n/a ({len(theirs)} intermediates, {len(levels)} levels)"
    same = sum(s.name in seen and seen[s.name].shape == t.shape and torch.allclose(seen[s.name], t, atol=1e-5)
               for s, t in zip(levels, theirs))
    return f"{same}/{len(levels)}"


def first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    from attnzoo.model.sites import default_img_size

    t0 = time.perf_counter()
    pick = cheapest(family)
    if pick is None:
        return dict(family=family, model="-", params=0, gate="-", readout="-", levels="-", img_size=None,
                    seconds=0.0, reason="no model of the family can be built")
    name, params = pick
    row: dict[str, Any] = dict(family=family, model=name, params=params, gate="-", readout="-", levels="-",
                               img_size=None, reason="")
    if params > args.max_params * 1e6:
        row.update(seconds=0.0, reason=f"skipped: {params / 1e6:.0f}M parameters, over --max-params "
                                       f"{args.max_params:g}M")
        return row
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.timeout)
    try:
        for size in dict.fromkeys([args.img_size, 112, default_img_size(name)]):  # 112: patches of 14 and 16
            row["img_size"] = size
            results = {}
            for key, attn in (("gate", GATE), ("readout", READOUT)):
                try:
                    results[key] = try_attention(name, attn, size)
                except Timeout:
                    raise
                except Exception as e:
                    results[key] = first_line(e)
            row.update(results)
            if all(v == "ok" for v in results.values()):
                break
        try:
            row["levels"] = level_check(name, row["img_size"])
        except Timeout:
            raise
        except Exception as e:
            row["levels"] = f"n/a ({type(e).__name__})"
    except Timeout:
        row["reason"] = f"stopped after {args.timeout} s (--timeout)"
    finally:
        signal.alarm(0)
    if not row["reason"]:
        bad = [f"{k}: {v}" for k, v in (("gate", row["gate"]), ("readout", row["readout"])) if v != "ok"]
        row["reason"] = "; ".join(bad)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--families", nargs="*", default=None, help="timm module names (default: all)")
    ap.add_argument("--img-size", type=int, default=64, help="input size tried first (default 64)")
    ap.add_argument("--max-params", type=float, default=500, help="skip models over this many million parameters")
    ap.add_argument("--timeout", type=int, default=180, help="seconds per family before it is stopped")
    args = ap.parse_args()
    common.setup(args)
    warnings.filterwarnings("ignore")
    import timm

    families = args.families or timm.list_modules()
    rows = []
    for family in families:
        row = run_family(family, args)
        rows.append(row)
        common.log(f"{family:28s} {row['model']:36s} gate={row['gate'][:40]:40s} readout={row['readout'][:40]:40s} "
                   f"levels={row['levels']} {row['seconds']}s")
    works = [r for r in rows if r["gate"] == "ok" and r["readout"] == "ok"]
    share = len(works) / max(1, len(rows))
    headers = ["family", "model", "gate", "readout", "levels = timm", "s", "reason"]
    table = [[r["family"], r["model"], "ok" if r["gate"] == "ok" else "no", "ok" if r["readout"] == "ok" else "no",
              r["levels"], r["seconds"], r["reason"]] for r in rows]
    common.print_table(f"timm families: {len(works)} of {len(rows)} work with a gate and a readout ({share:.0%})",
                       headers, table)
    common.write_json("backbones", args, dict(rows=rows, works=len(works), families=len(rows), share=share,
                                              gate=GATE, readout=READOUT), args.json)


if __name__ == "__main__":
    main()
