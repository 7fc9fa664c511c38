"""lightflax: Conv2D vs LightLayers vs transfer learning, in JAX/Flax, for speed studies."""

from lightflax import xla_defaults as _xla_defaults

_xla_defaults.apply()  # before JAX creates its CPU backend; see lightflax/xla_defaults.py

__version__ = "0.1.0"
