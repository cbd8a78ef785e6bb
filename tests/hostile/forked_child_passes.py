# Attack 4b: a forked copy of the program runs a correct solution to the end while the main
# process fails: only the main process reaching the end may count.
import os

child = os.fork()


def add(a, b):
    return a + b if child == 0 else a * b


def check(candidate):
    if child:
        os.waitpid(child, 0)  # the copy has finished (and passed) first
    assert candidate(2, 3) == 5


check(add)
