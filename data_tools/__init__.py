"""Dataset tools: python -m data_tools.<tool> (issue #3)."""
