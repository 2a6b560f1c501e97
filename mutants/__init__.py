"""Known-wrong implementations of each lab, as course content: one module per lab
(`mutants/<lab>.py`, a list MUTANTS), each mutant a set of exact patches on the lab's
source notebook and the hidden tests that must catch it. The project's tests grade the
`always=True` ones on every run (COURSE_ALL_MUTANTS=1: all of them) and check that each
loses points on every test it names; bench/throughput.py grades one as a partly wrong
submission."""
