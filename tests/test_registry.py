from __future__ import annotations

from typing import Literal

import pytest
from torch import nn

import attnzoo
from attnzoo.errors import AttnzooError, UnknownNameError
from attnzoo.model import registry

BUILTINS = {"lpa-pc", "lpa-dp", "sagan", "softmask-sigmoid", "softmask-softmax"}


@pytest.fixture
def scratch_registry():
    saved = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


def test_builtins_are_listed_with_their_kinds():
    assert BUILTINS <= set(attnzoo.list_attention())
    assert set(attnzoo.list_attention(kind="readout")) >= {"lpa-pc", "lpa-dp"}
    assert "sagan" not in attnzoo.list_attention(kind="readout")


def test_list_attention_takes_wildcards():
    assert attnzoo.list_attention("lpa-*") == ["lpa-dp", "lpa-pc"]
    assert attnzoo.list_attention("softmask-s*moid") == ["softmask-sigmoid"]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="did you mean 'lpa-pc'"):
        attnzoo.create_attention("lpa-cp", [8], 16, 3)


def test_options_come_from_the_signature_with_choices():
    spec = attnzoo.get_attention("lpa-pc")
    assert spec.options["agg"].default == "concat"
    assert spec.options["agg"].choices == ("concat", "indep")
    assert "compat" not in spec.options  # fixed by the registered name
    assert spec.options.keys() == {"agg", "norm", "project"}
    assert attnzoo.get_attention("sagan").options["reduction"].type is int


def test_cli_strings_are_coerced_to_option_types():
    assert registry.parse_options("sagan", {"reduction": "4"}) == {"reduction": 4}
    assert registry.parse_options("lpa-dp", {"norm": "sigmoid"}) == {"norm": "sigmoid"}


def test_bad_option_values_and_keys_are_refused():
    with pytest.raises(AttnzooError, match="needs a int"):
        registry.parse_options("sagan", {"reduction": "four"})
    with pytest.raises(AttnzooError, match="one of concat, indep"):
        registry.parse_options("lpa-pc", {"agg": "sum"})
    with pytest.raises(UnknownNameError, match="did you mean 'reduction'"):
        registry.parse_options("sagan", {"reductoin": "4"})


def test_create_attention_builds_with_options():
    m = attnzoo.create_attention("sagan", 64, reduction=4)
    assert m.query.out_channels == 16


def test_overwriting_a_name_warns(scratch_registry):
    @attnzoo.register_attention("tmp-gate", kind="gate", summary="a")
    class A(nn.Module):
        def __init__(self, channels: int):
            super().__init__()

    with pytest.warns(UserWarning, match="'tmp-gate'.*overwritten"):
        @attnzoo.register_attention("tmp-gate", kind="gate", summary="b")
        class B(nn.Module):
            def __init__(self, channels: int):
                super().__init__()

    assert attnzoo.get_attention("tmp-gate").cls is B


def test_a_constructor_that_breaks_the_contract_is_refused(scratch_registry):
    with pytest.raises(TypeError, match=r"must start with \(channels\)"):
        @attnzoo.register_attention("tmp-bad", kind="gate", summary="x")
        class Bad(nn.Module):
            def __init__(self, width: int):
                super().__init__()

    with pytest.raises(TypeError, match="needs a default"):
        @attnzoo.register_attention("tmp-bad2", kind="gate", summary="x")
        class Bad2(nn.Module):
            def __init__(self, channels: int, k: int):
                super().__init__()


def test_literal_options_list_choices(scratch_registry):
    @attnzoo.register_attention("tmp-lit", kind="gate", summary="x")
    class G(nn.Module):
        def __init__(self, channels: int, mode: Literal["a", "b"] = "a", scale: float = 1.0, on: bool = True):
            super().__init__()

    spec = attnzoo.get_attention("tmp-lit")
    assert spec.options["mode"].choices == ("a", "b")
    assert registry.parse_options("tmp-lit", {"scale": "2", "on": "false"}) == {"scale": 2.0, "on": False}
