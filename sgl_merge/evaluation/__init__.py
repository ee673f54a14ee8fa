"""Evaluation: single trace vs majority vote@k vs ThinkMerge@k (`sgl-merge demo`, `sgl-merge eval`).

`runner` runs the methods on one server over the same traces, `scoring` decides what is right
(math-verify, the code sandbox in `sandbox`), `report` turns results into intervals and a plot, and
`commands` is the command line.
"""
