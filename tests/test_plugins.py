"""Third-party plugins: throwaway distributions (a ``*.dist-info`` folder and a module) put on ``sys.path``."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from textwrap import dedent

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import plugins, registry
from attnzoo.errors import AttnzooError, UnknownNameError
from attnzoo.testing import check_attention

BUILTINS = {"lpa-pc", "lpa-dp", "sagan", "softmask-sigmoid", "softmask-softmax"}

GATE = '''
import torch
from torch import nn

import attnzoo


class MeanGate(nn.Module):
    """A tiny gate: y = x * sigmoid(w * mean_c(x))."""

    attnzoo_kind = "gate"
    attnzoo_summary = "test gate: sigmoid of the scaled channel mean"

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), scale))

    def forward(self, x):
        m = torch.sigmoid(self.w * x.mean(1, keepdim=True))
        attnzoo.report_map(self, lambda: m[:, 0])
        return x * m
'''

Install = Callable[..., None]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(dist, {entry point: target}, module=source, ...)`` makes a distribution and forgets what was
    discovered; nothing is imported until a name is used or listed."""
    saved = dict(registry._registry)
    written: set[str] = set()
    for var in ("ATTNZOO_DISABLE_PLUGINS", "ATTNZOO_RAISE_PLUGIN_ERRORS", "ATTNZOO_PLUGIN_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dist: str, entry_points: dict[str, str], version: str = "1.0", **modules: str):
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[attnzoo.attention]\n{lines}")
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(dedent(source))
            written.add(module)
        importlib.invalidate_caches()
        plugins.refresh()

    yield make
    monkeypatch.undo()  # sys.path and the environment first, so the rediscovery below sees the real world
    for module in written:
        sys.modules.pop(module, None)
    registry._registry.clear()
    registry._registry.update(saved)
    plugins.refresh()


def _status(dist: str) -> plugins.PluginStatus:
    return next(st for st in plugins.plugin_status() if st.dist == dist)


def test_a_working_plugin_provides_a_class_and_a_function_entry_point(install: Install):
    more = GATE + '''
def register():
    for name in ("fake-two-a", "fake-two-b"):
        attnzoo.register_attention(name, kind="gate", summary=f"{name}: the mean gate again")(MeanGate)
'''
    install("fake-good", {"fake-mean": "fake_good:MeanGate", "fake-more": "fake_good:register"}, fake_good=more)

    assert {"fake-mean", "fake-two-a", "fake-two-b"} <= set(attnzoo.list_attention("fake-*"))
    assert BUILTINS <= set(attnzoo.list_attention())
    spec = attnzoo.get_attention("fake-mean")
    assert spec.source == "fake-good" and spec.options["scale"].default == 1.0
    model = attnzoo.create_model("test_resnet", "fake-two-b", at="layer3", num_classes=3, img_size=64)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.attention_maps()["layer3"].shape == (2, 4, 4)
    st = _status("fake-good")
    assert (st.status, st.version, sorted(st.names)) == ("ok", "1.0", ["fake-mean", "fake-two-a", "fake-two-b"])


def test_a_plugin_whose_import_fails_is_skipped_and_reported(install: Install):
    install("fake-broken", {"fake-broken": "fake_broken:Gate"}, fake_broken="raise ImportError('needs libfoo 2')")

    st = _status("fake-broken")
    assert st.status == "failed" and "needs libfoo 2" in st.reason and "fake_broken:Gate" in st.reason
    assert BUILTINS <= set(attnzoo.list_attention())
    with pytest.raises(UnknownNameError):
        attnzoo.get_attention("fake-broken")


@pytest.mark.parametrize("source, why", [
    (GATE.replace("channels: int, scale", "width: int, scale"), r"must start with \(channels\)"),
    (GATE.replace('attnzoo_kind = "gate"', ""), "neither registered as 'fake-bad' nor has attnzoo_kind"),
    (GATE.replace('attnzoo_kind = "gate"', 'attnzoo_kind = "foo"'), "kind must be 'gate' or 'readout'"),
    (GATE.replace("scale: float = 1.0", "scale: float"), "option 'scale' of MeanGate needs a default"),
], ids=["not-channels", "no-kind", "kind-foo", "option-without-default"])
def test_a_plugin_that_breaks_the_contract_is_skipped(install: Install, source: str, why: str):
    install("fake-bad", {"fake-bad": "fake_bad:MeanGate"}, fake_bad=source)

    st = _status("fake-bad")
    assert st.status == "failed"
    assert re.search(why, st.reason), st.reason
    assert "fake-bad" not in attnzoo.list_attention()


def test_two_plugins_with_one_name_need_the_qualified_name(install: Install):
    install("fake-dist-a", {"fake-dup": "fake_dup_a:MeanGate"}, fake_dup_a=GATE)
    install("fake-dist-b", {"fake-dup": "fake_dup_b:MeanGate"}, fake_dup_b=GATE.replace("scale: float = 1.0",
                                                                                         "scale: float = 2.0"))

    with pytest.raises(AttnzooError, match="fake-dist-a and fake-dist-b.*'fake-dist-a:fake-dup'"):
        attnzoo.create_attention("fake-dup", 8)
    assert attnzoo.create_attention("fake-dist-a:fake-dup", 8).w.item() == 1.0
    assert attnzoo.create_attention("fake_Dist_B:fake-dup", 8).w.item() == 2.0  # names compare as pip's do
    assert attnzoo.get_attention("fake-dist-b:fake-dup").name == "fake-dist-b:fake-dup"
    assert "fake-dup" not in attnzoo.list_attention()
    assert {"fake-dist-a:fake-dup", "fake-dist-b:fake-dup"} <= set(plugins.qualified_names())
    for dist, other in (("fake-dist-a", "fake-dist-b"), ("fake-dist-b", "fake-dist-a")):
        st = _status(dist)
        assert st.status == "conflicting" and other in st.reason


def test_a_plugin_cannot_take_a_builtin_name(install: Install):
    hijack = GATE.replace("class MeanGate", '@attnzoo.register_attention("sagan", kind="gate", summary="mine")\n'
                                            "class MeanGate")
    builtin = attnzoo.get_attention("sagan").cls
    install("fake-hijack", {"sagan": "fake_hijack:MeanGate"}, fake_hijack=hijack)

    assert attnzoo.get_attention("sagan").cls is builtin  # its import-time registration was rolled back
    assert attnzoo.get_attention("sagan").source == "attnzoo"
    assert attnzoo.get_attention("fake-hijack:sagan").cls.__name__ == "MeanGate"
    st = _status("fake-hijack")
    assert st.status == "conflicting" and "'sagan' also from attnzoo" in st.reason
    assert _status("attnzoo").status == "ok"


def test_a_name_registered_in_process_wins_over_a_plugin(install: Install):
    @attnzoo.register_attention("fake-mine", kind="gate", summary="registered by the user's own code")
    class Mine(nn.Module):
        def __init__(self, channels: int):
            super().__init__()

    install("fake-other", {"fake-mine": "fake_other:MeanGate"}, fake_other=GATE)
    assert attnzoo.get_attention("fake-mine").cls is Mine
    assert "fake-mine" in attnzoo.list_attention()
    assert _status("fake-other").status == "conflicting"
    assert attnzoo.get_attention("fake-other:fake-mine").cls.__name__ == "MeanGate"


def test_a_plugin_for_another_api_version_is_skipped(install: Install):
    install("fake-future", {"fake-future": "fake_future:MeanGate"}, fake_future='ATTNZOO_API = ">=2"\n' + GATE)

    st = _status("fake-future")
    assert st.status == "failed"
    assert f"needs attnzoo plugin API >=2, this attnzoo provides {attnzoo.PLUGIN_API_VERSION}" in st.reason
    assert "fake-future" not in attnzoo.list_attention()


def test_a_plugin_for_this_api_version_loads(install: Install):
    install("fake-now", {"fake-now": "fake_now:MeanGate"}, fake_now='ATTNZOO_API = ">=1,<2"\n' + GATE)
    assert _status("fake-now").status == "ok"


def test_raise_plugin_errors_reraises(install: Install, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ATTNZOO_RAISE_PLUGIN_ERRORS", "1")
    install("fake-raise", {"fake-raise": "fake_raise:Gate"}, fake_raise="raise ImportError('needs libfoo')")
    with pytest.raises(ImportError, match="needs libfoo"):
        attnzoo.list_attention()


@pytest.mark.parametrize("value", ["1", "fake-off", "Fake_Off", "other,fake-off-gate"])
def test_disable_plugins_skips_third_party_plugins(install: Install, monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("ATTNZOO_DISABLE_PLUGINS", value)
    install("fake-off", {"fake-off-gate": "fake_off:MeanGate"}, fake_off=GATE)

    assert "fake-off-gate" not in attnzoo.list_attention()
    assert BUILTINS <= set(attnzoo.list_attention())
    assert _status("fake-off").status == "disabled"
    assert _status("attnzoo").status == "ok"


def test_an_uninstalled_plugin_is_gone_after_a_refresh(install: Install, tmp_path: Path):
    install("fake-gone", {"fake-gone": "fake_gone:MeanGate"}, fake_gone=GATE)
    assert "fake-gone" in attnzoo.list_attention()
    sys.path.remove(str(tmp_path))
    importlib.invalidate_caches()
    plugins.refresh()
    assert "fake-gone" not in attnzoo.list_attention()
    assert BUILTINS <= set(attnzoo.list_attention())


@pytest.mark.parametrize("command", [["plugins"], ["list"]])
def test_cli_reports_a_broken_plugin_and_still_works(install: Install, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], command: list[str]):
    from attnzoo.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    install("fake-cli-broken", {"fake-cli": "fake_cli:Gate"},
            fake_cli="raise ImportError('needs [/] libbar')")  # rich markup in a reason must not break printing
    with pytest.raises(SystemExit) as exit_:
        main(command)
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "fake-cli-broken" in out and "failed" in out and "needs [/] libbar" in out
    assert "sagan" in out


class SizedGate(nn.Module):
    """A gate with one learned score per position: it needs the map size when it is built."""

    def __init__(self, channels: int, feat_size: tuple[int, int] | None = None, init: float = 0.0):
        super().__init__()
        if feat_size is None:
            raise ValueError("SizedGate needs feat_size")
        self.score = nn.Parameter(torch.full((1, 1, *feat_size), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.sigmoid(self.score)
        attnzoo.report_map(self, lambda: m.expand(x.shape[0], 1, -1, -1)[:, 0])
        return x * m


@pytest.fixture
def sized_gate() -> Iterator[str]:
    saved = dict(registry._registry)
    attnzoo.register_attention("tmp-sized", kind="gate", summary="a learned score per position")(SizedGate)
    yield "tmp-sized"
    registry._registry.clear()
    registry._registry.update(saved)


def test_a_gate_that_takes_feat_size_gets_its_sites_map_size(sized_gate: str):
    assert list(attnzoo.get_attention(sized_gate).options) == ["init"]  # feat_size is not a user option
    with pytest.raises(UnknownNameError):
        registry.parse_options(sized_gate, {"feat_size": "3"})
    model = attnzoo.create_model("test_resnet", sized_gate, at=["layer2", "layer3"], num_classes=3, img_size=64)
    sizes = {s.name: s.size for s in attnzoo.layers("test_resnet", 64)}
    for site in ("layer2", "layer3"):
        assert tuple(model.gates[site].score.shape[-2:]) == sizes[site]
    model(torch.randn(1, 3, 64, 64))
    assert model.attention_maps()["layer2"].shape == (1, *sizes["layer2"])
    assert check_attention(sized_gate)  # the kit passes the size of each test map
