"""`python -m sgjax.generate`: greedy generation from the command line."""
