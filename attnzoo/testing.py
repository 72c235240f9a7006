"""The conformance kit for attention modules: ``check_attention`` (it lives in ``attnzoo.model.kit``).

    from attnzoo.testing import check_attention
    def test_my_module():
        check_attention("my-module")          # a registered name, or the class itself
"""

from .model.kit import check_attention

__all__ = ["check_attention"]
