"""python -m data_tools.inspect — dataset tool (inspect).

Not built yet: issue #3 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("data_tools.inspect", 3)

if __name__ == "__main__":
    raise SystemExit(main())
