"""Built-in offline environments: arithmetic, reversal, sorting, countdown, word problems, and
the agent environments — a number-guessing game with feedback (``guess``), arithmetic with a
calculator tool (``calc``), code checked by unit tests in the sandbox (``code``)."""
