"""python -m data_tools.make_shapes — dataset tool (make_shapes).

Not built yet: issue #3 builds it. Until then it says so in one line and exits non-zero.
"""
from mqscale.cli import not_built

main = not_built("data_tools.make_shapes", 3)

if __name__ == "__main__":
    raise SystemExit(main())
