# Attack 4: raise SystemExit before the tests run (a wrong solution).


def add(a, b):
    return a * b


raise SystemExit(0)


def check(candidate):
    assert candidate(2, 3) == 5


check(add)
