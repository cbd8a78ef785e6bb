# Attack 4: leave with status 0 before the tests run (a wrong solution).
import sys


def add(a, b):
    return a * b


sys.exit(0)


def check(candidate):
    assert candidate(2, 3) == 5


check(add)
