"""Deprecated: moved to ``cab_eval.benchmark`` (the ``[eval]`` extra); this alias goes in the next release."""

from cab_eval.moved import alias

alias(__name__)
