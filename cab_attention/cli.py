"""Deprecated: moved to ``cab_eval.cli`` (the ``[eval]`` extra); this alias goes in the next release."""

from cab_eval.moved import alias

alias("cab_attention.cli")

if __name__ == "__main__":
    import sys

    sys.exit(sys.modules["cab_eval.cli"].main())
