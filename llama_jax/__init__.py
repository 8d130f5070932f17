"""LLaMA pretraining with JAX and Flax. Importing the package first sets quiet defaults for the
libraries below it (quiet.py), before TensorFlow or JAX is loaded; LLAMA_JAX_VERBOSE=1 keeps
every library's start-up output."""

from llama_jax import quiet

quiet.set_environment_defaults()
quiet.install_log_filter()
