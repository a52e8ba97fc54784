"""A command module that fails to import stops the CLI with an error naming it: a broken or misspelt command
module is never skipped silently (which would drop its commands without a word)."""

from __future__ import annotations

import sys

import pytest

import tokenmdp.commands
from tokenmdp import cli


def test_missing_command_module_is_an_error_naming_it(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["no_such_command"])
    with pytest.raises(ImportError, match=r"tokenmdp\.commands\.no_such_command"):
        cli._register_all()


def test_command_module_with_a_broken_import_propagates(monkeypatch, tmp_path):
    (tmp_path / "broken_cmd.py").write_text("import tokenmdp_no_such_dependency\n\ndef register(app):\n    pass\n")
    monkeypatch.setattr(tokenmdp.commands, "__path__", [*tokenmdp.commands.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "tokenmdp.commands.broken_cmd", raising=False)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["broken_cmd"])
    registered = []
    monkeypatch.setattr(cli, "app", registered)  # register(app) must never be reached
    with pytest.raises(ImportError) as info:
        cli._register_all()
    assert info.value.name == "tokenmdp_no_such_dependency"
    assert registered == []


def test_command_module_raising_on_import_propagates(monkeypatch, tmp_path):
    (tmp_path / "raising_cmd.py").write_text("raise ImportError('cannot import name thing from somewhere')\n")
    monkeypatch.setattr(tokenmdp.commands, "__path__", [*tokenmdp.commands.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "tokenmdp.commands.raising_cmd", raising=False)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["raising_cmd"])
    with pytest.raises(ImportError, match="cannot import name thing"):
        cli._register_all()
