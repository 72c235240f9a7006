"""FitConfig: one validated object holds every fit setting, for the command line and Python callers alike."""

from __future__ import annotations

import pytest

import attnzoo
from attnzoo import AttnzooError, FitConfig
from attnzoo.train.settings import parse_attn_args


def test_python_callers_get_the_command_line_checks_before_anything_starts(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(AttnzooError, match="seed must be at most 4294967295"):
        attnzoo.fit("test_resnet", "sagan", "demo", pretrained=False, seed=2**64, out=str(run))
    assert not run.exists()


def test_resume_takes_no_other_setting_but_workers():
    with pytest.raises(AttnzooError, match="leave out --epochs"):
        attnzoo.fit(resume="runs/any", epochs=9)
    with pytest.raises(AttnzooError, match="leave out --epochs"):  # typed, even at its default value
        FitConfig.of(resume="runs/any", epochs=5)
    with pytest.raises(AttnzooError, match="leave out --attn-arg, --bs"):
        FitConfig(resume="runs/any", bs=8, attn_options={"reduction": 4})
    assert FitConfig.of(resume="runs/any", num_workers=0).num_workers == 0


def test_a_run_request_rebuilds_the_same_config(tmp_path):
    config = FitConfig(backbone="test_resnet", attn="sagan", data=str(tmp_path), at=["layer3"],
                       attn_options={"reduction": 4}, epochs=3, lr=0.01, bs=8, img_size=32, seed=7,
                       out=str(tmp_path / "run"))
    request = config.request()
    assert "out" not in request and "resume" not in request
    assert FitConfig.from_request(request).request() == request


def test_requests_of_older_runs_still_load():
    # written before sync_bn / compile existed; a key from a newer attnzoo is ignored
    old = dict(backbone="test_resnet", attn="lpa-pc", data="demo", at=["layer1", "layer2", "layer3"],
               attn_options={}, epochs=4, lr=0.001, bs=8, img_size=32, pretrained=False, weights=None,
               valid_pct=0.2, seed=3, freeze_epochs=1, checkpoints=True, num_workers=None, from_the_future=1)
    config = FitConfig.from_request(old, num_workers=0)
    assert (config.epochs, config.seed, config.num_workers, config.compile) == (4, 3, 0, False)


@pytest.mark.parametrize("settings,message", [
    (dict(epochs="3"), "epochs must be a whole number"),
    (dict(epochs=True), "epochs must be a whole number"),
    (dict(pretrained="yes"), "pretrained must be True or False"),
    (dict(lr="fast"), "--lr takes a number or 'auto'"),
    (dict(lr=float("inf")), "lr must be a positive number"),
    (dict(attn="none", at="layer3"), "--at and --attn-arg need an attention module"),
    (dict(attn=None, attn_options={"reduction": 4}), "--at and --attn-arg need an attention module"),
    (dict(num_workers=-1), "workers must be 0 or more"),
    (dict(bs=8, img_size=4096, epochs=1), None),  # 134M pixels per batch: the most allowed
    (dict(bs=9, img_size=4096), "pixels per batch"),
])
def test_settings_are_checked_when_the_config_is_made(settings, message):
    settings = {"backbone": "test_resnet", "attn": "sagan", "data": "demo", **settings}
    if message is None:
        FitConfig(**settings)
    else:
        with pytest.raises(AttnzooError, match=message):
            FitConfig(**settings)


def test_an_attn_arg_key_given_twice_is_an_error_not_last_wins():
    assert parse_attn_args(["reduction=4", "gamma = 0.5"]) == {"reduction": "4", "gamma": "0.5"}
    with pytest.raises(AttnzooError, match="reduction is given twice"):
        parse_attn_args(["reduction=4", "reduction=8"])
