"""One-off user tools (run with `python -m crrf_jax.tools.<name>`); nothing at run time imports them."""
