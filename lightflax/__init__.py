"""lightflax: Conv2D vs LightLayers vs transfer learning, in JAX/Flax, for speed studies."""

__version__ = "0.1.0"
