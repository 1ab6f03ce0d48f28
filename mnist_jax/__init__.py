"""mnist_jax: the TF1 MNIST CNN tutorial as a modern JAX/Flax codebase.

Importing the package applies the project's XLA flags (see `xla_setup`), which
must happen before JAX initialises its backend; import `mnist_jax` before
running any JAX computation.
"""

from mnist_jax import xla_setup as _xla_setup

_xla_setup.configure()

__version__ = '0.1.0'
