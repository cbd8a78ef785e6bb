"""Programs the HumanEval sandbox runs (code_exec.py), kept as files so that lint sees them: `init`
(PID 1 of an item's namespaces, run by path), `wrapper` (runs the item's program; its text is passed
to the sandbox's interpreter) and `probe` (the sandbox's self-check, run as a program). quantpipe
never imports them; they use only the standard library."""
