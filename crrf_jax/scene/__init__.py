"""The scenes users give `python -m crrf_jax.predict`: Sentinel-2 inputs in their usual forms (`s2`),
Sentinel-1 on any grid and in any units (`s1`), and the prediction files (`outputs`)."""
