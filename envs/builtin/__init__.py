"""Built-in offline environments: arithmetic, reversal, sorting, countdown, word problems."""
