"""torchao stays out of transformers' and PEFT's imports while posttrain loads and wraps models."""

import pytest

from posttrain.hf_imports import torchao_hidden


def test_torchao_hidden_answers_not_installed_inside_and_restores_after():
    import importlib.util
    import sys

    outer = sys.modules.pop("torchao", "absent")  # this test process may have imported it (bench peers)
    try:
        found = importlib.util.find_spec("torchao") is not None
        with torchao_hidden():
            assert importlib.util.find_spec("torchao") is None
            with pytest.raises(ImportError):
                import torchao  # noqa: F401
            with torchao_hidden():  # nested: the outer one restores
                assert importlib.util.find_spec("torchao") is None
            assert importlib.util.find_spec("torchao") is None
        assert "torchao" not in sys.modules
        assert (importlib.util.find_spec("torchao") is not None) == found
    finally:
        if outer != "absent":
            sys.modules["torchao"] = outer
