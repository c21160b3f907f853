"""cocos-manager: the Cocos Manager daemon, ported to Python."""

__version__ = "0.1.0"
