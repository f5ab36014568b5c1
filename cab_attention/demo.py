"""Deprecated: moved to ``cab_eval.demo`` (the ``[eval]`` extra); this alias goes in the next release."""

from cab_eval.moved import alias

alias("cab_attention.demo")

if __name__ == "__main__":
    import sys

    sys.exit(sys.modules["cab_eval.demo"].main())
