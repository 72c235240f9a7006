"""Third-party plugins: throwaway distributions (a ``*.dist-info`` folder and a module) put on ``sys.path``."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from textwrap import dedent

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.errors import AttnzooError, UnknownNameError
from attnzoo.model import plugins, registry
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


def write_dist(root: Path, dist: str, entry_points: dict[str, str], version: str = "1.0", **modules: str) -> None:
    """A distribution as pip leaves it: ``root/<dist>-<version>.dist-info`` and its modules in ``root``."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[attnzoo.attention]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(dedent(source))


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(dist, {entry point: target}, module=source, ...)`` makes a distribution and forgets what was
    discovered; nothing is imported until a name is used or listed."""
    saved = dict(registry._registry)
    written: set[str] = set()
    for var in ("ATTNZOO_DISABLE_PLUGINS", "ATTNZOO_RAISE_PLUGIN_ERRORS", "ATTNZOO_PLUGIN_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dist: str, entry_points: dict[str, str], version: str = "1.0", **modules: str) -> None:
        write_dist(tmp_path, dist, entry_points, version, **modules)
        written.update(modules)
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
    with pytest.raises(AttnzooError, match="plugin fake-broken, which failed to load: .*needs libfoo 2"):
        attnzoo.get_attention("fake-broken")  # its reason, never "unknown attention module"


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


# Plugins are guests: what an import does is contained, and a plugin is imported only when its name is used.

REGISTER_TWO = GATE + '''
def register():
    for name in ("fake-fn-a", "fake-fn-b"):
        attnzoo.register_attention(name, kind="gate", summary=f"{name}: the mean gate again")(MeanGate)
'''


def _cli(command: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    from attnzoo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(command)
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    return out, err


def test_using_a_builtin_imports_no_third_party_plugin(install: Install):
    install("fake-lazy", {"fake-lazy": "fake_lazy:MeanGate", "sagan": "fake_lazy_sagan:MeanGate",
                          "fake-lazy-fn": "fake_lazy_fn:register"},
            fake_lazy=GATE, fake_lazy_sagan=GATE, fake_lazy_fn=REGISTER_TWO)
    guests = {"fake_lazy", "fake_lazy_sagan", "fake_lazy_fn"}

    attnzoo.create_model("test_resnet", "sagan", at="layer3", num_classes=3, img_size=64)
    assert not guests & set(sys.modules)
    assert attnzoo.get_attention("fake-lazy").source == "fake-lazy"  # an entry point of that name: it alone
    assert guests & set(sys.modules) == {"fake_lazy"}
    assert attnzoo.get_attention("fake-fn-b").source == "fake-lazy"  # no entry point of that name: functions too
    assert "fake_lazy_fn" in sys.modules


def test_an_entry_point_of_a_name_wins_over_a_function_that_registers_it(install: Install):
    install("fake-by-class", {"fake-fn-a": "fake_by_class:MeanGate"}, fake_by_class=GATE)
    install("fake-by-function", {"fake-fns": "fake_by_function:register"}, fake_by_function=REGISTER_TWO)

    assert attnzoo.get_attention("fake-fn-a").source == "fake-by-class"
    assert "fake_by_function" not in sys.modules  # the entry point named fake-fn-a settled it
    assert attnzoo.get_attention("fake-fn-b").source == "fake-by-function"
    assert attnzoo.get_attention("fake-fn-a").source == "fake-by-class"  # the same answer once all are imported
    st = _status("fake-by-function")
    assert st.status == "conflicting" and "use 'fake-by-function:fake-fn-a'" in st.reason


def test_a_time_limit_that_is_not_a_number_is_a_users_mistake(install: Install, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ATTNZOO_PLUGIN_TIMEOUT", "soon")
    install("fake-when", {"fake-when": "fake_when:MeanGate"}, fake_when=GATE)
    with pytest.raises(AttnzooError, match="ATTNZOO_PLUGIN_TIMEOUT must be a number of seconds above 0 and at "
                                           "most 86400, got 'soon'"):
        attnzoo.get_attention("fake-when")
    monkeypatch.setenv("ATTNZOO_PLUGIN_TIMEOUT", "2.5")
    assert attnzoo.get_attention("fake-when").source == "fake-when"


@pytest.mark.parametrize("command", [["list", "--json"], ["plugins", "--json"]])
def test_a_plugin_whose_import_hangs_fails_after_the_time_limit(install: Install, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str],
                                                                command: list[str]):
    monkeypatch.setenv("ATTNZOO_PLUGIN_TIMEOUT", "1")
    install("fake-slow", {"fake-slow": "fake_slow:MeanGate"}, fake_slow="import time\ntime.sleep(60)\n" + GATE)

    start = time.monotonic()
    out, _ = _cli(command, capsys)
    assert time.monotonic() - start < 20  # the import alone would take 60 s
    assert "sagan" in out and "fake-slow" not in attnzoo.list_attention()
    st = _status("fake-slow")
    assert st.status == "failed" and "import took longer than 1s" in st.reason


@pytest.mark.parametrize("command", [["list", "--json"], ["plugins", "--json"]])
def test_a_plugin_that_prints_at_import_keeps_json_output_valid(install: Install, capsys: pytest.CaptureFixture[str],
                                                                command: list[str]):
    install("fake-loud", {"fake-loud": "fake_loud:MeanGate"}, fake_loud="print('hello from fake-loud')\n" + GATE)

    out, err = _cli(command, capsys)
    assert "fake-loud" in {row.get("name", row.get("dist")) for row in json.loads(out)}
    assert "hello from fake-loud" in err


@pytest.mark.parametrize("source, why", [
    ("import argparse\nargparse.ArgumentParser(prog='fake').parse_args(['--no-such-option'])\n", "SystemExit: 2"),
    ("raise SystemExit('bye')\n", "SystemExit: bye"),
    ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
], ids=["parse-args", "sys-exit", "keyboard-interrupt"])
def test_a_plugin_that_exits_or_interrupts_at_import_is_skipped(install: Install, capsys: pytest.CaptureFixture[str],
                                                                source: str, why: str):
    install("fake-exit", {"fake-exit": "fake_exit:MeanGate"}, fake_exit=source + GATE)

    with pytest.raises(AttnzooError, match=f"plugin fake-exit, which failed to load: .*{why}"):
        attnzoo.get_attention("fake-exit")
    st = _status("fake-exit")
    assert st.status == "failed" and why in st.reason
    out, _ = _cli(["list"], capsys)
    assert "sagan" in out and "fake-exit" in out


THREAD = '''
import threading

stop = threading.Event()
threading.Thread(target=stop.wait, name="fake-poller", daemon=False).start()
'''


def test_a_plugin_that_leaves_a_non_daemon_thread_is_reported(install: Install):
    install("fake-thread", {"fake-thread": "fake_thread:MeanGate"}, fake_thread=THREAD + GATE)
    try:
        st = _status("fake-thread")
        assert st.status == "failed" and "non-daemon thread(s) 'fake-poller'" in st.reason
        assert "fake-poller" in [t.name for t in plugins.manager.stray_threads()]
        assert "fake-thread" not in attnzoo.list_attention()
    finally:
        sys.modules["fake_thread"].stop.set()


def test_the_cli_exits_although_a_plugin_left_a_thread_running(tmp_path: Path):
    forever = THREAD.replace("stop.wait", "lambda: stop.wait(600)")
    write_dist(tmp_path, "fake-forever", {"fake-forever": "fake_forever:MeanGate"}, fake_forever=forever + GATE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
           "ATTNZOO_DISABLE_PLUGINS": "attnzoo-timm,attnzoo-simam", "OMP_NUM_THREADS": "1"}
    env.pop("ATTNZOO_PLUGIN_TIMEOUT", None)

    done = subprocess.run([sys.executable, "-m", "attnzoo", "plugins", "--json"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status = {row["dist"]: row["status"] for row in json.loads(done.stdout)}
    assert status["fake-forever"] == "failed" and status["attnzoo"] == "ok"
    assert "not waiting for thread(s) 'fake-poller'" in done.stderr


TAMPER = '''
import attnzoo.runs.predict

attnzoo.runs.predict.Run.predict = lambda self, images, bs=32: "not attnzoo's prediction"
'''


@pytest.mark.parametrize("loaded", [True, False], ids=["run-loaded-before", "run-first-loaded-by-the-plugin"])
def test_a_plugin_that_replaces_attnzoos_functions_is_reported(install: Install, monkeypatch: pytest.MonkeyPatch,
                                                               loaded: bool):
    import attnzoo.runs.predict
    from attnzoo.doctor import check_plugins

    predict = attnzoo.runs.predict.Run.predict
    if not loaded:  # the plugin's import runs attnzoo/runs/predict.py again: there is nothing to compare with
        monkeypatch.setattr(attnzoo.runs, "predict", attnzoo.runs.predict)
        monkeypatch.delitem(sys.modules, "attnzoo.runs.predict")
    install("fake-tamper", {"fake-tamper": "fake_tamper:MeanGate"}, fake_tamper=TAMPER + GATE)

    st = _status("fake-tamper")
    assert st.status == "tampered" and "modified attnzoo: runs.predict.Run.predict" in st.reason
    assert "fake-tamper" not in attnzoo.list_attention()
    assert next(c for c in check_plugins() if c.name == "plugin fake-tamper").status == "fail"
    if loaded:
        assert attnzoo.runs.predict.Run.predict is predict  # put back


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
