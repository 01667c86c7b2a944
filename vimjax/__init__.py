"""vimjax: ViT-VQGAN tokenizers and autoregressive image transformers (VIM, Parti) in JAX."""
from vimjax import log_setup as _log_setup

_log_setup.quiet_environment()  # Before TensorFlow or libtpu load (see log_setup.py).
