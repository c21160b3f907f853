"""`cocos-manager-cli`: the verbs, the Run request it builds from files, and what it prints."""

from cocos_manager.cli.commands import main

__all__ = ["main"]
